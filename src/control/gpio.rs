//! The GPIO line driver: EN and IO0 on two GPIO lines through the kernel's GPIO character
//! device (gpiocdev), both in one line request so they change in one ioctl.
//!
//! Lines are found by name ("GPIO22"), which works on every Pi from the Zero to the Pi 5
//! whatever the chip is numbered, or by chip and offset. They are requested already at the
//! released level, so starting the service never glitches the board; before the request is
//! dropped they are driven released again, since a dropped request leaves them undefined.

use super::{LineDriver, Straps};
use crate::config::{Bias, Drive, GpioConfig, LineSpec};
use gpiocdev::line::{Offset, Value, Values};
use gpiocdev::request::Request;
use std::io;
use std::path::PathBuf;

pub struct GpioLines {
    request: Request,
    reset: Offset,
    boot: Offset,
    description: String,
}

/// A line located on a chip.
struct Located {
    chip: PathBuf,
    offset: Offset,
    name: String,
}

fn locate(spec: &LineSpec, chip: Option<&str>, key: &str) -> Result<Located, String> {
    match spec {
        LineSpec::Name(name) => {
            let found = gpiocdev::find_named_line(name).ok_or_else(|| {
                // Chips we may not open hide their lines: say so rather than "not found".
                if let Some(chip) = unreadable_chip() {
                    return format!(
                        "GPIO line \"{name}\" ([control.gpio] {key}) could not be looked up: no permission to open {}: run esp-bridge as a member of group gpio (the packaged unit does), or fix the device's permissions",
                        chip.display()
                    );
                }
                format!(
                    "GPIO line \"{name}\" ([control.gpio] {key}) was not found on any gpiochip: check the name with `gpioinfo` (on a Raspberry Pi the header pins are called GPIO0..GPIO27), or give chip = \"gpiochip0\" and the line's offset"
                )
            })?;
            Ok(Located {
                chip: found.chip,
                offset: found.info.offset,
                name: name.clone(),
            })
        }
        LineSpec::Offset(offset) => {
            let chip = chip.ok_or_else(|| {
                format!(
                    "[control.gpio] {key} = {offset} is a line offset, which needs chip = \"gpiochipN\" too (or use the line's name, e.g. \"GPIO22\")"
                )
            })?;
            let path = if chip.starts_with('/') {
                PathBuf::from(chip)
            } else {
                PathBuf::from("/dev").join(chip)
            };
            Ok(Located {
                chip: path,
                offset: *offset,
                name: format!("offset {offset}"),
            })
        }
    }
}

/// Explains a failed request in terms of what the user can do.
fn explain(e: &gpiocdev::Error, chip: &std::path::Path, lines: &str) -> String {
    let chip_s = chip.display();
    let text = e.to_string();
    let busy =
        text.contains("busy") || text.contains("EBUSY") || text.contains("Device or resource busy");
    let denied = text.contains("ermission") || text.contains("EACCES");
    if busy {
        format!(
            "GPIO lines {lines} on {chip_s} are held by another program: `gpioinfo` shows the consumer; stop it (or choose other lines in [control.gpio])"
        )
    } else if denied {
        format!(
            "no permission to use {chip_s}: run esp-bridge as a member of group gpio (the packaged unit does), or fix the device's permissions"
        )
    } else {
        format!("requesting GPIO lines {lines} on {chip_s} failed: {text}")
    }
}

impl GpioLines {
    /// Checks that the two lines exist on one chip and are free, as [`GpioLines::open`] would,
    /// without requesting them; says where they are.
    ///
    /// Lines the running service holds are not in the way: `check-config` and `esp-bridge
    /// apply` run while it serves, and apply stops it before the new configuration is used.
    pub fn check(cfg: &GpioConfig) -> Result<String, String> {
        let (reset, boot) = Self::locate_pair(cfg, Holder::ServiceMayHold)?;
        let ours = [&reset, &boot]
            .iter()
            .any(|l| consumer_of(&l.chip, l.offset).as_deref() == Some(CONSUMER));
        Ok(format!(
            "{} lines {} (EN) and {} (IO0), {}",
            reset.chip.display(),
            reset.name,
            boot.name,
            if ours {
                "held by the running esp-bridge service (free once it stops)"
            } else {
                "free"
            }
        ))
    }

    /// Finds the two lines: on one chip, distinct, not used by another program (nor, for
    /// [`Holder::NoneMayHold`], by a running esp-bridge).
    fn locate_pair(cfg: &GpioConfig, holder: Holder) -> Result<(Located, Located), String> {
        let chip = cfg.chip.as_deref();
        let reset = locate(&cfg.reset, chip, "reset")?;
        let boot = locate(&cfg.boot, chip, "boot")?;
        if reset.chip != boot.chip {
            return Err(format!(
                "[control.gpio] reset ({}) is on {} but boot ({}) is on {}: both lines must be on one gpiochip so they change together",
                reset.name,
                reset.chip.display(),
                boot.name,
                boot.chip.display()
            ));
        }
        if reset.offset == boot.offset {
            return Err(format!(
                "[control.gpio] reset and boot are the same line ({}): wire EN and IO0 to two different GPIOs",
                reset.name
            ));
        }
        for (line, key) in [(&reset, "reset"), (&boot, "boot")] {
            if let Some(consumer) = consumer_of(&line.chip, line.offset) {
                if consumer == CONSUMER && holder == Holder::ServiceMayHold {
                    continue;
                }
                if consumer == CONSUMER {
                    return Err(format!(
                        "GPIO line {} ([control.gpio] {key}) on {} is held by another esp-bridge: stop it (`systemctl stop esp-bridge`, or the esp-bridge started by hand) or configure another line",
                        line.name,
                        line.chip.display()
                    ));
                }
                return Err(format!(
                    "GPIO line {} ([control.gpio] {key}) on {} is in use by \"{consumer}\": stop that program (`gpioinfo` lists consumers), or wire and configure another line",
                    line.name,
                    line.chip.display()
                ));
            }
        }
        Ok((reset, boot))
    }

    /// Finds and requests the two lines, driving both released.
    pub fn open(cfg: &GpioConfig) -> Result<Self, String> {
        let (reset, boot) = Self::locate_pair(cfg, Holder::NoneMayHold)?;
        let mut builder = Request::builder();
        builder
            .on_chip(reset.chip.clone())
            .with_consumer(CONSUMER)
            .with_lines(&[reset.offset, boot.offset])
            .as_output(Value::Inactive);
        if cfg.active_low {
            builder.as_active_low();
        }
        builder.with_drive(match cfg.drive {
            Drive::PushPull => gpiocdev::line::Drive::PushPull,
            Drive::OpenDrain => gpiocdev::line::Drive::OpenDrain,
        });
        builder.with_bias(match cfg.bias {
            Bias::Disabled => Some(gpiocdev::line::Bias::Disabled),
            Bias::PullUp => Some(gpiocdev::line::Bias::PullUp),
            Bias::PullDown => Some(gpiocdev::line::Bias::PullDown),
            Bias::AsIs => None,
        });
        let names = format!("{} and {}", reset.name, boot.name);
        let request = builder
            .request()
            .map_err(|e| explain(&e, &reset.chip, &names))?;
        Ok(GpioLines {
            request,
            reset: reset.offset,
            boot: boot.offset,
            description: format!(
                "{} lines {} (EN) and {} (IO0), asserted = {}",
                reset.chip.display(),
                reset.name,
                boot.name,
                if cfg.active_low { "low" } else { "high" }
            ),
        })
    }
}

/// The consumer name esp-bridge requests its lines under (`gpioinfo` shows it).
const CONSUMER: &str = "esp-bridge";

/// Who may hold a board's lines when they are looked for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Holder {
    /// Opening them: nobody.
    NoneMayHold,
    /// Checking a configuration while the service runs: the service itself.
    ServiceMayHold,
}

/// The consumer holding line `offset`, if one does.
fn consumer_of(chip: &std::path::Path, offset: Offset) -> Option<String> {
    let chip = gpiocdev::chip::Chip::from_path(chip).ok()?;
    let info = chip.line_info(offset).ok()?;
    info.used.then(|| {
        if info.consumer.is_empty() {
            "an unnamed consumer".to_string()
        } else {
            info.consumer
        }
    })
}

/// A gpiochip device this process may not open, if there is one.
fn unreadable_chip() -> Option<PathBuf> {
    let entries = std::fs::read_dir("/dev").ok()?;
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("gpiochip"))
        })
        .find(|p| {
            std::fs::File::options()
                .read(true)
                .write(true)
                .open(p)
                .is_err_and(|e| e.kind() == io::ErrorKind::PermissionDenied)
        })
}

fn value(asserted: bool) -> Value {
    if asserted {
        Value::Active
    } else {
        Value::Inactive
    }
}

impl LineDriver for GpioLines {
    fn drive(&mut self, s: Straps) -> io::Result<()> {
        let mut values = Values::default();
        values.set(self.reset, value(s.reset));
        values.set(self.boot, value(s.boot));
        self.request
            .set_values(&values)
            .map_err(|e| io::Error::other(e.to_string()))
    }
    fn describe(&self) -> String {
        self.description.clone()
    }
}

impl Drop for GpioLines {
    fn drop(&mut self) {
        // A released request leaves the lines undefined: release the chip first.
        let _ = self.drive(Straps::RELEASED);
    }
}
