//! The command line as users meet it: help, version, check-config and its exit codes.

mod common;

use common::{bridge, text};
use std::path::Path;

fn write_config(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, body).expect("temp file");
    path.display().to_string()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("esp-bridge-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[test]
fn help_and_version() {
    let help = bridge(["--help"]);
    assert!(help.status.success());
    let t = text(&help);
    for word in [
        "--device",
        "--listen",
        "--baud",
        "--control",
        "check-config",
        "demo",
    ] {
        assert!(t.contains(word), "help mentions {word}: {t}");
    }
    let version = bridge(["--version"]);
    assert!(version.status.success());
    assert!(text(&version).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn usage_errors_exit_64() {
    let o = bridge(["--baud", "fast"]);
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert!(text(&o).contains("--baud"));
}

#[test]
fn check_config_prints_every_key_in_the_files_spelling() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/esp-bridge.toml");
    let o = bridge(["check-config", "--config", shipped, "--control", "none"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    for line in [
        "device = \"/dev/serial0\"",
        "baud = 115200",
        "parity = \"none\"",
        "flow_control = \"none\"",
        "raw_listen = [\"0.0.0.0:2218\"]",
        "second_client = \"refuse\"",
        "idle_exit_secs = 0",
        "backend = \"none\"",
        "mode = \"esp\"",
        "after_disconnect = \"run\"",
        "drive = \"open-drain\"",
    ] {
        assert!(t.contains(line), "{line}: {t}");
    }
    // Rust's spelling never shows.
    for word in ["None", "Refuse", "Esp", "OpenDrain"] {
        assert!(!t.contains(word), "{word}: {t}");
    }
}

/// check-config fails exactly where the service would, with the same message.
#[test]
fn check_config_exits_78_where_the_service_would() {
    let dir = temp_dir("system");
    let regular = write_config(&dir, "not-a-tty", "");
    let cases = [
        // The shipped GPIO lines do not exist on this (non-Pi) machine.
        (vec![], "\"GPIO22\" ([control.gpio] reset)"),
        // A line by offset needs its chip.
        (
            vec!["[control.gpio]", "reset = 5"],
            "needs chip = \"gpiochipN\"",
        ),
        // No address at all.
        (
            vec![
                "[network]",
                "listen = []",
                "raw_listen = []",
                "[control]",
                "backend = \"none\"",
            ],
            "listen and raw_listen are both empty",
        ),
    ];
    for (i, (lines, message)) in cases.iter().enumerate() {
        let path = write_config(&dir, &format!("c{i}.toml"), &lines.join("\n"));
        for cmd in [
            &["check-config", "--config", &path][..],
            &["--config", &path, "--device", "/dev/ttyESP-absent"][..],
        ] {
            let o = bridge(cmd);
            let t = text(&o);
            assert_eq!(o.status.code(), Some(78), "{cmd:?}: {t}");
            assert!(t.contains(message), "{cmd:?}: {t}");
        }
    }
    for device in [regular.as_str(), "/dev/null", "/tmp"] {
        let o = bridge(["check-config", "--control", "none", "--device", device]);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(78), "{device}: {t}");
        assert!(t.contains("not a serial"), "{device}: {t}");
    }
}

#[test]
fn bad_configs_exit_78_naming_file_line_and_key() {
    let dir = temp_dir("bad");
    let cases = [
        (
            "syntax.toml",
            "[serial]\ndevice = /dev/ttyUSB0\n",
            "line 2",
            "device",
        ),
        (
            "unknown.toml",
            "[serial]\nspeed = 9600\n",
            "line 2",
            "speed",
        ),
        ("type.toml", "[serial]\nbaud = \"fast\"\n", "line 2", "baud"),
        (
            "range.toml",
            "\n[serial]\nbaud = 0\n",
            "line 3",
            "50 to 20000000",
        ),
        (
            "device.toml",
            "[serial]\ndevice = \"\"\n",
            "line 2",
            "absolute path",
        ),
        (
            "line.toml",
            "[control.gpio]\nreset = \"\"\n",
            "line 2",
            "gpioinfo",
        ),
    ];
    for (name, body, line, key) in cases {
        let path = write_config(&dir, name, body);
        for cmd in [
            &["check-config", "--config", &path][..],
            &["--config", &path][..],
        ] {
            let o = bridge(cmd);
            let t = text(&o);
            assert_eq!(o.status.code(), Some(78), "{name} {cmd:?}: {t}");
            assert!(t.contains(&path), "{name} names the file: {t}");
            assert!(t.contains(line), "{name} names the line: {t}");
            assert!(t.contains(key), "{name} names the key: {t}");
        }
    }
    let o = bridge(["check-config", "--config", "/nonexistent/esp-bridge.toml"]);
    assert_eq!(o.status.code(), Some(78));
    assert!(text(&o).contains("cannot read config file /nonexistent/esp-bridge.toml"));
}

#[test]
fn flags_override_the_file() {
    let dir = temp_dir("override");
    let path = write_config(
        &dir,
        "c.toml",
        "[serial]\ndevice = \"/dev/ttyAMA0\"\nbaud = 9600\n",
    );
    let o = bridge([
        "check-config",
        "--config",
        &path,
        "--device",
        "/dev/ttyUSB3",
        "--baud",
        "460800",
        "--listen",
        "127.0.0.1:3333",
        "--control",
        "none",
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("device = \"/dev/ttyUSB3\""), "{t}");
    assert!(t.contains("baud = 460800"), "{t}");
    assert!(t.contains("listen = [\"127.0.0.1:3333\"]"), "{t}");
}

#[test]
fn listening_on_a_busy_port_fails_with_a_hint() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let o = bridge([
        "--device",
        "/dev/ttyESP-absent",
        "--listen",
        &addr,
        "--raw-listen",
        "127.0.0.1:0",
        "--control",
        "none",
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(t.contains(&format!("cannot listen on {addr}")), "{t}");
}

/// A sysfs and /proc/device-tree tree below `root` in which each `(tty, node, label)` is a
/// SoC UART: the tty's device has an of_node link into the device tree (relative, as sysfs
/// makes them) and `__symbols__/<label>` holds the node's path, as every Pi device tree has.
fn soc_uarts(root: &Path, uarts: &[(&str, &str, &str)]) {
    let _ = std::fs::remove_dir_all(root);
    for (tty, node, label) in uarts {
        let dt_node = root
            .join("sys/firmware/devicetree/base")
            .join(node.trim_start_matches('/'));
        std::fs::create_dir_all(&dt_node).expect("dt node");
        let platform = root
            .join("sys/devices/platform/soc")
            .join(format!("{tty}-parent"));
        std::fs::create_dir_all(platform.join("tty").join(tty)).expect("device dir");
        std::os::unix::fs::symlink(
            format!("../../../../firmware/devicetree/base{node}"),
            platform.join("of_node"),
        )
        .expect("of_node");
        std::os::unix::fs::symlink("../..", platform.join("tty").join(tty).join("device"))
            .expect("device link");
        let class = root.join("sys/class/tty");
        std::fs::create_dir_all(&class).expect("class dir");
        std::os::unix::fs::symlink(
            format!("../../devices/platform/soc/{tty}-parent/tty/{tty}"),
            class.join(tty),
        )
        .expect("class link");
        let symbols = root.join("proc/device-tree/__symbols__");
        std::fs::create_dir_all(&symbols).expect("symbols");
        std::fs::write(symbols.join(label), format!("{node}\0")).expect("symbol");
    }
}

fn uart_name(root: &Path, tty: &str) -> Option<String> {
    let o = bridge(["uart-name", "--root", &root.display().to_string(), tty]);
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

#[test]
fn uart_names_follow_the_controller_whatever_number_the_kernel_gave() {
    let dir = temp_dir("uart-name");
    // A Pi 4 on an old kernel with only uart3 enabled: it came up as ttyAMA1.
    soc_uarts(
        &dir,
        &[
            ("ttyAMA0", "/soc/serial@7e201000", "uart0"),
            ("ttyS0", "/soc/serial@7e215040", "uart1"),
            ("ttyAMA1", "/soc/serial@7e201600", "uart3"),
        ],
    );
    assert_eq!(uart_name(&dir, "ttyAMA1").as_deref(), Some("uart3"));
    assert_eq!(uart_name(&dir, "ttyAMA0").as_deref(), Some("uart0"));
    assert_eq!(uart_name(&dir, "ttyS0").as_deref(), Some("uart1"));
    // uart2 enabled as well: the old kernel renumbers, uart3 is now ttyAMA2, and its name stays.
    soc_uarts(
        &dir,
        &[
            ("ttyAMA0", "/soc/serial@7e201000", "uart0"),
            ("ttyAMA1", "/soc/serial@7e201400", "uart2"),
            ("ttyAMA2", "/soc/serial@7e201600", "uart3"),
        ],
    );
    assert_eq!(uart_name(&dir, "ttyAMA2").as_deref(), Some("uart3"));
    assert_eq!(uart_name(&dir, "ttyAMA1").as_deref(), Some("uart2"));
    // A Pi 5: RP1's UARTs behind PCIe, and the debug connector's uart10.
    soc_uarts(
        &dir,
        &[
            ("ttyAMA10", "/soc@107c000000/serial@7d001000", "uart10"),
            ("ttyAMA1", "/axi/pcie@120000/rp1/serial@34000", "uart1"),
        ],
    );
    assert_eq!(uart_name(&dir, "ttyAMA1").as_deref(), Some("uart1"));
    assert_eq!(uart_name(&dir, "ttyAMA10").as_deref(), Some("uart10"));
    // No device-tree node (a USB adapter), no such tty, or a name that walks out: no link.
    for tty in ["ttyUSB0", "../ttyAMA1", ""] {
        assert_eq!(uart_name(&dir, tty), None, "{tty:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_report_into_a_pipe_that_closes_early_ends_quietly() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/esp-bridge.toml");
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{}' check-config --config '{shipped}' --control none | head -c 1 >/dev/null",
            env!("CARGO_BIN_EXE_esp-bridge")
        ))
        .output()
        .expect("sh runs");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe"),
        "{err}"
    );
}
