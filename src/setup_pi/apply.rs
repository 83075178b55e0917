//! `setup-pi` itself: reads both boot files, plans the edits, records them and the backups,
//! then writes the files and disables the units that would use the UART.

use super::boot_files::{Outcome, apply_cmdline_txt, apply_config_txt, describe};
use super::state::{BACKUP_DIR, FileState, md5_hex};
use super::system::{System, hint_for, systemctl};
use std::fs;
use std::path::Path;

/// Units that would talk on the UART: the Bluetooth attach service and serial gettys that were
/// enabled by hand (the ones the console= parameter starts go away with it).
pub(super) const BLUETOOTH_UNIT: &str = "hciuart.service";
const GETTY_UNITS: [&str; 3] = [
    "serial-getty@ttyAMA0.service",
    "serial-getty@ttyS0.service",
    "serial-getty@serial0.service",
];

struct FilePlan {
    path: String,
    old: String,
    outcome: Outcome,
}

pub(super) fn apply(sys: &System, dry_run: bool, assume_pi: bool) -> Result<(), String> {
    let model = match sys.pi_model() {
        Ok(model) => model,
        Err(_) if assume_pi => "a Raspberry Pi (assumed: --assume-pi)".to_string(),
        Err(e) => return Err(e),
    };
    let boot = sys.boot_dir()?;
    let config_path = format!("{boot}/config.txt");
    let cmdline_path = format!("{boot}/cmdline.txt");
    // Both are read before anything is written: a missing or unreadable one changes nothing.
    let config = sys.read_text(&config_path)?;
    let cmdline = sys.read_text(&cmdline_path)?;
    let config_outcome = apply_config_txt(&config);
    let cmdline_outcome = apply_cmdline_txt(&cmdline);
    let mut candidates: Vec<&str> = Vec::new();
    if config_outcome.bluetooth_off {
        candidates.push(BLUETOOTH_UNIT);
    }
    candidates.extend(GETTY_UNITS);
    let units = sys.enabled_units(&candidates);
    let plans = [
        FilePlan {
            path: config_path,
            old: config,
            outcome: config_outcome,
        },
        FilePlan {
            path: cmdline_path,
            old: cmdline,
            outcome: cmdline_outcome,
        },
    ];

    println!(
        "esp-bridge setup-pi: {model}; boot files in {}",
        sys.show(boot)
    );
    if model.contains("Raspberry Pi 5") || model.contains("Compute Module 5") {
        // serial0 is the debug connector's UART (ttyAMA10) on these; uart0=on makes ttyAMA0.
        println!(
            "  note: on this board GPIO14/15 is /dev/ttyAMA0 (/dev/serial0 is the debug connector): \
             set device = \"/dev/ttyAMA0\" in /etc/esp-bridge.toml"
        );
    }
    for plan in &plans {
        for note in &plan.outcome.notes {
            println!("  {}: note: {note}", sys.show(&plan.path));
        }
    }
    let changed: Vec<&FilePlan> = plans
        .iter()
        .filter(|p| !p.outcome.edits.is_empty())
        .collect();
    if changed.is_empty() {
        println!(
            "  config.txt and cmdline.txt already set up: the full UART is on GPIO14/15 with no console on it"
        );
        if units.is_empty() {
            println!("  nothing to change");
            return Ok(());
        }
    }
    for plan in &changed {
        for edit in &plan.outcome.edits {
            println!("  {}: {}", sys.show(&plan.path), describe(edit, !dry_run));
        }
    }
    if dry_run {
        for unit in &units {
            if sys.under_root() {
                println!("  {unit}: enabled there; would only report it (--root)");
            } else {
                println!("  {unit}: would disable (systemctl disable {unit})");
            }
        }
        println!("Dry run: nothing was changed.");
        return Ok(());
    }

    let mut state = sys.load_state()?.unwrap_or_default();
    for plan in &changed {
        let old_md5 = md5_hex(plan.old.as_bytes());
        let new_md5 = md5_hex(plan.outcome.content.as_bytes());
        match state.files.iter_mut().find(|f| f.path == plan.path) {
            // Changed before: the first backup stays the one to go back to.
            Some(f) => {
                f.clean = f.clean && f.md5_after == old_md5;
                f.md5_after = new_md5;
                f.edits.extend(plan.outcome.edits.iter().cloned());
            }
            None => {
                let name = Path::new(&plan.path)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let backup = format!("{BACKUP_DIR}/{name}");
                let dir = sys.path(BACKUP_DIR);
                fs::create_dir_all(&dir)
                    .map_err(|e| format!("cannot create {}: {e}{}", dir.display(), hint_for(&e)))?;
                sys.write(&backup, plan.old.as_bytes())?;
                state.files.push(FileState {
                    path: plan.path.clone(),
                    backup,
                    md5_after: new_md5,
                    clean: true,
                    edits: plan.outcome.edits.clone(),
                });
            }
        }
    }
    // Recorded before the files change, so that an interrupted run can still be reverted.
    sys.save_state(&state)?;
    for plan in &changed {
        sys.write(&plan.path, plan.outcome.content.as_bytes())?;
    }
    for unit in &units {
        if sys.under_root() {
            println!(
                "  {unit}: enabled in {}; on the Pi run: sudo systemctl disable {unit}",
                sys.show("/etc/systemd/system")
            );
            continue;
        }
        match systemctl(&["disable", unit]) {
            Some((true, _)) => {
                println!("  {unit}: disabled");
                state.units.push(unit.clone());
            }
            Some((false, out)) => println!(
                "  {unit}: could not disable it ({}); run: sudo systemctl disable {unit}",
                out.trim()
            ),
            None => println!("  {unit}: systemctl not found; run: sudo systemctl disable {unit}"),
        }
    }
    if !state.units.is_empty() {
        sys.save_state(&state)?;
    }
    if !changed.is_empty() {
        println!(
            "  the original files are kept in {}; esp-bridge setup-pi --revert undoes these changes",
            sys.show(BACKUP_DIR)
        );
        sys.reboot_notice();
    }
    Ok(())
}
