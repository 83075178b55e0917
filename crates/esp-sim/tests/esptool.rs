//! The virtual ESP32 against the real esptool, straight on its pty (no
//! bridge): the floor every bridge test builds on. If esptool cannot flash
//! the sim directly, nothing else can be trusted.
//!
//! pyserial cannot drive DTR/RTS on a pty, so the sim powers on in download
//! mode and esptool runs with `--before no-reset --after no-reset`.
//! The esptool installs are found through `ESP_BRIDGE_VENV4` / `ESP_BRIDGE_VENV5`
//! (virtualenvs with esptool 4.x / 5.x); a missing one skips its test.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use esp_sim::{
    BootMode, ChipMode, Direction, Esp32Sim, SimConfig, SimEventKind, StubDecidedBy, StubKind,
};

const MIB: usize = 1 << 20;

struct Esptool {
    exe: PathBuf,
    v5: bool,
}

impl Esptool {
    fn find(v5: bool) -> Option<Esptool> {
        let (var, default, exe) = if v5 {
            (
                "ESP_BRIDGE_VENV5",
                "/root/.cache/esp-bridge/venv-esptool5",
                "esptool",
            )
        } else {
            (
                "ESP_BRIDGE_VENV4",
                "/root/.cache/esp-bridge/venv-esptool4",
                "esptool.py",
            )
        };
        let venv = std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(default));
        let exe = venv.join("bin").join(exe);
        if exe.exists() {
            Some(Esptool { exe, v5 })
        } else {
            println!(
                "SKIPPED: esptool {} not found at {} (set {var} to a virtualenv with it)",
                if v5 { "5.x" } else { "4.x" },
                exe.display()
            );
            None
        }
    }

    /// esptool 5 spells commands and options with dashes, 4.x with underscores.
    fn spell(&self, word: &str) -> String {
        if self.v5 {
            word.to_string()
        } else {
            word.replace('-', "_")
        }
    }

    /// Runs one esptool command; panics with its output if it fails.
    fn run(
        &self,
        sim: &Esp32Sim,
        baud: u32,
        stub: bool,
        cmd: &str,
        args: &[&str],
    ) -> (String, Duration) {
        self.run_after(sim, baud, stub, "no-reset", cmd, args)
    }

    /// Like [`Esptool::run`], with another `--after` action.
    fn run_after(
        &self,
        sim: &Esp32Sim,
        baud: u32,
        stub: bool,
        after: &str,
        cmd: &str,
        args: &[&str],
    ) -> (String, Duration) {
        let port = sim.device_path();
        let mut c = Command::new(&self.exe);
        c.arg("--port")
            .arg(port)
            .arg("--baud")
            .arg(baud.to_string())
            .arg("--before")
            .arg(self.spell("no-reset"))
            .arg("--after")
            .arg(self.spell(after));
        if !stub {
            c.arg("--no-stub");
        }
        c.arg(self.spell(cmd)).args(args);
        let t = Instant::now();
        let out = c.output().expect("esptool runs");
        let took = t.elapsed();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            let events: Vec<String> = sim.events().iter().map(|e| e.to_json()).collect();
            panic!(
                "esptool {cmd} {args:?} (baud {baud}, stub {stub}) failed:\n{text}\nsim events:\n{}",
                events.join("\n")
            );
        }
        if std::env::var_os("SIM_ESPTOOL_VERBOSE").is_some() {
            println!("{text}");
        }
        println!(
            "esptool {} {cmd} @{baud}{}: {:.2} s",
            if self.v5 { "5" } else { "4" },
            if stub { "" } else { " --no-stub" },
            took.as_secs_f64()
        );
        (text, took)
    }
}

/// Deterministic incompressible bytes (xorshift), so the compressed upload is
/// as large as the data.
fn wait_for_mode(sim: &Esp32Sim, mode: ChipMode) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while sim.mode() != mode && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(sim.mode(), mode);
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    // Not an image header: esptool would patch flash parameters into it.
    v[0] = 0;
    v
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("esp-bridge-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn start_download_sim() -> Esp32Sim {
    let sim = Esp32Sim::start(SimConfig {
        power_on: BootMode::Download,
        ..SimConfig::default()
    })
    .expect("sim starts");
    // The ROM needs a few ms before it listens.
    let t = Instant::now();
    while sim.mode() != ChipMode::Download && t.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(sim.mode(), ChipMode::Download);
    sim
}

fn full_session(tool: &Esptool) {
    let sim = start_download_sim();
    let dir = temp_dir(if tool.v5 { "esptool5" } else { "esptool4" });

    let (out, _) = tool.run(&sim, 115_200, true, "chip-id", &[]);
    assert!(out.contains("ESP32-D0WD-V3 (revision v3.1)"), "{out}");
    assert!(out.contains("24:0a:c4:12:34:56"), "{out}");
    assert!(out.contains("40MHz"), "{out}");
    assert!(
        !out.to_lowercase().contains("warning: detected crystal"),
        "{out}"
    );

    let (out, _) = tool.run(&sim, 115_200, true, "flash-id", &[]);
    assert!(out.contains("4MB"), "{out}");
    assert!(out.to_lowercase().contains("c8"), "{out}");

    // Leave the stub running; the next run must find it (SYNC value 0)
    // instead of uploading it again.
    let (out, _) = tool.run_after(&sim, 115_200, true, "no-reset-stub", "flash-id", &[]);
    assert!(out.contains("Staying in flasher stub"), "{out}");
    assert_eq!(sim.mode(), ChipMode::Stub);
    let (out, _) = tool.run(&sim, 115_200, true, "flash-id", &[]);
    assert!(out.contains("already running"), "{out}");
    // Leaving the stub ("Staying in bootloader") reboots into the ROM loader, which takes
    // the ROM's start-up time: wait for it rather than race it on a loaded machine.
    wait_for_mode(&sim, ChipMode::Download);

    let image = random_bytes(MIB, 0x5EED_0001);
    let file = dir.join("image.bin");
    std::fs::write(&file, &image).unwrap();
    let file_s = file.to_str().unwrap();

    let (_, t115) = tool.run(&sim, 115_200, true, "write-flash", &["0x0", file_s]);
    assert!(
        sim.flash()[..MIB] == image[..],
        "flash differs after write at 115200"
    );

    let (_, _) = tool.run(&sim, 115_200, true, "erase-region", &["0x0", "0x100000"]);
    assert!(sim.flash()[..MIB].iter().all(|&b| b == 0xFF));

    let image2 = random_bytes(MIB, 0x5EED_0002);
    std::fs::write(&file, &image2).unwrap();
    let (out, t921) = tool.run(&sim, 921_600, true, "write-flash", &["0x0", file_s]);
    assert!(out.contains("921600"), "{out}");
    assert!(
        sim.flash()[..MIB] == image2[..],
        "flash differs after write at 921600"
    );
    assert_eq!(
        sim.baud(),
        115_200,
        "the stub's reboot puts the UART back at 115200"
    );

    tool.run(&sim, 921_600, true, "verify-flash", &["0x0", file_s]);

    let back = dir.join("back.bin");
    tool.run(
        &sim,
        921_600,
        true,
        "read-flash",
        &["0x0", "0x100000", back.to_str().unwrap()],
    );
    assert!(
        std::fs::read(&back).unwrap() == image2,
        "read-flash returned other bytes"
    );

    // The ROM's slow read, 64 bytes per command.
    tool.run(
        &sim,
        115_200,
        false,
        "read-flash",
        &["0x1000", "0x1000", back.to_str().unwrap()],
    );
    assert!(std::fs::read(&back).unwrap()[..] == image2[0x1000..0x2000]);

    tool.run(&sim, 115_200, true, "erase-flash", &[]);
    assert!(
        sim.flash().iter().all(|&b| b == 0xFF),
        "erase-flash left data"
    );

    let (_, trom) = tool.run(&sim, 115_200, false, "write-flash", &["0x0", file_s]);
    assert!(
        sim.flash()[..MIB] == image2[..],
        "flash differs after --no-stub write"
    );
    tool.run(&sim, 115_200, false, "verify-flash", &["0x0", file_s]);

    // Compressible data takes the FLASH_DEFL path (esptool 5 sends
    // incompressible data uncompressed), through the stub and the ROM.
    let text: Vec<u8> = b"\0virtual ESP32 firmware image "
        .iter()
        .copied()
        .cycle()
        .take(256 * 1024)
        .collect();
    std::fs::write(&file, &text).unwrap();
    let (out, _) = tool.run(&sim, 921_600, true, "write-flash", &["0x10000", file_s]);
    assert!(out.contains("compressed"), "{out}");
    assert!(sim.flash()[0x10000..0x50000] == text[..]);
    tool.run(&sim, 115_200, true, "erase-region", &["0x10000", "0x40000"]);
    tool.run(&sim, 115_200, false, "write-flash", &["0x10000", file_s]);
    assert!(sim.flash()[0x10000..0x50000] == text[..]);

    println!(
        "esptool {}: 1 MiB write-flash unpaced: {:.2} s at 115200, {:.2} s at 921600, {:.2} s ROM (--no-stub)",
        if tool.v5 { "5" } else { "4" },
        t115.as_secs_f64(),
        t921.as_secs_f64(),
        trom.as_secs_f64()
    );
    assert_eq!(
        sim.wrong_baud_bytes(),
        0,
        "no host byte may reach the chip at a wrong rate"
    );
    let bauds: Vec<_> = sim
        .events()
        .into_iter()
        .filter(|e| matches!(e.kind, SimEventKind::Baud { to: 921_600, .. }))
        .collect();
    assert_eq!(
        bauds.len(),
        4,
        "one baud switch per 921600 session: {bauds:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn esptool4_flashes_the_sim_directly() {
    if let Some(tool) = Esptool::find(false) {
        full_session(&tool);
    }
}

#[test]
fn esptool5_flashes_the_sim_directly() {
    if let Some(tool) = Esptool::find(true) {
        full_session(&tool);
    }
}

/// `-b 921600 write-flash` with the UART paced: esptool 4 uploads the legacy
/// stub, esptool 5 esp-flasher-stub; the sim tells them apart by where they
/// are loaded, each switches to 921600 its own way, and the bulk of the
/// write runs at 921600 (as the command events show).
fn paced_write_at_921600(tool: &Esptool) {
    let sim = Esp32Sim::start(SimConfig {
        power_on: BootMode::Download,
        pace: true,
        ..SimConfig::default()
    })
    .expect("sim starts");
    wait_for_mode(&sim, ChipMode::Download);
    let dir = temp_dir(if tool.v5 { "paced5" } else { "paced4" });
    let image = random_bytes(128 * 1024, 0x5EED_0004);
    let file = dir.join("image.bin");
    std::fs::write(&file, &image).unwrap();
    let (out, _) = tool.run(
        &sim,
        921_600,
        true,
        "write-flash",
        &["0x0", file.to_str().unwrap()],
    );
    assert!(out.contains("921600"), "{out}");
    assert!(sim.flash()[..image.len()] == image[..], "flash differs");
    let events = sim.events();
    let stub = if tool.v5 {
        StubKind::Flasher
    } else {
        StubKind::Legacy
    };
    assert!(
        events.iter().any(|e| e.kind
            == SimEventKind::Stub {
                kind: stub,
                by: StubDecidedBy::Address
            }),
        "no {stub:?} stub event"
    );
    let bulk: Vec<u32> = events
        .iter()
        .filter_map(|e| match e.kind {
            SimEventKind::Command { op, baud, .. } if op == 0x03 || op == 0x11 => Some(baud),
            _ => None,
        })
        .collect();
    assert!(!bulk.is_empty(), "no data commands recorded");
    assert!(bulk.iter().all(|&b| b == 921_600), "{bulk:?}");
    assert!(events.iter().any(|e| matches!(
        e.kind,
        SimEventKind::ChangeBaudrate {
            stub: Some(s),
            new: 921_600,
            old: 115_200,
            rate: 921_600,
        } if s == stub
    )));
    assert_eq!(sim.wrong_baud_bytes(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn esptool4_paced_at_921600_runs_the_legacy_stub() {
    if let Some(tool) = Esptool::find(false) {
        paced_write_at_921600(&tool);
    }
}

#[test]
fn esptool5_paced_at_921600_runs_esp_flasher_stub() {
    if let Some(tool) = Esptool::find(true) {
        paced_write_at_921600(&tool);
    }
}

/// The host side of the pty, as a serial program would open it.
fn open_host(path: &Path, baud: u32) -> std::fs::File {
    use rustix::termios::{OptionalActions, tcgetattr, tcsetattr};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open pty slave");
    let mut t = tcgetattr(&f).unwrap();
    t.make_raw();
    t.set_speed(baud).unwrap();
    tcsetattr(&f, OptionalActions::Now, &t).unwrap();
    let flags = rustix::fs::fcntl_getfl(&f).unwrap();
    rustix::fs::fcntl_setfl(&f, flags | rustix::fs::OFlags::NONBLOCK).unwrap();
    f
}

fn read_for(f: &std::fs::File, d: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    while t.elapsed() < d {
        match rustix::io::read(f, &mut buf[..]) {
            Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    got
}

/// A SYNC command (0x08, 36 bytes: 07 07 12 20 and 32 times 0x55), SLIP-framed.
fn sync_frame() -> Vec<u8> {
    let mut f = vec![0xC0, 0x00, 0x08, 0x24, 0x00, 0x00, 0x00, 0x00, 0x00];
    f.extend_from_slice(&[0x07, 0x07, 0x12, 0x20]);
    f.extend_from_slice(&[0x55; 32]);
    f.push(0xC0);
    f
}

#[test]
fn a_sync_at_the_wrong_rate_gets_no_reply() {
    let sim = start_download_sim();
    let mut host = open_host(sim.device_path(), 9_600);
    // The banner went out at 115200 while we listened at 9600 (or before we
    // opened): whatever is there is not for us.
    read_for(&host, Duration::from_millis(50));

    host.write_all(&sync_frame()).unwrap();
    let got = read_for(&host, Duration::from_millis(300));
    assert!(
        !got.windows(4).any(|w| w == [0x01, 0x08, 0x04, 0x00]),
        "the chip answered a SYNC sent at 9600: {got:02x?}"
    );
    assert_eq!(sim.wrong_baud_bytes(), sync_frame().len() as u64);
    assert!(sim.wrong_baud_frames() <= 1);
    assert!(sim.events().iter().any(|e| matches!(
        e.kind,
        SimEventKind::WrongBaud {
            dir: Direction::Rx,
            chip_baud: 115_200,
            host_baud: 9_600,
            ..
        }
    )));

    // The same frame at the right rate is answered (eight times).
    drop(host);
    let mut host = open_host(sim.device_path(), 115_200);
    host.write_all(&sync_frame()).unwrap();
    let got = read_for(&host, Duration::from_millis(300));
    let replies = got
        .windows(12)
        .filter(|w| w[..8] == [0xC0, 0x01, 0x08, 0x04, 0x00, 0x07, 0x12, 0x20])
        .count();
    assert_eq!(replies, 8, "{got:02x?}");
    assert_eq!(sim.wrong_baud_bytes(), sync_frame().len() as u64);
}

/// Wall-clock cost of a 1 MiB write with the UART paced at its real speed.
/// Slow (about two minutes), so only on demand:
/// `cargo test --test sim_esptool paced -- --ignored --nocapture`.
#[test]
#[ignore]
fn paced_write_timing() {
    let Some(tool) = Esptool::find(true).or_else(|| Esptool::find(false)) else {
        return;
    };
    let sim = Esp32Sim::start(SimConfig {
        power_on: BootMode::Download,
        pace: true,
        ..SimConfig::default()
    })
    .expect("sim starts");
    let dir = temp_dir("paced");
    let image = random_bytes(MIB, 0x5EED_0003);
    let file = dir.join("image.bin");
    std::fs::write(&file, &image).unwrap();
    let file_s = file.to_str().unwrap();
    for baud in [921_600, 115_200] {
        let (_, took) = tool.run(&sim, baud, true, "write-flash", &["0x0", file_s]);
        assert!(sim.flash()[..MIB] == image[..]);
        let wire = MIB as f64 * 10.0 / f64::from(baud);
        println!(
            "paced 1 MiB write-flash at {baud}: {:.1} s (raw wire time {wire:.1} s)",
            took.as_secs_f64()
        );
        assert!(took.as_secs_f64() >= wire);
    }
    assert_eq!(sim.wrong_baud_bytes(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}
