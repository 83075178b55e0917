//! `esp-bridge demo`: the bridge in front of a virtual ESP32 (the esp-sim crate), so that
//! esptool, idf.py monitor and pyserial can be tried on any Linux machine.
//!
//! The demo is the production server with two seams replaced: the serial device is the
//! virtual chip's pseudo-terminal, and the lowest layer of the control lines drives the
//! virtual chip's pins: either wired straight, as the seed wires Pi GPIOs to EN and IO0, or
//! through a model of a dev board's auto-program circuit (with its EN capacitor), as the modem
//! backend sees one. Everything above that seam (the reset engine, the line translation) is
//! the production code.

use crate::bridge::PortKind;
use crate::config::{Config, ControlBackend, ControlMode, Overrides};
use crate::control::{LineDriver, ModemLines, ModemPort, Straps};
use crate::error::{Error, Result};
use esp_sim::{BootMode, Esp32Sim, Level, SimConfig, StrapPins};
use std::net::SocketAddr;
use std::path::PathBuf;
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
}

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

/// The default demo address: loopback only, since the demo is for trying things locally.
const DEMO_LISTEN: ([u8; 4], u16) = ([127, 0, 0, 1], 2217);
const DEMO_RAW_LISTEN: ([u8; 4], u16) = ([127, 0, 0, 1], 2218);

/// What to try, printed once the ports are bound.
fn banner(device: &str, listeners: &[crate::bridge::Listener]) {
    let url = |kind: PortKind, scheme: &str| {
        listeners
            .iter()
            .filter(|(_, k)| *k == kind)
            .find_map(|(l, _)| l.local_addr().ok())
            .map(|a| format!("{scheme}://{a}"))
            .unwrap_or_else(|| format!("(no {kind} port)"))
    };
    let (rfc, raw) = (
        url(PortKind::Rfc2217, "rfc2217"),
        url(PortKind::EspRaw, "socket"),
    );
    eprintln!(
        "esp-bridge demo: a virtual ESP32 is on {device}, served at {raw} (fast raw port, for \
         flashing) and {rfc} (RFC 2217, for monitors)\n\
         Try, in another terminal (pip install esptool):\n\
         \x20 esptool --port {raw} flash-id\n\
         \x20 esptool --port {raw} -b 921600 write-flash 0x10000 some.bin\n\
         \x20 python -m serial.tools.miniterm {rfc} 115200\n\
         Ctrl-C stops."
    );
}

pub fn run_demo(args: DemoArgs, overrides: &Overrides) -> Result {
    let sim = Esp32Sim::start(SimConfig {
        pace: args.pace,
        power_on: BootMode::App,
        event_log: args.event_log,
        flash_file: args.flash_file,
        ..SimConfig::default()
    })
    .map_err(|e| Error::failure(format!("cannot start the virtual ESP32: {e}")))?;
    let mut config = Config::default();
    config.network.listen = vec![SocketAddr::from(DEMO_LISTEN)];
    config.network.raw_listen = vec![SocketAddr::from(DEMO_RAW_LISTEN)];
    config.serial.device = sim.device_path().to_path_buf();
    let mut demo_overrides = overrides.clone();
    // The device and the control lines are the virtual chip's; the rest may be overridden.
    demo_overrides.device = None;
    demo_overrides.control = None;
    config.apply(&demo_overrides)?;
    let driver: Box<dyn LineDriver> = match args.wiring {
        Wiring::Gpio => Box::new(SimLines(sim.pins())),
        Wiring::Modem => Box::new(ModemLines::new(SimAutoProgram {
            pins: sim.pins(),
            generation: Arc::new(AtomicU64::new(0)),
        })),
    };
    config.control.backend = match args.wiring {
        Wiring::Gpio => ControlBackend::Gpio,
        Wiring::Modem => ControlBackend::Modem,
    };
    config.control.mode = match args.mode {
        DemoMode::Esp => ControlMode::Esp,
        DemoMode::Direct => ControlMode::Direct,
    };
    let device = sim.device_path().display().to_string();
    let served = crate::service::block_on(async {
        let signals = crate::service::install_signals()?;
        let sockets = crate::service::Sockets {
            boards: crate::service::listeners(&config).await?,
            control: None,
        };
        // Said once the ports are bound, with the addresses they really have.
        banner(&device, &sockets.boards);
        let control = crate::control::policy_over(driver, &config.control);
        crate::service::serve_with(config, sockets, control, signals, None).await
    });
    drop(sim);
    served
}
