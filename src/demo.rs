//! `esp-bridge demo` and `esp-bridge sim`: the bridge in front of a virtual ESP32, so that
//! esptool, idf.py monitor and pyserial can be tried on any Linux machine.
//!
//! The demo is the production server with two seams replaced: the serial device is the
//! virtual chip's pseudo-terminal, and the control lines drive the virtual chip's EN and IO0
//! pins as the seed wiring drives a real board.

use crate::cli::exit;
use crate::config::{Config, Overrides};
use crate::control::{DirectControl, LineDriver, Straps};
use crate::sim::{BootMode, Esp32Sim, Level, SimConfig, StrapPins};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

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
}

#[derive(Debug, clap::Args)]
pub struct SimArgs {
    /// Symlink to create to the pseudo-terminal (the device path to give the bridge)
    #[arg(long, value_name = "PATH")]
    link: Option<PathBuf>,
    /// What the chip does at power-on
    #[arg(long, value_enum, default_value = "download")]
    boot: SimBoot,
    /// Append the chip's pin and mode events to this file (JSON lines)
    #[arg(long, value_name = "PATH")]
    event_log: Option<PathBuf>,
    /// Keep the flash in this file
    #[arg(long, value_name = "PATH")]
    flash_file: Option<PathBuf>,
    /// Make the UART as slow as a real one
    #[arg(long)]
    pace: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum SimBoot {
    /// Run the application
    App,
    /// Wait in the ROM loader ("waiting for download")
    Download,
}

/// Drives the virtual chip's pins: asserted = low, as the seed wiring does.
struct SimLines(StrapPins);

impl LineDriver for SimLines {
    fn drive(&mut self, s: Straps) -> std::io::Result<()> {
        let level = |asserted: bool| if asserted { Level::Low } else { Level::High };
        self.0.set(level(s.reset), level(s.boot));
        Ok(())
    }
    fn describe(&self) -> String {
        "the virtual ESP32's EN and IO0 pins".into()
    }
}

/// The default demo address: loopback only, since the demo is for trying things locally.
const DEMO_LISTEN: ([u8; 4], u16) = ([127, 0, 0, 1], 2217);

fn start_sim(config: SimConfig) -> Result<Esp32Sim, u8> {
    Esp32Sim::start(config).map_err(|e| {
        eprintln!("esp-bridge: cannot start the virtual ESP32: {e}");
        exit::FAILURE
    })
}

pub fn run_demo(args: DemoArgs, overrides: &Overrides) -> u8 {
    let sim = match start_sim(SimConfig {
        pace: args.pace,
        power_on: BootMode::App,
        event_log: args.event_log,
        flash_file: args.flash_file,
        ..SimConfig::default()
    }) {
        Ok(sim) => sim,
        Err(code) => return code,
    };
    let mut config = Config::default();
    config.network.listen = vec![SocketAddr::from(DEMO_LISTEN)];
    config.serial.device = sim.device_path().to_path_buf();
    let mut demo_overrides = overrides.clone();
    // The device and the control lines are the virtual chip's; the rest may be overridden.
    demo_overrides.device = None;
    demo_overrides.control = None;
    if let Err(e) = config.apply(&demo_overrides) {
        eprintln!("esp-bridge: {e}");
        return exit::USAGE;
    }
    let url = config
        .network
        .listen
        .first()
        .map(|a| format!("rfc2217://{a}"))
        .unwrap_or_default();
    eprintln!(
        "esp-bridge demo: a virtual ESP32 is on {} and served at {url}\n\
         Try, in another terminal (pip install esptool):\n\
         \x20 esptool --port {url} flash-id\n\
         \x20 esptool --port {url} write-flash 0x10000 some.bin\n\
         \x20 python -m serial.tools.miniterm {url} 115200\n\
         Ctrl-C stops.",
        sim.device_path().display()
    );
    let control: Box<dyn crate::control::Control> =
        Box::new(DirectControl::new(SimLines(sim.pins())));
    let rt = match crate::cli::runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let code = rt.block_on(crate::cli::serve_with(
        config,
        Arc::new(Mutex::new(control)),
    ));
    drop(sim);
    code
}

pub fn run_sim(args: SimArgs) -> u8 {
    let sim = match start_sim(SimConfig {
        pace: args.pace,
        power_on: match args.boot {
            SimBoot::App => BootMode::App,
            SimBoot::Download => BootMode::Download,
        },
        event_log: args.event_log,
        flash_file: args.flash_file,
        link: args.link,
        ..SimConfig::default()
    }) {
        Ok(sim) => sim,
        Err(code) => return code,
    };
    // The path on stdout, alone, so scripts can read it.
    println!("{}", sim.device_path().display());
    eprintln!("virtual ESP32 running; Ctrl-C or SIGTERM stops it");
    let rt = match crate::cli::runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(crate::shutdown::requested());
    drop(sim);
    exit::OK
}
