//! The systemd socket units of the boards, made from the configuration: a systemd generator
//! (`esp-bridge generate-units`, run at boot and at every daemon-reload) writes one socket unit
//! per board and protocol, whose `FileDescriptorName=` tells the service which board and which
//! protocol each socket is for; `esp-bridge apply` puts an edited configuration into effect.
//!
//! Why a generator: the ports live in one place, /etc/esp-bridge.toml, yet every one of them
//! is a socket systemd listens on (the service itself has no network access, and starts on
//! the first connection). The static `esp-bridge.socket` holds the local control socket and
//! pulls the generated units in (they are `PartOf=` it and in its `.wants`), so
//! `systemctl enable --now esp-bridge.socket` still starts everything.
//!
//! A board whose output goes to the journal (`journal = true`) is read from boot, so the
//! generator then also makes `multi-user.target` want the service itself; the other boards
//! stay socket-activated in the same process.

use crate::config::Config;
use crate::protocol::PortKind;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;

/// The unit everything hangs off: the control socket (packaging/esp-bridge.socket).
pub const ANCHOR: &str = "esp-bridge.socket";

/// The service, and where the package installs it.
const SERVICE: &str = "esp-bridge.service";
const SERVICE_PATH: &str = "/usr/lib/systemd/system/esp-bridge.service";

/// The target that wants the service when a board's output goes to the journal.
const BOOT_TARGET: &str = "multi-user.target";

/// The first board whose output goes to the journal, if any: the service then runs from
/// boot.
pub fn served_from_boot(config: &Config) -> Option<&str> {
    config
        .boards
        .iter()
        .find(|b| b.serial.journal)
        .map(|b| b.name.as_str())
}

/// One generated socket unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketUnit {
    pub name: String,
    pub text: String,
}

/// The unit name of a board's socket for one protocol.
pub fn unit_name(board: &str, kind: PortKind) -> String {
    format!("esp-bridge-{board}-{}.socket", kind_word(kind))
}

fn kind_word(kind: PortKind) -> &'static str {
    match kind {
        PortKind::Rfc2217 => "rfc2217",
        PortKind::EspRaw => "raw",
        PortKind::Console => "console",
    }
}

/// `ListenStream=` for an address: the wildcard addresses become a bare port, which systemd
/// opens on every address, IPv4 and IPv6; others stay as given.
fn listen_stream(addr: &SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        addr.port().to_string()
    } else {
        addr.to_string()
    }
}

/// The socket units for `config`: one per board and protocol it listens on.
pub fn socket_units(config: &Config) -> Vec<SocketUnit> {
    config.boards.iter().flat_map(board_units).collect()
}

fn board_units(b: &crate::config::BoardConfig) -> Vec<SocketUnit> {
    let board = b.name.as_str();
    let mut out = Vec::new();
    for (kind, addrs, what) in [
        (PortKind::Rfc2217, &b.listen, "RFC 2217 port (rfc2217://)"),
        (PortKind::EspRaw, &b.raw_listen, "ESP raw port (socket://)"),
        (PortKind::Console, &b.console_listen, "read-only console"),
    ] {
        let streams: BTreeSet<String> = addrs.iter().map(listen_stream).collect();
        if streams.is_empty() {
            continue;
        }
        let mut text = format!(
            "# Made by esp-bridge's systemd generator from /etc/esp-bridge.toml: edit that file,\n\
             # then run `sudo esp-bridge apply`.\n\
             [Unit]\n\
             Description=esp-bridge: board {board}, {what}\n\
             Documentation=man:esp-bridge(1)\n\
             PartOf={ANCHOR}\n\
             \n\
             [Socket]\n"
        );
        for s in &streams {
            let _ = writeln!(text, "ListenStream={s}");
        }
        let _ = write!(
            text,
            "FileDescriptorName={board}.{}\n\
             Service=esp-bridge.service\n\
             NoDelay=true\n\
             KeepAlive=true\n",
            kind_word(kind)
        );
        out.push(SocketUnit {
            name: unit_name(board, kind),
            text,
        });
    }
    out
}

/// `esp-bridge generate-units DIR [EARLY LATE]`: writes the socket units into DIR (systemd's
/// normal generator directory) and makes the anchor want them, and `multi-user.target` want
/// the service when a board's output goes to the journal. A configuration that cannot be
/// read generates nothing; the reason goes to stderr, which systemd logs.
pub fn generate(dir: &Path, config: Result<Config, String>) -> crate::error::Result {
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("esp-bridge-generator: no board sockets: {e}");
            return Ok(());
        }
    };
    let wants = dir.join(format!("{ANCHOR}.wants"));
    std::fs::create_dir_all(&wants).map_err(|e| {
        crate::error::Error::failure(format!("cannot create {}: {e}", wants.display()))
    })?;
    for unit in socket_units(&config) {
        let path = dir.join(&unit.name);
        std::fs::write(&path, &unit.text).map_err(|e| {
            crate::error::Error::failure(format!("cannot write {}: {e}", path.display()))
        })?;
        let link = wants.join(&unit.name);
        symlink(&format!("../{}", unit.name), &link)?;
    }
    if served_from_boot(&config).is_some() {
        let wants = dir.join(format!("{BOOT_TARGET}.wants"));
        std::fs::create_dir_all(&wants).map_err(|e| {
            crate::error::Error::failure(format!("cannot create {}: {e}", wants.display()))
        })?;
        symlink(SERVICE_PATH, &wants.join(SERVICE))?;
    }
    Ok(())
}

fn symlink(target: &str, link: &Path) -> crate::error::Result {
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(target, link)
        .map_err(|e| crate::error::Error::failure(format!("cannot link {}: {e}", link.display())))
}

/// `esp-bridge apply`: puts the configuration into effect under systemd. The socket units
/// are made again (daemon-reload runs the generator), the service stops (a running service
/// keeps the sockets it was given), sockets no longer in the configuration stop, and the
/// anchor restarts, which restarts and starts the boards' sockets. The service starts again
/// on the next connection.
pub fn apply(config: &Config) -> crate::error::Result {
    use crate::error::Error;
    if let Some(e) = crate::check::errors(&crate::check::findings(config)) {
        return Err(Error::config(format!("{e}\nnothing was changed")));
    }
    systemctl(&["daemon-reload"])?;
    systemctl(&["stop", "esp-bridge.service"])?;
    let wanted: Vec<String> = socket_units(config).into_iter().map(|u| u.name).collect();
    let listed = systemctl_output(&[
        "list-units",
        "--all",
        "--plain",
        "--no-legend",
        "esp-bridge-*.socket",
    ])?;
    for unit in listed.lines().filter_map(|l| l.split_whitespace().next()) {
        if !wanted.iter().any(|w| w == unit) {
            println!("stopping {unit}: no longer in the configuration");
            systemctl(&["stop", unit])?;
        }
    }
    systemctl(&["restart", ANCHOR])?;
    for unit in socket_units(config) {
        let streams: Vec<&str> = unit
            .text
            .lines()
            .filter_map(|l| l.strip_prefix("ListenStream="))
            .collect();
        println!("{}: listening on {}", unit.name, streams.join(", "));
    }
    if let Some(board) = served_from_boot(config) {
        systemctl(&["start", SERVICE])?;
        println!(
            "{SERVICE}: running, and started at boot: board {board}'s output goes to the journal (journalctl -u esp-bridge BOARD={board})"
        );
    }
    Ok(())
}

fn systemctl(args: &[&str]) -> crate::error::Result {
    systemctl_output(args).map(|_| ())
}

fn systemctl_output(args: &[&str]) -> crate::error::Result<String> {
    use crate::error::Error;
    let out = std::process::Command::new("systemctl")
        .args(args)
        .output()
        .map_err(|e| {
            Error::failure(format!(
                "cannot run systemctl {}: {e}\n  hint: `esp-bridge apply` is for systems run by systemd",
                args.join(" ")
            ))
        })?;
    if !out.status.success() {
        return Err(Error::failure(format!(
            "systemctl {} failed: {}\n  hint: run it as root: sudo esp-bridge apply",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_socket_unit_per_board_and_protocol_named_for_both() {
        let units = socket_units(&Config::default());
        let names: Vec<&str> = units.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "esp-bridge-default-rfc2217.socket",
                "esp-bridge-default-raw.socket"
            ]
        );
        let rfc = &units[0].text;
        assert!(rfc.contains("\nListenStream=2217\n"), "{rfc}");
        assert!(
            rfc.contains("\nFileDescriptorName=default.rfc2217\n"),
            "{rfc}"
        );
        assert!(rfc.contains("\nService=esp-bridge.service\n"), "{rfc}");
        assert!(rfc.contains("\nPartOf=esp-bridge.socket\n"), "{rfc}");
        assert!(units[1].text.contains("\nFileDescriptorName=default.raw\n"));
        assert!(units[1].text.contains("\nListenStream=2218\n"));
    }

    #[test]
    fn addresses_other_than_the_wildcard_stay_as_given_and_empty_lists_make_no_unit() {
        let mut c = Config::default();
        c.boards[0].listen = vec![
            "127.0.0.1:4000".parse().unwrap(),
            "[::1]:4000".parse().unwrap(),
            "0.0.0.0:4001".parse().unwrap(),
            "[::]:4001".parse().unwrap(),
        ];
        c.boards[0].raw_listen = vec![];
        let units = socket_units(&c);
        assert_eq!(units.len(), 1);
        let t = &units[0].text;
        assert!(t.contains("ListenStream=127.0.0.1:4000\n"), "{t}");
        assert!(t.contains("ListenStream=[::1]:4000\n"), "{t}");
        assert_eq!(t.matches("ListenStream=4001\n").count(), 1, "{t}");
    }

    #[test]
    fn the_generator_writes_the_units_and_the_anchor_wants_them() {
        let dir = std::env::temp_dir().join(format!("esp-bridge-gen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        generate(&dir, Ok(Config::default())).unwrap();
        for unit in socket_units(&Config::default()) {
            assert_eq!(
                std::fs::read_to_string(dir.join(&unit.name)).unwrap(),
                unit.text
            );
            let link = dir.join("esp-bridge.socket.wants").join(&unit.name);
            assert_eq!(
                std::fs::read_link(&link).unwrap(),
                Path::new("..").join(&unit.name)
            );
        }
        assert!(
            !dir.join("multi-user.target.wants").exists(),
            "socket-activated only"
        );
        // Run again (every daemon-reload): the same result, no error.
        generate(&dir, Ok(Config::default())).unwrap();
        // A board whose output goes to the journal: the service is wanted at boot too.
        let mut journal = Config::default();
        journal.boards[0].serial.journal = true;
        journal.boards[0].console_listen = vec!["0.0.0.0:2219".parse().unwrap()];
        generate(&dir, Ok(journal.clone())).unwrap();
        assert_eq!(
            std::fs::read_link(dir.join("multi-user.target.wants/esp-bridge.service")).unwrap(),
            Path::new("/usr/lib/systemd/system/esp-bridge.service")
        );
        let console = dir.join("esp-bridge-default-console.socket");
        let text = std::fs::read_to_string(&console).unwrap();
        assert!(text.contains("\nListenStream=2219\n"), "{text}");
        assert!(
            text.contains("\nFileDescriptorName=default.console\n"),
            "{text}"
        );
        assert!(
            dir.join("esp-bridge.socket.wants/esp-bridge-default-console.socket")
                .exists()
        );
        // A broken configuration generates nothing and is not a generator failure.
        let empty = dir.join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        generate(&empty, Err("bad".into())).unwrap();
        assert_eq!(std::fs::read_dir(&empty).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
