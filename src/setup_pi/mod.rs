//! `esp-bridge setup-pi`: gives the ESP board the Raspberry Pi's full UART on GPIO14/15 and
//! keeps everything else off it.
//!
//! Out of the box a Pi with Bluetooth drives its radio from the PL011 UART and leaves the header
//! the mini UART, whose rate follows the VPU clock, and Raspberry Pi OS runs a login console on
//! the header UART. A bridge that must carry esptool's 921600 baud byte-exact needs the PL011
//! there and nobody else reading or writing it. So, as raspi-config would:
//! - `config.txt`: `enable_uart=1`, `dtoverlay=disable-bt` and `dtparam=uart0=on`, in the `[all]`
//!   section (the Pi 5 has its own Bluetooth UART and a debug UART as `serial0`, and leaves the
//!   header's UART0 off unless `uart0=on`; older boards have that parameter on already);
//! - `cmdline.txt`: no `console=serial0,...` (nor `ttyAMA0`, nor `ttyS0`);
//! - `hciuart.service` and explicitly enabled serial gettys disabled.
//!
//! Boards of the configuration on the Pi's other UARTs, named by controller
//! (`/dev/serial/by-uart/uart3`, see `pi_uarts`), get their overlay too (`dtoverlay=uart3`
//! on a Pi 4, `uart3-pi5` on a Pi 5; `boards`), unless a board's EN or IO0 line sits on the
//! pins that UART would take.
//!
//! The editing is pure functions over file contents (`boot_files`), unit-tested there; the rest
//! is thin I/O (`system`) under the two commands (`apply`, `revert`). Every change is recorded
//! in a state file (`state`), so `--revert` undoes exactly ours: by restoring the backup when a
//! file is still as we left it, or by undoing our edits one by one when someone edited it since
//! (their edits stay).
//!
//! All file access goes through `tree`, which reaches every path from the root directory
//! without following symbolic links or `..`, so that a link planted in the tree (under `--root`
//! it may come from anywhere) cannot lead setup-pi, running as root, to files outside it.

mod apply;
mod boards;
mod boot_files;
mod revert;
mod state;
mod system;
mod tree;

use crate::config::{Config, Overrides};
use crate::error::Error;
use std::path::{Path, PathBuf};
use system::System;

/// Units that would talk on the UART: the Bluetooth attach service and serial gettys that were
/// enabled by hand (the ones the console= parameter starts go away with it).
const BLUETOOTH_UNIT: &str = "hciuart.service";
const GETTY_UNITS: [&str; 3] = [
    "serial-getty@ttyAMA0.service",
    "serial-getty@ttyS0.service",
    "serial-getty@serial0.service",
];

#[derive(Debug, clap::Args)]
pub struct SetupPiArgs {
    /// Work on the system mounted at DIR instead of / (systemd units are only reported and
    /// /run/reboot-required is not touched)
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Undo exactly the changes an earlier setup-pi made, keeping everything else
    #[arg(long)]
    revert: bool,
    /// Print what would be done; change nothing
    #[arg(long)]
    dry_run: bool,
    /// Treat the system as a Raspberry Pi even though /proc/device-tree/model does not say so:
    /// for building an SD-card image in a chroot, where /proc is the build machine's
    #[arg(long)]
    assume_pi: bool,
}

/// The configuration whose boards' UARTs are to be turned on: `--config`'s file, else
/// /etc/esp-bridge.toml of the system being set up (read through `tree` under `--root`);
/// `None` when there is none.
fn boards_config(sys: &System, explicit: Option<&Path>) -> Result<Option<Config>, Error> {
    if explicit.is_some() || !sys.under_root() {
        let (config, _) = Config::load(explicit, &Overrides::default())?;
        return Ok(Some(config));
    }
    let path = crate::config::DEFAULT_PATH;
    match sys.tree().read(path) {
        Ok(bytes) => {
            let shown = sys.show(path);
            let text = String::from_utf8(bytes)
                .map_err(|_| Error::config(format!("{shown} is not UTF-8 text")))?;
            Ok(Some(Config::parse(&text, Path::new(&shown))?))
        }
        Err(e) if e.not_found() => Ok(None),
        Err(e) => Err(Error::failure(
            e.message_unchanged(&format!("cannot read {}", sys.show(path))),
        )),
    }
}

/// Runs `esp-bridge setup-pi`; `config` is the global `--config`.
pub fn run(args: SetupPiArgs, config: Option<&Path>) -> crate::error::Result {
    if let Some(root) = &args.root
        && !root.is_dir()
    {
        return Err(Error::usage(format!(
            "--root {}: no such directory\n  hint: pass the directory where the Pi's root file system is mounted",
            root.display()
        )));
    }
    let sys = System::open(args.root.as_deref()).map_err(Error::failure)?;
    let result = if args.revert {
        revert::revert(&sys, args.dry_run)
    } else {
        let config = boards_config(&sys, config)?;
        apply::apply(&sys, config.as_ref(), args.dry_run, args.assume_pi)
    };
    result.map_err(Error::failure)
}
