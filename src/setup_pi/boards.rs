//! The UARTs the boards of the configuration use beyond the header's primary one: the
//! config.txt lines that turn them on for this board family, checked against the GPIO lines
//! the boards drive (an overlay takes its two pins from whatever else used them).

use crate::config::{Config, ControlBackend, LineSpec};
use crate::pi_uarts::{self, Enable, Family};

/// What the boards need of config.txt.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct BoardUarts {
    /// `dtoverlay=uartN` lines, in board order, without repeats.
    pub(super) overlays: Vec<String>,
    /// Things the user should know.
    pub(super) notes: Vec<String>,
}

/// The header GPIO a configured line is, when it is one of the Pi's own (by name, or by
/// offset on the Pi's pin controller).
fn header_line(line: &LineSpec, chip: Option<&str>) -> Option<u32> {
    match line {
        LineSpec::Name(name) => pi_uarts::header_gpio(Some(name), None),
        LineSpec::Offset(offset) => {
            let on_pinctrl = chip.is_none_or(|c| c.contains("pinctrl") || c.ends_with("gpiochip0"));
            on_pinctrl.then(|| pi_uarts::header_gpio(None, Some(*offset)))?
        }
    }
}

/// Plans the UARTs of `config`'s boards on a board of `family`; an error (nothing is to be
/// changed then) when a board names a UART this Pi does not have, or a UART whose pins
/// another board drives as its reset or boot line.
/// `family` is `None` when the board is not known (`--assume-pi` in a chroot).
pub(super) fn plan(config: &Config, family: Option<Family>) -> Result<BoardUarts, String> {
    let mut out = BoardUarts::default();
    // (pin, the UART's index, the board using that UART)
    let mut taken: Vec<(u32, u8, &str)> = Vec::new();
    for board in &config.boards {
        let device = &board.serial.device;
        if family == Some(Family::Pi5) && device.as_os_str() == "/dev/serial0" {
            out.notes.push(format!(
                "board {}: on a Pi 5 /dev/serial0 is the debug connector's UART, not GPIO14/15; for the header's UART use /dev/ttyAMA0 (or {}/uart0)",
                board.name,
                pi_uarts::BY_UART_DIR
            ));
        }
        let Some(index) = pi_uarts::by_uart_index(device) else {
            let name = device
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name.starts_with("ttyAMA") && name != "ttyAMA0" {
                out.notes.push(format!(
                    "board {}: {} is a kernel number, not a UART: setup-pi turns on only UARTs named {}/uartN",
                    board.name,
                    device.display(),
                    pi_uarts::BY_UART_DIR
                ));
            }
            continue;
        };
        let Some(family) = family.or((index == 0).then_some(Family::Classic)) else {
            return Err(format!(
                "board {}: {}: which UARTs a Pi has and how they are turned on depends on the model, and this system does not say which it is; nothing was changed.\n  \
                 hint: put the board's name (e.g. \"Raspberry Pi 4 Model B\") in <root>/proc/device-tree/model",
                board.name,
                device.display()
            ));
        };
        match pi_uarts::enable(family, index) {
            Err(why) => {
                return Err(format!(
                    "board {}: {}: {why}; nothing was changed.\n  hint: fix the board's device in the configuration (`esp-bridge devices` lists what this Pi has)",
                    board.name,
                    device.display()
                ));
            }
            Ok(Enable::Primary | Enable::AlwaysOn) => {}
            Ok(Enable::Overlay { line, pins }) => {
                for pin in pins {
                    taken.push((pin, index, &board.name));
                }
                if !out.overlays.contains(&line) {
                    out.overlays.push(line);
                }
            }
        }
    }
    for board in &config.boards {
        let control = &board.control;
        if control.backend != ControlBackend::Gpio {
            continue;
        }
        let gpio = &control.gpio;
        for (role, line) in [("reset", &gpio.reset), ("boot", &gpio.boot)] {
            let Some(pin) = header_line(line, gpio.chip.as_deref()) else {
                continue;
            };
            if let Some((_, index, user)) = taken.iter().find(|(p, _, _)| *p == pin) {
                let (uart, other) = if *user == board.name {
                    (format!("its own uart{index}"), String::new())
                } else {
                    (
                        format!("uart{index} of board {user}"),
                        format!(", or give board {user} another UART"),
                    )
                };
                return Err(format!(
                    "board {} drives GPIO{pin} as its {role} line, but {uart} takes GPIO{pin} on this Pi; nothing was changed.\n  \
                     hint: wire board {}'s {role} line to a free GPIO and set it in the configuration{other}",
                    board.name, board.name
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(text: &str) -> Config {
        Config::parse(text, Path::new("test.toml")).expect("valid test configuration")
    }

    const TWO_UARTS: &str = r#"
[control]
backend = "gpio"
[[board]]
name = "a"
device = "/dev/serial/by-uart/uart3"
listen = ["0.0.0.0:2217"]
raw_listen = ["0.0.0.0:2218"]
control.gpio = { reset = "GPIO17", boot = "GPIO27" }
[[board]]
name = "b"
device = "/dev/serial/by-uart/uart4"
listen = ["0.0.0.0:2219"]
raw_listen = ["0.0.0.0:2220"]
control.gpio = { reset = "GPIO22", boot = "GPIO23" }
"#;

    #[test]
    fn a_pi_4_and_a_pi_5_get_their_own_overlays() {
        let c = config(TWO_UARTS);
        assert_eq!(
            plan(&c, Some(Family::Pi4)).map(|p| p.overlays),
            Ok(vec![
                "dtoverlay=uart3".to_string(),
                "dtoverlay=uart4".to_string()
            ])
        );
        assert_eq!(
            plan(&c, Some(Family::Pi5)).map(|p| p.overlays),
            Ok(vec![
                "dtoverlay=uart3-pi5".to_string(),
                "dtoverlay=uart4-pi5".to_string()
            ])
        );
        let e = plan(&c, Some(Family::Classic)).unwrap_err();
        assert!(e.contains("board a") && e.contains("no uart3"), "{e}");
        let e = plan(&c, None).unwrap_err();
        assert!(e.contains("depends on the model"), "{e}");
    }

    #[test]
    fn a_line_on_a_uarts_pin_is_refused_naming_both() {
        // uart3 of a Pi 4 takes GPIO4/5; on a Pi 5 uart3 takes GPIO8/9 and GPIO4 is free.
        let c = config(&TWO_UARTS.replace("GPIO23", "GPIO4"));
        let e = plan(&c, Some(Family::Pi4)).unwrap_err();
        assert!(
            e.contains("board b drives GPIO4 as its boot line") && e.contains("uart3 of board a"),
            "{e}"
        );
        assert!(e.contains("or give board a another UART"), "{e}");
        // Its own UART's pin: no other board to blame.
        let c = config(&TWO_UARTS.replace("GPIO17", "GPIO5"));
        let e = plan(&c, Some(Family::Pi4)).unwrap_err();
        assert!(
            e.contains("board a drives GPIO5 as its reset line, but its own uart3 takes GPIO5"),
            "{e}"
        );
        assert!(!e.contains("another UART"), "{e}");
        assert!(plan(&c, Some(Family::Pi5)).is_ok());
    }

    #[test]
    fn primary_usb_and_kernel_numbered_devices_need_no_overlay() {
        let c = config(
            r#"
[[board]]
name = "a"
device = "/dev/serial0"
listen = ["0.0.0.0:2217"]
[[board]]
name = "b"
device = "/dev/ttyAMA3"
listen = ["0.0.0.0:2219"]
control.gpio = { reset = "GPIO5", boot = "GPIO6" }
[[board]]
name = "c"
device = "/dev/serial/by-uart/uart10"
listen = ["0.0.0.0:2221"]
control.backend = "none"
"#,
        );
        let p = plan(&c, Some(Family::Pi5)).expect("plan");
        assert!(p.overlays.is_empty());
        assert!(p.notes.len() == 2, "{:?}", p.notes);
        assert!(p.notes[0].contains("board a") && p.notes[0].contains("debug connector"));
        assert!(p.notes[1].contains("board b") && p.notes[1].contains("kernel number"));
        let e = plan(&c, Some(Family::Pi4)).unwrap_err();
        assert!(e.contains("board c") && e.contains("no uart10"), "{e}");
    }
}
