//! The simulator's command line (`esp-sim`, and `esp-bridge sim`): one virtual ESP32 on a
//! pseudo-terminal or a unix socket until SIGTERM or SIGINT.

use crate::{BootMode, Esp32Sim, SimConfig, StubKind};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct SimArgs {
    /// Symlink to create to the pseudo-terminal (the device path to give the bridge)
    #[arg(long, value_name = "PATH")]
    link: Option<PathBuf>,
    /// What the chip does at power-on
    #[arg(long, value_enum, default_value = "download")]
    boot: SimBoot,
    /// Append the chip's events to this file, one JSON object a line: pins ("en", "io0"), "mode",
    /// "baud", "wrong_baud", "over_max_baud", "stub" (which stub an upload is taken for),
    /// "change_baudrate" (its arguments and resulting rate, 0 = no host can match it) and
    /// "command" (every loader command with the rate it arrived at)
    #[arg(long, value_name = "PATH")]
    event_log: Option<PathBuf>,
    /// Keep the flash in this file
    #[arg(long, value_name = "PATH")]
    flash_file: Option<PathBuf>,
    /// Make the UART as slow as a real one
    #[arg(long)]
    pace: bool,
    /// Instead of a pseudo-terminal, connect the chip's UART to this unix stream socket (a VM's
    /// serial port, e.g. qemu -chardev socket,path=PATH,server=on,wait=off). The host's baud
    /// rate cannot be seen through it: the chip assumes the host is at the chip's rate
    #[arg(long, value_name = "PATH", conflicts_with = "link")]
    connect_unix: Option<PathBuf>,
    /// Listen on this unix stream socket for strap changes: a line `en=low io0=high` sets both
    /// pins at once (either alone keeps the other), `get` reads them; answers `ok`
    #[arg(long, value_name = "PATH")]
    control_unix: Option<PathBuf>,
    /// Which flasher stub an upload is taken for. They differ in CHANGE_BAUDRATE (new rate, old
    /// rate): the legacy stub (esptool <= 5.2) sets current rate x new / old, so a wrong old rate
    /// gives a wrong rate; esp-flasher-stub (esptool >= 5.3) sets the new rate. auto: by the
    /// address the stub's text is loaded at (ESP32: 0x400be000 legacy, 0x400a8000
    /// esp-flasher-stub; anything else counts as legacy)
    #[arg(long, value_enum, default_value = "auto")]
    stub: SimStub,
    /// The fastest rate the wiring carries (a Pi UART, adapter or cable): while the chip's UART
    /// runs faster, every byte in both directions arrives garbled (event "over_max_baud")
    #[arg(long, value_name = "BAUD", value_parser = clap::value_parser!(u32).range(1..))]
    max_baud: Option<u32>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum SimStub {
    /// By the upload address
    Auto,
    /// esptool-legacy-flasher-stub
    Legacy,
    /// esp-flasher-stub
    Flasher,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum SimBoot {
    /// Run the application
    App,
    /// Wait in the ROM loader ("waiting for download")
    Download,
}

/// Runs the simulator until SIGTERM or SIGINT; an error says why it could not start.
pub fn run(args: SimArgs) -> Result<(), String> {
    let sim = match Esp32Sim::start(SimConfig {
        pace: args.pace,
        power_on: match args.boot {
            SimBoot::App => BootMode::App,
            SimBoot::Download => BootMode::Download,
        },
        event_log: args.event_log,
        flash_file: args.flash_file,
        link: args.link,
        connect_unix: args.connect_unix,
        control_unix: args.control_unix,
        stub: match args.stub {
            SimStub::Auto => None,
            SimStub::Legacy => Some(StubKind::Legacy),
            SimStub::Flasher => Some(StubKind::Flasher),
        },
        max_baud: args.max_baud,
        ..SimConfig::default()
    }) {
        Ok(sim) => sim,
        Err(e) => return Err(format!("cannot start the virtual ESP32: {e}")),
    };
    // The path on stdout, alone, so scripts can read it.
    println!("{}", sim.device_path().display());
    eprintln!("virtual ESP32 running; Ctrl-C or SIGTERM stops it");
    let waited = wait_for_stop().map_err(|e| format!("cannot wait for signals: {e}"));
    drop(sim);
    waited
}

fn wait_for_stop() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        Ok(())
    })
}
