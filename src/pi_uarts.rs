//! The Raspberry Pi's own UARTs: which controller a tty is, what turns one on, and which
//! header pins it takes.
//!
//! The `ttyAMA` number of an extra UART is no name to keep in a config: before 2023 kernels
//! and firmware numbered the PL011s in the order their overlays were enabled, so turning on
//! uart2 could move uart3 from ttyAMA2 to ttyAMA3. The controller's own name in the device
//! tree ("uart3") never moves, so esp-bridge's udev rule links `/dev/serial/by-uart/uart3` to
//! whatever tty that controller got (`esp-bridge uart-name`), and `setup-pi` turns on the
//! controllers the boards of the config name that way.

use crate::sysfs::{names_in, read_trimmed};
use std::path::Path;

/// Where the udev rule puts the links.
pub const BY_UART_DIR: &str = "/dev/serial/by-uart";

/// The board families whose UARTs differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Pi 0-3: the PL011 (uart0) and the mini UART (uart1) only.
    Classic,
    /// Pi 4, 400, CM4: PL011s uart0 and uart2-5, the mini UART uart1.
    Pi4,
    /// Pi 5, CM5: RP1's uart0-4, and uart10 on the debug connector.
    Pi5,
}

impl Family {
    /// The family of the board `/proc/device-tree/model` names.
    pub fn of_model(model: &str) -> Family {
        if model.contains("Raspberry Pi 5") || model.contains("Compute Module 5") {
            Family::Pi5
        } else if model.contains("Raspberry Pi 4")
            || model.contains("Raspberry Pi 400")
            || model.contains("Compute Module 4")
        {
            Family::Pi4
        } else {
            Family::Classic
        }
    }
}

/// How a UART of a family is turned on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enable {
    /// The header's primary UART (GPIO14/15), which setup-pi always frees.
    Primary,
    /// On without any config.txt line (the Pi 5's debug connector).
    AlwaysOn,
    /// This config.txt line (`dtoverlay=uart3`) turns it on, taking these two header GPIOs
    /// (TX, RX).
    Overlay { line: String, pins: [u32; 2] },
}

/// The controller index of a `/dev/serial/by-uart/uartN` device name.
pub fn by_uart_index(device: &Path) -> Option<u8> {
    let rest = device
        .to_str()?
        .strip_prefix(BY_UART_DIR)?
        .strip_prefix('/')?;
    controller_index(rest)
}

/// `3` for "uart3"; `None` for anything else.
fn controller_index(name: &str) -> Option<u8> {
    let digits = name.strip_prefix("uart")?;
    if digits.is_empty() || digits.len() > 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// How controller `uart{index}` is turned on on `family`, or why it cannot be used.
pub fn enable(family: Family, index: u8) -> Result<Enable, String> {
    let overlay = |name: String, tx: u32| Enable::Overlay {
        line: format!("dtoverlay={name}"),
        pins: [tx, tx + 1],
    };
    match (family, index) {
        (_, 0) => Ok(Enable::Primary),
        (Family::Pi5, 10) => Ok(Enable::AlwaysOn),
        (Family::Classic | Family::Pi4, 1) => Err(
            "uart1 is the mini UART, whose rate follows the core clock and which setup-pi gives up for the PL011; \
             use a PL011 (uart0, or uart2-5 on a Pi 4) or a USB adapter"
                .to_string(),
        ),
        // uart2 GPIO0/1, uart3 GPIO4/5, uart4 GPIO8/9, uart5 GPIO12/13.
        (Family::Pi4, 2..=5) => Ok(overlay(format!("uart{index}"), (u32::from(index) - 2) * 4)),
        // uart1 GPIO0/1, uart2 GPIO4/5, uart3 GPIO8/9, uart4 GPIO12/13.
        (Family::Pi5, 1..=4) => Ok(overlay(format!("uart{index}-pi5"), (u32::from(index) - 1) * 4)),
        (Family::Classic, _) => Err(format!(
            "this board has no uart{index}: before the Pi 4 there are uart0 and the mini UART only; use a USB adapter"
        )),
        (Family::Pi4, _) => Err(format!("a Pi 4 has uart0 and uart2-5, no uart{index}")),
        (Family::Pi5, _) => Err(format!("a Pi 5 has uart0-4 and uart10, no uart{index}")),
    }
}

/// The header GPIO a config line names: "GPIO4" by name, or offset 4 (the header's lines are
/// offsets 0-27 of the Pi's pin controller).
pub fn header_gpio(name: Option<&str>, offset: Option<u32>) -> Option<u32> {
    match (name, offset) {
        (Some(name), _) => match name {
            "ID_SDA" => Some(0),
            "ID_SCL" => Some(1),
            _ => name.strip_prefix("GPIO")?.parse().ok(),
        },
        (None, Some(offset)) => Some(offset),
        (None, None) => None,
    }
}

/// The controller ("uart3") whose tty is `tty` ("ttyAMA1"), from the tty's device-tree node
/// and the tree's own labels (`__symbols__`, which every Pi device tree carries for its
/// overlays) or, failing those, its `uartN` aliases. Everything is read below `root`.
pub fn controller_of(root: &Path, tty: &str) -> Option<String> {
    if tty.is_empty() || tty.contains('/') || tty.starts_with('.') {
        return None;
    }
    let node =
        std::fs::canonicalize(root.join("sys/class/tty").join(tty).join("device/of_node")).ok()?;
    let node = node.to_str()?.to_string();
    let base = root.join("proc/device-tree");
    for dir in ["__symbols__", "aliases"] {
        for name in names_in(&base.join(dir)) {
            let plain = name.strip_prefix("rp1_").unwrap_or(&name);
            if controller_index(plain).is_none() {
                continue;
            }
            // The label's value is the node's full path ("/soc/serial@7e201600"); the of_node
            // link ends in the same path below /sys/firmware/devicetree/base.
            if let Some(path) = read_trimmed(&base.join(dir).join(&name))
                && path.starts_with('/')
                && node.ends_with(&path)
            {
                return Some(plain.to_string());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_from_model_strings() {
        assert_eq!(
            Family::of_model("Raspberry Pi 4 Model B Rev 1.4"),
            Family::Pi4
        );
        assert_eq!(Family::of_model("Raspberry Pi 400 Rev 1.0"), Family::Pi4);
        assert_eq!(
            Family::of_model("Raspberry Pi Compute Module 4 Rev 1.0"),
            Family::Pi4
        );
        assert_eq!(
            Family::of_model("Raspberry Pi 5 Model B Rev 1.0"),
            Family::Pi5
        );
        assert_eq!(
            Family::of_model("Raspberry Pi 3 Model B Plus Rev 1.3"),
            Family::Classic
        );
    }

    #[test]
    fn overlays_and_pins_per_family() {
        let line = |f, i| match enable(f, i) {
            Ok(Enable::Overlay { line, pins }) => (line, pins),
            other => panic!("uart{i}: {other:?}"),
        };
        assert_eq!(line(Family::Pi4, 2), ("dtoverlay=uart2".into(), [0, 1]));
        assert_eq!(line(Family::Pi4, 3), ("dtoverlay=uart3".into(), [4, 5]));
        assert_eq!(line(Family::Pi4, 5), ("dtoverlay=uart5".into(), [12, 13]));
        assert_eq!(line(Family::Pi5, 1), ("dtoverlay=uart1-pi5".into(), [0, 1]));
        assert_eq!(
            line(Family::Pi5, 4),
            ("dtoverlay=uart4-pi5".into(), [12, 13])
        );
        assert_eq!(enable(Family::Pi5, 0), Ok(Enable::Primary));
        assert_eq!(enable(Family::Pi5, 10), Ok(Enable::AlwaysOn));
        assert!(enable(Family::Pi4, 1).unwrap_err().contains("mini UART"));
        assert!(enable(Family::Pi4, 6).is_err());
        assert!(enable(Family::Pi5, 5).is_err());
        assert!(
            enable(Family::Classic, 2)
                .unwrap_err()
                .contains("USB adapter")
        );
    }

    #[test]
    fn by_uart_names() {
        assert_eq!(
            by_uart_index(Path::new("/dev/serial/by-uart/uart3")),
            Some(3)
        );
        assert_eq!(
            by_uart_index(Path::new("/dev/serial/by-uart/uart10")),
            Some(10)
        );
        for other in [
            "/dev/serial/by-uart/uart",
            "/dev/serial/by-uart/uart3x",
            "/dev/serial/by-uart/uart123",
            "/dev/serial/by-uart/../uart3",
            "/dev/ttyAMA3",
        ] {
            assert_eq!(by_uart_index(Path::new(other)), None, "{other}");
        }
    }

    #[test]
    fn header_gpios_by_name_or_offset() {
        assert_eq!(header_gpio(Some("GPIO4"), None), Some(4));
        assert_eq!(header_gpio(Some("ID_SDA"), None), Some(0));
        assert_eq!(header_gpio(Some("LED"), None), None);
        assert_eq!(header_gpio(None, Some(13)), Some(13));
    }
}
