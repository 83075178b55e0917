//! `esp-bridge labgrid`: a labgrid exporter configuration for the boards of this machine, so
//! that a lab's labgrid coordinator books them (places, tags, reservations, locks) and its
//! clients reach them through `NetworkSerialPort` resources, instead of a booking service of
//! esp-bridge's own. One resource group per board, so that one labgrid place matches one
//! board (`EXPORTER/BOARD/*`), holding the board's RFC 2217 port (labgrid's `SerialDriver`
//! and `labgrid-client console` speak RFC 2217) and its raw port (for esptool's `socket://`).
//!
//! A lock in labgrid is the coordinator's record, not a gate on the TCP port: esp-bridge's own
//! sharing rules (one writer, watchers) still apply to whoever connects.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::protocol::PortKind;
use std::fmt::Write as _;
use std::net::SocketAddr;

/// The exporter's and the places' names, and the host the clients are to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exported {
    /// `labgrid-exporter --name`: the first part of every resource's name.
    pub exporter: String,
    /// The host name or address clients use for ports bound to every address.
    pub host: String,
}

impl Exported {
    /// `--name` and `--host`, or this machine's host name (and its `.local` mDNS name, which
    /// Raspberry Pi OS's avahi-daemon answers for).
    pub fn new(exporter: Option<String>, host: Option<String>) -> Result<Exported> {
        let hostname = || {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
        };
        let exporter = match exporter.or_else(hostname) {
            Some(e) => e,
            None => {
                return Err(Error::usage(
                    "this machine's host name is unknown: give the exporter's name with --name",
                ));
            }
        };
        let host = match host {
            Some(h) => h,
            None => format!("{}.local", hostname().unwrap_or_else(|| exporter.clone())),
        };
        for (flag, value) in [("--name", &exporter), ("--host", &host)] {
            let fine = !value.is_empty()
                && value.len() <= 253
                && value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-_:[]".contains(c));
            if !fine {
                return Err(Error::usage(format!(
                    "{flag} {value:?}: use a host name or an address (letters, digits, '.', '-', '_', ':')"
                )));
            }
        }
        Ok(Exported { exporter, host })
    }

    /// Where a client reaches a port bound to `addr`.
    fn host_for(&self, addr: &SocketAddr) -> String {
        match addr {
            a if a.ip().is_unspecified() => self.host.clone(),
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
        }
    }
}

/// The exporter configuration (YAML) for `config`'s boards, with the commands that make a
/// place for each board in its comments. labgrid reads the file as a Jinja2 template whose
/// line statements start with `#`: comments there are `##`.
pub fn exporter_config(config: &Config, source: &str, exported: &Exported) -> String {
    let exporter = &exported.exporter;
    let mut out = format!(
        "## labgrid exporter configuration, made by `esp-bridge labgrid` from {source}: every\n\
         ## board of {exporter} as a resource group with its RFC 2217 port (consoles, labgrid's\n\
         ## SerialDriver) and its raw port (esptool --port socket://HOST:PORT).\n\
         ##\n\
         ## On {exporter}:\n\
         ##   esp-bridge labgrid > exporter.yaml\n\
         ##   labgrid-exporter --coordinator COORDINATOR:20408 --name {exporter} exporter.yaml\n\
         ## Once, from any labgrid client, a place per board, with tags to reserve it by:\n"
    );
    for b in &config.boards {
        let place = format!("{exporter}-{}", b.name);
        let _ = write!(
            out,
            "##   labgrid-client -p {place} create\n\
             ##   labgrid-client -p {place} add-match '{exporter}/{}/*'\n\
             ##   labgrid-client -p {place} set-tags board={} host={exporter}\n",
            b.name, b.name
        );
    }
    for b in &config.boards {
        let _ = writeln!(out, "{}:", b.name);
        for (kind, name, protocol) in [
            (PortKind::Rfc2217, "rfc2217", "rfc2217"),
            (PortKind::EspRaw, "raw", "raw"),
        ] {
            let Some((addr, _)) = b.ports().find(|(_, k)| *k == kind) else {
                continue;
            };
            let _ = write!(
                out,
                "  {name}:\n    cls: NetworkSerialPort\n    host: \"{}\"\n    port: {}\n    protocol: {protocol}\n    speed: {}\n",
                exported.host_for(addr),
                addr.port(),
                b.serial.baud.0
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn every_board_is_a_group_with_its_two_ports_and_its_place_commands() {
        let config = Config::parse(
            "[control]\nbackend = \"none\"\n[[board]]\nname = \"lab1\"\ndevice = \"/dev/ttyUSB0\"\nlisten = [\"0.0.0.0:2217\"]\nraw_listen = [\"0.0.0.0:2218\"]\n\
             [[board]]\nname = \"lab2\"\ndevice = \"/dev/ttyUSB1\"\nlisten = [\"192.0.2.7:2219\"]\n[board.serial]\nbaud = 74880\n",
            Path::new("x"),
        )
        .unwrap();
        let exported = Exported::new(Some("pi1".into()), Some("pi1.lan".into())).unwrap();
        let text = exporter_config(&config, "x", &exported);
        assert!(
            text.contains(
                "lab1:\n  rfc2217:\n    cls: NetworkSerialPort\n    host: \"pi1.lan\"\n    port: 2217\n    protocol: rfc2217\n    speed: 115200\n  raw:\n    cls: NetworkSerialPort\n    host: \"pi1.lan\"\n    port: 2218\n    protocol: raw\n"
            ),
            "{text}"
        );
        // A port bound to one address is reached there; a board without a raw port has none.
        assert!(
            text.contains("lab2:\n  rfc2217:\n    cls: NetworkSerialPort\n    host: \"192.0.2.7\"\n    port: 2219\n    protocol: rfc2217\n    speed: 74880\n"),
            "{text}"
        );
        assert!(!text.split("lab2:\n").nth(1).unwrap().contains("raw:"));
        assert!(text.contains("##   labgrid-client -p pi1-lab2 add-match 'pi1/lab2/*'\n"));
        assert!(text.contains("##   labgrid-client -p pi1-lab1 set-tags board=lab1 host=pi1\n"));
        for bad in ["a b", "x\"y", "", "a/b"] {
            assert!(
                Exported::new(Some("pi1".into()), Some(bad.into())).is_err(),
                "{bad:?}"
            );
        }
    }
}
