//! What the configuration means on this system: the checks the service makes before it
//! serves (an error stops it with exit 78) and `check-config`, which makes the same checks,
//! prints the effective configuration in the file's own spelling, and fails where the service
//! would.

use crate::config::{Config, ControlBackend};
use crate::control::{GpioLines, TtyModem};
use crate::uart::DevicePath;

/// One finding about the configuration on this system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// Fine as it is.
    Ok(String),
    /// Worth knowing; the service runs.
    Note(String),
    /// The service would not start (exit 78).
    Error(String),
}

/// Everything knowable about `config` from the file and this system.
pub fn findings(config: &Config) -> Vec<Finding> {
    let mut out = Vec::new();
    let n = &config.network;
    if n.listen.is_empty() && n.raw_listen.is_empty() {
        out.push(Finding::Error(
            "[network] listen and raw_listen are both empty: clients could connect nowhere; give at least one address, e.g. listen = [\"0.0.0.0:2217\"]".into(),
        ));
    }
    out.push(device_finding(config));
    out.push(match config.control.backend {
        ControlBackend::None => Finding::Ok(
            "control lines: none (DTR/RTS acknowledged; reset the board by hand)".into(),
        ),
        ControlBackend::Gpio => match GpioLines::check(&config.control.gpio) {
            Ok(where_) => Finding::Ok(format!("control lines: {where_}")),
            Err(e) => Finding::Error(e),
        },
        ControlBackend::Modem => {
            let device = &config.serial.device;
            match DevicePath::inspect(device) {
                DevicePath::Tty => match TtyModem::probe(device) {
                    Ok(()) => Finding::Ok(format!(
                        "control lines: DTR/RTS of {}, opened with it for each client",
                        device.display()
                    )),
                    Err(e) => Finding::Error(e),
                },
                _ => Finding::Note(format!(
                    "control lines: DTR/RTS of {}, checked when it is there",
                    device.display()
                )),
            }
        }
    });
    out
}

fn device_finding(config: &Config) -> Finding {
    let device = &config.serial.device;
    let d = device.display();
    match DevicePath::inspect(device) {
        DevicePath::Tty => Finding::Ok(format!("serial device {d} is a serial port")),
        DevicePath::Missing => Finding::Note(format!(
            "serial device {d} does not exist right now; clients will be told so until it appears"
        )),
        DevicePath::Busy => Finding::Note(format!(
            "serial device {d} is in use by another program right now: `fuser -v {d}` names it"
        )),
        DevicePath::NoPermission => Finding::Note(format!(
            "no permission to open {d} as this user; the packaged service runs in group dialout"
        )),
        DevicePath::NotADevice(what) => Finding::Error(format!(
            "[serial] device {d} is {what}, not a serial device: give the board's serial port (e.g. /dev/serial0, /dev/ttyUSB0 or a /dev/serial/by-path/ name)"
        )),
        DevicePath::NotATty => Finding::Error(format!(
            "[serial] device {d} is a device but not a serial port (a terminal): give the board's serial port (e.g. /dev/serial0, /dev/ttyUSB0)"
        )),
        DevicePath::Other(e) => Finding::Note(format!("serial device {d}: {e}")),
    }
}

/// The errors among `findings`, joined for one message; `None` when there are none.
pub fn errors(findings: &[Finding]) -> Option<String> {
    let errors: Vec<&str> = findings
        .iter()
        .filter_map(|f| match f {
            Finding::Error(e) => Some(e.as_str()),
            _ => None,
        })
        .collect();
    (!errors.is_empty()).then(|| errors.join("\n"))
}

/// `esp-bridge check-config`: prints the effective configuration and the findings; an
/// error if the service would not start with it.
pub fn check_config(config: &Config, source: &crate::config::Source) -> crate::error::Result {
    let found = findings(config);
    let verdict = if errors(&found).is_some() {
        "has problems"
    } else {
        "OK"
    };
    println!("configuration from {source}: {verdict}");
    println!("\n# The effective configuration: every key, as /etc/esp-bridge.toml spells it.");
    match toml::to_string(config) {
        Ok(text) => print!("{text}"),
        Err(e) => println!("# (cannot show it: {e})"),
    }
    println!("\n# On this system:");
    for f in &found {
        match f {
            Finding::Ok(t) => println!("#   ok: {t}"),
            Finding::Note(t) => println!("#   note: {t}"),
            Finding::Error(t) => println!("#   error: {t}"),
        }
    }
    match errors(&found) {
        Some(e) => Err(crate::error::Error::config(e)),
        None => Ok(()),
    }
}
