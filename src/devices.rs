//! `esp-bridge devices`: every serial device of this system with the names that stay put
//! (udev's /dev/serial/by-path and by-id links, esp-bridge's /dev/serial/by-uart for the
//! Pi's own UARTs), what is known of it (USB vendor, product and serial number; the UART of
//! the SoC), which board of the configuration uses it, and for the others a ready
//! `[[board]]` table.
//!
//! Everything is read below a root directory (`/` on a Pi; a fixture tree in the tests), from
//! sysfs and /dev only, with no device opened.

use crate::config::Config;
use crate::sysfs::{names_in, read_trimmed};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// One serial device.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Device {
    /// The kernel's name: ttyUSB0, ttyACM0, ttyAMA3.
    pub kernel: String,
    /// Stable names: /dev/serial/by-path/..., /dev/serial/by-id/..., /dev/serial/by-uart/...
    pub stable: Vec<String>,
    pub usb: Option<Usb>,
    /// For a UART of the SoC: its name in the device tree ("uart3").
    pub uart: Option<String>,
}

/// What a USB adapter says of itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Usb {
    pub vendor: String,
    pub product: String,
    pub serial: Option<String>,
    pub description: Option<String>,
}

/// Directories of stable links, best first: the physical port (two identical adapters
/// without serial numbers differ only there), then the adapter's identity, then the UART.
const LINK_DIRS: [&str; 3] = [
    "dev/serial/by-path",
    "dev/serial/by-id",
    "dev/serial/by-uart",
];

/// The kernel name a /dev path or link under `root` leads to ("ttyUSB0").
fn kernel_name(root: &Path, dev_path: &Path) -> Option<String> {
    let mut path = root.join(dev_path.strip_prefix("/").unwrap_or(dev_path));
    // A few levels of links at most (by-path -> ../../ttyUSB0).
    for _ in 0..8 {
        match std::fs::read_link(&path) {
            Ok(target) => {
                let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
                path = if target.is_absolute() {
                    root.join(target.strip_prefix("/").unwrap_or(&target))
                } else {
                    base.join(target)
                };
            }
            Err(_) => break,
        }
    }
    path.file_name()?.to_str().map(str::to_string)
}

/// The stable links under `root` that lead to `device`.
pub fn stable_names(root: &Path, device: &Path) -> Vec<String> {
    let Some(kernel) = kernel_name(root, device) else {
        return Vec::new();
    };
    links(root).remove(&kernel).unwrap_or_default()
}

/// Stable links by the kernel name they lead to.
fn links(root: &Path) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for dir in LINK_DIRS {
        for name in names_in(&root.join(dir)) {
            let link = format!("/{dir}/{name}");
            if let Some(kernel) = kernel_name(root, Path::new(&link)) {
                out.entry(kernel).or_default().push(link);
            }
        }
    }
    out
}

/// Whether a tty is real hardware worth listing: USB serial, the Pi's UARTs, and 8250 ports
/// that exist (a PC lists 32 ttyS placeholders of type 0).
fn is_serial(sys_tty: &Path, name: &str) -> bool {
    if !sys_tty.join("device").exists() {
        return false;
    }
    if name.starts_with("ttyS") {
        return read_trimmed(&sys_tty.join("type")).is_some_and(|t| t != "0");
    }
    ["ttyUSB", "ttyACM", "ttyAMA", "ttyAML", "ttySC"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// The USB device above a tty's interface: the first directory upwards with an idVendor.
fn usb_of(device_dir: &Path) -> Option<Usb> {
    let mut dir = std::fs::canonicalize(device_dir).ok()?;
    for _ in 0..6 {
        if dir.join("idVendor").exists() {
            return Some(Usb {
                vendor: read_trimmed(&dir.join("idVendor"))?,
                product: read_trimmed(&dir.join("idProduct")).unwrap_or_default(),
                serial: read_trimmed(&dir.join("serial")),
                description: match (
                    read_trimmed(&dir.join("manufacturer")),
                    read_trimmed(&dir.join("product")),
                ) {
                    (Some(m), Some(p)) => Some(format!("{m} {p}")),
                    (m, p) => m.or(p),
                },
            });
        }
        dir = dir.parent()?.to_path_buf();
    }
    None
}

/// Every serial device below `root`.
pub fn scan(root: &Path) -> Vec<Device> {
    let mut links = links(root);
    let Ok(entries) = std::fs::read_dir(root.join("sys/class/tty")) else {
        return Vec::new();
    };
    let mut out: Vec<Device> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let sys = e.path();
            is_serial(&sys, &name).then(|| Device {
                stable: links.remove(&name).unwrap_or_default(),
                usb: usb_of(&sys.join("device")),
                uart: crate::pi_uarts::controller_of(root, &name),
                kernel: name,
            })
        })
        .collect();
    out.sort_by(|a, b| a.kernel.cmp(&b.kernel));
    out
}

/// The board of `config` that uses `device`, by any of its names.
fn user<'a>(config: &'a Config, root: &Path, device: &Device) -> Option<&'a str> {
    config
        .boards
        .iter()
        .find(|b| kernel_name(root, &b.serial.device).as_deref() == Some(&device.kernel))
        .map(|b| b.name.as_str())
}

/// The report `esp-bridge devices` prints.
pub fn report(config: &Config, root: &Path) -> String {
    let devices = scan(root);
    let mut out = String::new();
    if devices.is_empty() {
        out.push_str("no serial devices found (USB adapters, the Pi's UARTs)\n");
        return out;
    }
    let mut next_port = config
        .boards
        .iter()
        .flat_map(|b| b.ports())
        .map(|(a, _)| a.port())
        .max()
        .map_or(2217, |p| p.saturating_add(1));
    let mut next_board = config.boards.len() + 1;
    let mut unused = 0;
    for d in &devices {
        let _ = writeln!(out, "/dev/{}", d.kernel);
        for name in &d.stable {
            let _ = writeln!(out, "  stable name: {name}");
        }
        if let Some(usb) = &d.usb {
            let _ = writeln!(
                out,
                "  USB {}:{}{}{}",
                usb.vendor,
                usb.product,
                usb.description
                    .as_deref()
                    .map(|s| format!(" {s}"))
                    .unwrap_or_default(),
                match &usb.serial {
                    Some(s) => format!(", serial {s}"),
                    None => ", no serial number: tell identical adapters apart by the USB port (by-path)".into(),
                }
            );
        }
        if let Some(uart) = &d.uart {
            let _ = writeln!(out, "  the SoC's {uart}");
        }
        match user(config, root, d) {
            Some(board) => {
                let _ = writeln!(out, "  used by board {board}");
            }
            None => {
                let device = d
                    .stable
                    .first()
                    .cloned()
                    .unwrap_or_else(|| format!("/dev/{}", d.kernel));
                let (rfc, raw) = (next_port, next_port.saturating_add(1));
                next_port = next_port.saturating_add(2);
                let control = if d.usb.is_some() {
                    "[board.control]\nbackend = \"modem\"   # a dev board's USB adapter: its DTR/RTS drive EN and IO0\n"
                } else {
                    "[board.control.gpio]   # the two Pi GPIOs wired to this board's EN and IO0\nreset = \"GPIO?\"\nboot = \"GPIO?\"\n"
                };
                unused += 1;
                let _ = writeln!(
                    out,
                    "  not used: add it to the configuration as\n\n[[board]]\nname = \"board{next_board}\"\ndevice = \"{device}\"\nlisten = [\"0.0.0.0:{rfc}\"]\nraw_listen = [\"0.0.0.0:{raw}\"]\n{control}"
                );
                next_board += 1;
            }
        }
    }
    if unused > 0
        && let [only] = config.boards.as_slice()
        && only.name == crate::config::DEFAULT_BOARD
    {
        let list = |a: &[std::net::SocketAddr]| {
            a.iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "note: the configuration describes its one board in [serial] and [network]; to add \
             [[board]] tables, first move that board into one of its own (and delete device \
             from [serial], listen and raw_listen from [network]):\n\n[[board]]\nname = \"board1\"\n\
             device = \"{}\"\nlisten = [{}]\nraw_listen = [{}]",
            only.serial.device.display(),
            list(&only.listen),
            list(&only.raw_listen)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A sysfs and /dev tree as a Raspberry Pi 4 with three USB adapters and UART3 shows it:
    /// an FTDI with a serial number, and two identical CH340s without one (same by-id name,
    /// so udev keeps one link for both; only by-path tells them apart).
    fn fixture() -> std::path::PathBuf {
        let root = std::env::temp_dir().join(format!(
            "esp-bridge-devices-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&root);
        let w = |p: &str, text: &str| {
            let path = root.join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        let dir = |p: &str| std::fs::create_dir_all(root.join(p)).unwrap();
        let link = |target: &str, p: &str| {
            let path = root.join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            symlink(target, path).unwrap();
        };
        // USB devices (idVendor in the device, the tty under its interface).
        for (usb, vendor, product, serial, manuf, prod) in [
            (
                "1-1.1",
                "0403",
                "6001",
                Some("A50285BI"),
                "FTDI",
                "FT232R USB UART",
            ),
            ("1-1.2", "1a86", "7523", None, "QinHeng", "USB Serial"),
            ("1-1.3", "1a86", "7523", None, "QinHeng", "USB Serial"),
        ] {
            let d = format!("sys/devices/usb1/{usb}");
            w(&format!("{d}/idVendor"), &format!("{vendor}\n"));
            w(&format!("{d}/idProduct"), &format!("{product}\n"));
            w(&format!("{d}/manufacturer"), manuf);
            w(&format!("{d}/product"), prod);
            if let Some(s) = serial {
                w(&format!("{d}/serial"), s);
            }
            dir(&format!("{d}/{usb}:1.0/tty"));
        }
        for (tty, usb) in [
            ("ttyUSB0", "1-1.1"),
            ("ttyUSB1", "1-1.2"),
            ("ttyUSB2", "1-1.3"),
        ] {
            dir(&format!("sys/class/tty/{tty}"));
            link(
                &format!("../../../devices/usb1/{usb}/{usb}:1.0"),
                &format!("sys/class/tty/{tty}/device"),
            );
        }
        link(
            "../../ttyUSB0",
            "dev/serial/by-path/platform-fd500000.pcie-usb-0:1.1:1.0-port0",
        );
        link(
            "../../ttyUSB1",
            "dev/serial/by-path/platform-fd500000.pcie-usb-0:1.2:1.0-port0",
        );
        link(
            "../../ttyUSB2",
            "dev/serial/by-path/platform-fd500000.pcie-usb-0:1.3:1.0-port0",
        );
        link(
            "../../ttyUSB0",
            "dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0",
        );
        // Identical CH340s share a by-id name: udev keeps the last one's link.
        link(
            "../../ttyUSB2",
            "dev/serial/by-id/usb-1a86_USB_Serial-if00-port0",
        );
        // UART3 of a Pi 4 (PL011 at 7e201600), enabled as ttyAMA1 by an old kernel.
        dir("sys/firmware/devicetree/base/soc/serial@7e201600");
        dir("sys/devices/platform/soc/fe201600.serial");
        link(
            "../../../../firmware/devicetree/base/soc/serial@7e201600",
            "sys/devices/platform/soc/fe201600.serial/of_node",
        );
        dir("sys/class/tty/ttyAMA1");
        link(
            "../../../devices/platform/soc/fe201600.serial",
            "sys/class/tty/ttyAMA1/device",
        );
        w("proc/device-tree/aliases/uart3", "/soc/serial@7e201600\0");
        w("proc/device-tree/aliases/uart0", "/soc/serial@7e201000\0");
        link("../../ttyAMA1", "dev/serial/by-uart/uart3");
        // A virtual console and an 8250 placeholder: not serial devices worth listing.
        dir("sys/class/tty/tty1");
        dir("sys/class/tty/ttyS5");
        dir("sys/class/tty/ttyS5/device");
        w("sys/class/tty/ttyS5/type", "0\n");
        root
    }

    #[test]
    fn every_adapter_is_listed_with_its_stable_names_and_usb_identity() {
        let root = fixture();
        let found = scan(&root);
        let names: Vec<&str> = found.iter().map(|d| d.kernel.as_str()).collect();
        assert_eq!(names, ["ttyAMA1", "ttyUSB0", "ttyUSB1", "ttyUSB2"]);
        let ftdi = &found[1];
        assert_eq!(
            ftdi.stable,
            [
                "/dev/serial/by-path/platform-fd500000.pcie-usb-0:1.1:1.0-port0",
                "/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0"
            ]
        );
        let usb = ftdi.usb.as_ref().unwrap();
        assert_eq!(
            (
                usb.vendor.as_str(),
                usb.product.as_str(),
                usb.serial.as_deref()
            ),
            ("0403", "6001", Some("A50285BI"))
        );
        // The CH340 without a serial number: by-path is what tells the two apart.
        assert_eq!(found[2].usb.as_ref().unwrap().serial, None);
        assert_eq!(
            found[2].stable,
            ["/dev/serial/by-path/platform-fd500000.pcie-usb-0:1.2:1.0-port0"]
        );
        assert_eq!(found[3].stable.len(), 2);
        assert_ne!(found[2].stable[0], found[3].stable[0]);
        // The SoC's UART3 is named for what it is, whatever ttyAMA number it got.
        assert_eq!(found[0].uart.as_deref(), Some("uart3"));
        assert_eq!(found[0].stable, ["/dev/serial/by-uart/uart3"]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_report_says_which_board_uses_what_and_offers_a_table_for_the_rest() {
        let root = fixture();
        let mut config = Config::default();
        config.boards[0].serial.device =
            "/dev/serial/by-path/platform-fd500000.pcie-usb-0:1.1:1.0-port0".into();
        let text = report(&config, &root);
        assert!(text.contains("/dev/ttyUSB0\n"), "{text}");
        assert!(text.contains("used by board default"), "{text}");
        assert!(text.contains("no serial number"), "{text}");
        // The next free ports after the default board's 2217/2218, one pair per device, in
        // the order the devices are listed (ttyAMA1, ttyUSB1, ttyUSB2).
        assert!(
            text.contains("device = \"/dev/serial/by-uart/uart3\"\nlisten = [\"0.0.0.0:2219\"]\nraw_listen = [\"0.0.0.0:2220\"]"),
            "{text}"
        );
        assert!(
            text.contains("device = \"/dev/serial/by-path/platform-fd500000.pcie-usb-0:1.2:1.0-port0\"\nlisten = [\"0.0.0.0:2221\"]\nraw_listen = [\"0.0.0.0:2222\"]"),
            "{text}"
        );
        assert!(text.contains("listen = [\"0.0.0.0:2223\"]"), "{text}");
        assert!(text.contains("backend = \"modem\""), "{text}");
        // A ready table parses as part of a configuration.
        let table = text.split("\n\n").nth(1).unwrap();
        let file = format!("{table}\n");
        let parsed = Config::parse(&file, Path::new("snippet.toml")).unwrap();
        assert_eq!(parsed.boards[0].name, "board2");
        assert_eq!(
            stable_names(&root, Path::new("/dev/ttyUSB1")),
            ["/dev/serial/by-path/platform-fd500000.pcie-usb-0:1.2:1.0-port0"]
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
