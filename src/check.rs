//! What the configuration means on this system: the checks the service makes before it
//! serves (an error stops it with exit 78) and `check-config`, which makes the same checks,
//! prints the effective configuration in the file's own spelling, and fails where the service
//! would.

use crate::config::{BoardConfig, Config, ControlBackend};
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
    let many = config.boards.len() > 1;
    let mut out = Vec::new();
    for board in &config.boards {
        let named = |f: Finding| {
            if !many {
                return f;
            }
            let tag = |t: String| format!("board {}: {t}", board.name);
            match f {
                Finding::Ok(t) => Finding::Ok(tag(t)),
                Finding::Note(t) => Finding::Note(tag(t)),
                Finding::Error(t) => Finding::Error(tag(t)),
            }
        };
        if board.listen.is_empty() && board.raw_listen.is_empty() {
            out.push(named(Finding::Error(
                "listen and raw_listen are both empty: clients could connect nowhere; give at least one address, e.g. listen = [\"0.0.0.0:2217\"]".into(),
            )));
        }
        out.push(named(device_finding(board)));
        if let Some(note) = unstable_name(&board.serial.device) {
            out.push(named(Finding::Note(note)));
        }
        out.push(named(control_finding(board)));
        if board.serial.journal {
            out.push(named(Finding::Ok(format!(
                "output to the journal, line by line (journalctl -u esp-bridge BOARD={}); the device is read from the service's start, which the systemd units then do at boot",
                board.name
            ))));
            if let Some(after) = config.network.idle_exit {
                out.push(named(Finding::Note(format!(
                    "idle_exit_secs = {} does not apply while a board's output goes to the journal",
                    after.as_secs()
                ))));
            }
        }
    }
    // Two names for one device (a by-path link and the tty itself).
    for (i, a) in config.boards.iter().enumerate() {
        let Ok(real_a) = std::fs::canonicalize(&a.serial.device) else {
            continue;
        };
        for b in &config.boards[..i] {
            if std::fs::canonicalize(&b.serial.device).is_ok_and(|real_b| real_b == real_a) {
                out.push(Finding::Error(format!(
                    "boards {} and {} both use {} ({} and {} are the same device): each board has its own serial device",
                    b.name,
                    a.name,
                    real_a.display(),
                    b.serial.device.display(),
                    a.serial.device.display()
                )));
            }
        }
    }
    out
}

fn control_finding(board: &BoardConfig) -> Finding {
    match board.control.backend {
        ControlBackend::None => Finding::Ok(
            "control lines: none (DTR/RTS acknowledged; reset the board by hand)".into(),
        ),
        ControlBackend::Gpio => match GpioLines::check(&board.control.gpio) {
            Ok(where_) => Finding::Ok(format!("control lines: {where_}")),
            Err(e) => Finding::Error(e),
        },
        ControlBackend::Modem => {
            let device = &board.serial.device;
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
    }
}

/// A note when `device` is a kernel name that can move, naming the stable links to it this
/// system has: ttyUSB0 and ttyACM0 are numbered in the order adapters appear, and the Pi's
/// extra UARTs (ttyAMA1 and up) were numbered in the order they were enabled before 2023.
fn unstable_name(device: &std::path::Path) -> Option<String> {
    let name = device.file_name()?.to_str()?;
    if device.parent() != Some(std::path::Path::new("/dev")) {
        return None;
    }
    let why = if name.starts_with("ttyUSB") || name.starts_with("ttyACM") {
        "can change name when adapters are plugged in another order or the Pi reboots"
    } else if name.starts_with("ttyAMA") && name != "ttyAMA0" {
        "is numbered by the kernel, and older kernels and firmware numbered the extra UARTs in the order they were enabled"
    } else {
        return None;
    };
    let d = device.display();
    let stable = crate::devices::stable_names(std::path::Path::new("/"), device);
    Some(if !stable.is_empty() {
        format!(
            "{d} {why}; use a stable name for it: {}",
            stable.join(" or ")
        )
    } else if name.starts_with("ttyAMA") {
        format!(
            "{d} {why}; name the UART by its controller instead: {}/uartN (N as in dtoverlay=uartN), a link esp-bridge's udev rule makes",
            crate::pi_uarts::BY_UART_DIR
        )
    } else {
        format!(
            "{d} {why}; when it is plugged in, `esp-bridge devices` shows its stable names (/dev/serial/by-path/...)"
        )
    })
}

fn device_finding(board: &BoardConfig) -> Finding {
    let device = &board.serial.device;
    let d = device.display();
    match DevicePath::inspect(device) {
        DevicePath::Tty => Finding::Ok(format!("serial device {d} is a serial port")),
        DevicePath::Missing if crate::pi_uarts::by_uart_index(device).is_some() => {
            Finding::Note(format!(
                "serial device {d} does not exist right now: that UART is off, or the udev rule naming it has not run; \
                 `sudo esp-bridge setup-pi` turns on the UARTs the boards use (then reboot); clients will be told so until it appears"
            ))
        }
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
    print!("{}", config.to_toml());
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
