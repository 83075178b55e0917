//! `esp-bridge demo`: the bridge in front of a virtual ESP32 (the esp-sim crate), so that
//! esptool, idf.py monitor and pyserial can be tried on any Linux machine.
//!
//! The demo is the production server with two seams replaced: the serial device is the
//! virtual chip's pseudo-terminal, and the lowest layer of the control lines drives the
//! virtual chip's pins: either wired straight, as the seed wires Pi GPIOs to EN and IO0, or
//! through a model of a dev board's auto-program circuit (with its EN capacitor), as the modem
//! backend sees one. Everything above that seam (the reset engine, the line translation) is
//! the production code.

use crate::config::{Config, ControlBackend, ControlMode, Overrides};
use crate::control::{LineDriver, ModemLines, ModemPort, Straps};
use crate::error::{Error, Result};
use crate::protocol::PortKind;
use esp_sim::{BootMode, Esp32Sim, Level, SimConfig, StrapPins};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Keep the virtual flash in this file between runs
    #[arg(long, value_name = "PATH")]
    flash_file: Option<PathBuf>,
    /// Append the virtual chip's pin and mode events to this file (JSON lines)
    #[arg(long, value_name = "PATH")]
    event_log: Option<PathBuf>,
    /// Make the virtual UART as slow as a real one (10 bits per byte at the current baud)
    #[arg(long)]
    pace: bool,
    /// How the virtual board is wired: GPIO lines straight to EN/IO0, or a dev board's
    /// auto-program circuit on the UART's DTR/RTS
    #[arg(long, value_enum, default_value = "gpio")]
    wiring: Wiring,
    /// How DTR/RTS are interpreted (see [control] mode in the config)
    #[arg(long, value_enum, default_value = "esp")]
    mode: DemoMode,
    /// How many virtual ESP32s to serve, each on its own pair of ports (2217 and 2218, 2219
    /// and 2220, ...; with --listen HOST:PORT, from PORT on); with more than one, the flash and
    /// event-log files get the board's name
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=MAX_BOARDS))]
    boards: u16,
    /// The rate the raw port runs esptool's flasher stub at, whatever the client asks for
    /// (see [serial] flash_baud); 0: the client's own rate
    #[arg(long, value_name = "BAUD", default_value_t = crate::config::DEFAULT_FLASH_BAUD)]
    flash_baud: u32,
    /// The fastest rate the virtual board's wiring carries: above it every byte arrives
    /// garbled (for tests of the flash-rate fallback)
    #[arg(long, value_name = "BAUD", hide = true, value_parser = clap::value_parser!(u32).range(1..))]
    sim_max_baud: Option<u32>,
    /// A writer silent this long may be replaced by a client that wants to write (see
    /// [network] takeover_idle_secs)
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=86_400))]
    takeover_idle_secs: Option<u64>,
    /// How long a client that wants to write waits for the writer (see [network]
    /// claim_wait_secs)
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(0..=600))]
    claim_wait_secs: Option<u64>,
}

/// The most virtual boards the demo serves (each is a thread and a pseudo-terminal).
const MAX_BOARDS: i64 = 16;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Wiring {
    Gpio,
    Modem,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum DemoMode {
    Esp,
    Direct,
}

fn level(asserted: bool) -> Level {
    if asserted { Level::Low } else { Level::High }
}

/// GPIO lines wired straight to the virtual chip's pins: asserted = low, as the seed wiring.
struct SimLines(StrapPins);

impl LineDriver for SimLines {
    fn drive(&mut self, s: Straps) -> std::io::Result<()> {
        self.0.set(level(s.reset), level(s.boot));
        Ok(())
    }
    fn describe(&self) -> String {
        "the virtual ESP32's EN and IO0 pins (wired like GPIO lines)".into()
    }
}

/// How long the EN capacitor of a dev board delays EN's rise after the transistor lets go
/// (10 kOhm and 1 uF reach the chip's threshold after about 5-10 ms).
const EN_RC_DELAY: Duration = Duration::from_millis(5);

/// A dev board's two-transistor auto-program circuit in front of the virtual chip, as a
/// UART's DTR/RTS see it: EN low only for RTS without DTR, IO0 low only for DTR without RTS,
/// and EN rising late because of its capacitor while IO0 follows at once.
struct SimAutoProgram {
    pins: StrapPins,
    generation: Arc<AtomicU64>,
}

impl ModemPort for SimAutoProgram {
    fn set_dtr_rts(&mut self, dtr: bool, rts: bool) -> std::io::Result<()> {
        let en_low = rts && !dtr;
        let io0_low = dtr && !rts;
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let (en_now, _) = self.pins.levels();
        if !en_low && en_now == Level::Low {
            // IO0 changes now; EN follows when the capacitor has charged, unless the pins
            // changed again in between.
            self.pins.set(Level::Low, level(io0_low));
            let pins = self.pins.clone();
            let current = Arc::clone(&self.generation);
            std::thread::spawn(move || {
                std::thread::sleep(EN_RC_DELAY);
                if current.load(Ordering::SeqCst) == generation {
                    pins.set(Level::High, level(io0_low));
                }
            });
        } else {
            self.pins.set(level(en_low), level(io0_low));
        }
        Ok(())
    }
    fn describe(&self) -> String {
        "the virtual dev board".into()
    }
}

/// The default demo addresses: loopback only, since the demo is for trying things locally;
/// board i (from 0) gets ports 2217 + 2i and 2218 + 2i.
const DEMO_HOST: [u8; 4] = [127, 0, 0, 1];
const DEMO_PORT: u16 = 2217;

/// What to try, printed once the ports are bound.
/// A board as the banner shows it: name, device, and where it listens.
type Shown = (String, String, Vec<(SocketAddr, PortKind)>);

fn banner(boards: &[Shown]) {
    let mut text = String::from("esp-bridge demo:\n");
    let mut first = None;
    for (name, device, addrs) in boards {
        let url = |kind: PortKind, scheme: &str| {
            addrs
                .iter()
                .find(|(_, k)| *k == kind)
                .map(|(a, _)| format!("{scheme}://{a}"))
                .unwrap_or_else(|| format!("(no {kind} port)"))
        };
        let (rfc, raw) = (
            url(PortKind::Rfc2217, "rfc2217"),
            url(PortKind::EspRaw, "socket"),
        );
        text.push_str(&format!(
            "  virtual ESP32 {name} on {device}: {raw} (fast raw port, for flashing), {rfc} (RFC 2217, for monitors)"
        ));
        if let Some((a, _)) = addrs.iter().find(|(_, k)| *k == PortKind::Console) {
            text.push_str(&format!(
                ", console: nc {} {} (its output, then live)",
                a.ip(),
                a.port()
            ));
        }
        text.push('\n');
        first.get_or_insert((raw, rfc));
    }
    if let Some((raw, rfc)) = first {
        text.push_str(&format!(
            "Try, in another terminal (pip install esptool):\n\
             \x20 esptool --port {raw} flash-id\n\
             \x20 esptool --port {raw} -b 921600 write-flash 0x10000 some.bin\n\
             \x20 python -m serial.tools.miniterm {rfc} 115200\n"
        ));
    }
    text.push_str("Ctrl-C stops.");
    eprintln!("{text}");
}

/// A per-board file name: `events.jsonl` becomes `events-esp2.jsonl` when there are several.
fn per_board(path: &Option<PathBuf>, name: &str, many: bool) -> Option<PathBuf> {
    let path = path.as_ref()?;
    if !many {
        return Some(path.clone());
    }
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("demo");
    let file = match path.extension().and_then(|e| e.to_str()) {
        Some(ext) => format!("{stem}-{name}.{ext}"),
        None => format!("{stem}-{name}"),
    };
    Some(path.with_file_name(file))
}

/// `file`: the boards of a configuration file (`--config`), each served with a virtual chip
/// on its own ports, instead of `--boards` numbered ones.
pub fn run_demo(
    args: DemoArgs,
    overrides: &Overrides,
    control_socket: Option<&Path>,
    file: Option<Config>,
) -> Result {
    if file.is_some() && args.boards > 1 {
        return Err(Error::usage(
            "--boards and --config both say which boards to serve: give one of them",
        ));
    }
    let count = file
        .as_ref()
        .map_or(usize::from(args.boards), |c| c.boards.len());
    let many = count > 1;
    // With several boards, --listen gives the first port and the host; each board takes the
    // next pair.
    let (host, base) = match overrides.listen.first() {
        Some(a) if many => (a.ip(), a.port()),
        _ => (std::net::IpAddr::from(DEMO_HOST), DEMO_PORT),
    };
    let (mut config, from_file) = match file {
        Some(mut c) => {
            let boards = std::mem::take(&mut c.boards);
            (c, boards)
        }
        None => {
            let mut c = Config::default();
            c.boards.clear();
            (c, Vec::new())
        }
    };
    if let Some(secs) = args.takeover_idle_secs {
        config.network.takeover_idle = Duration::from_secs(secs);
    }
    if let Some(secs) = args.claim_wait_secs {
        config.network.claim_wait = Duration::from_secs(secs);
    }
    let template = Config::default().boards.remove(0);
    let mut sims = Vec::new();
    let mut drivers = Vec::new();
    for i in 0..count {
        let given = from_file.get(i);
        let name = match given {
            Some(b) => b.name.clone(),
            None if many => format!("esp{}", i + 1),
            None => template.name.clone(),
        };
        let sim = Esp32Sim::start(SimConfig {
            pace: args.pace,
            power_on: BootMode::App,
            event_log: per_board(&args.event_log, &name, many),
            flash_file: per_board(&args.flash_file, &name, many),
            max_baud: args.sim_max_baud,
            ..SimConfig::default()
        })
        .map_err(|e| Error::failure(format!("cannot start the virtual ESP32 {name}: {e}")))?;
        let port = |k: usize| {
            u16::try_from(2 * i + k)
                .ok()
                .and_then(|o| base.checked_add(o))
                .ok_or_else(|| {
                    Error::usage(format!(
                        "--listen port {base} leaves no room for {count} boards"
                    ))
                })
        };
        let mut board = match given {
            // The file's board: its ports and settings, on a virtual chip.
            Some(b) => b.clone(),
            None => {
                let mut board = template.clone();
                board.name = name;
                board.serial.flash_baud =
                    crate::config::FlashBaud::try_from(i64::from(args.flash_baud))
                        .map_err(|e| Error::usage(format!("--flash-baud: {e}")))?;
                board.listen = vec![SocketAddr::from((host, port(0)?))];
                board.raw_listen = vec![SocketAddr::from((host, port(1)?))];
                board
            }
        };
        board.serial.device = sim.device_path().to_path_buf();
        board.control.backend = match args.wiring {
            Wiring::Gpio => ControlBackend::Gpio,
            Wiring::Modem => ControlBackend::Modem,
        };
        board.control.mode = match args.mode {
            DemoMode::Esp => ControlMode::Esp,
            DemoMode::Direct => ControlMode::Direct,
        };
        let driver: Box<dyn LineDriver> = match args.wiring {
            Wiring::Gpio => Box::new(SimLines(sim.pins())),
            Wiring::Modem => Box::new(ModemLines::new(SimAutoProgram {
                pins: sim.pins(),
                generation: Arc::new(AtomicU64::new(0)),
            })),
        };
        drivers.push((board.name.clone(), driver));
        config.boards.push(board);
        sims.push(sim);
    }
    // The devices and the control lines are the virtual chips'; the ports and the rate may
    // be overridden (a single board's).
    let mut demo_overrides = overrides.clone();
    demo_overrides.device = None;
    demo_overrides.control = None;
    if many {
        demo_overrides.listen.clear();
        if !demo_overrides.raw_listen.is_empty() || !demo_overrides.console_listen.is_empty() {
            return Err(Error::usage(
                "with --boards, --listen HOST:PORT gives the first port and each board takes the next two: leave out --raw-listen and --console-listen",
            ));
        }
    }
    config.apply(&demo_overrides)?;
    let served = crate::service::block_on(async {
        let signals = crate::service::install_signals()?;
        // Sockets systemd passes (named BOARD.rfc2217 / BOARD.raw), or the demo's own.
        let sockets = crate::service::sockets(&config, control_socket).await?;
        // Said once the ports are bound, with the addresses they really have.
        let shown: Vec<_> = config
            .boards
            .iter()
            .map(|b| {
                let listeners = sockets
                    .boards
                    .get(&b.name)
                    .map(|ls| {
                        ls.iter()
                            .filter_map(|(l, k)| Some((l.local_addr().ok()?, *k)))
                            .collect::<Vec<_>>()
                    })
                    .unwrap_or_default();
                (
                    b.name.clone(),
                    b.serial.device.display().to_string(),
                    listeners,
                )
            })
            .collect();
        banner(&shown);
        let mut controls = BTreeMap::new();
        for (name, driver) in drivers {
            if let Some(board) = config.board(&name) {
                let control = crate::bridge::board_span(&name)
                    .in_scope(|| crate::control::policy_over(driver, &board.control));
                controls.insert(name, control);
            }
        }
        crate::service::serve_with(config, sockets, controls, signals, None).await
    });
    drop(sims);
    served
}
