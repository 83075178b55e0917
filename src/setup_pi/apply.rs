//! `setup-pi` itself: reads both boot files, plans the edits, records them and the backups,
//! then writes the files and disables the units that would use the UART.

use super::boards::{self, BoardUarts};
use super::boot_files::{Outcome, apply_cmdline_txt, apply_config_txt, describe};
use super::state::{BACKUP_DIR, FileState, STATE_FILE, backup_for, md5_hex};
use super::system::{System, systemctl};
use super::{BLUETOOTH_UNIT, GETTY_UNITS};
use crate::config::Config;
use crate::pi_uarts::Family;

struct FilePlan {
    path: String,
    old: String,
    outcome: Outcome,
}

pub(super) fn apply(
    sys: &System,
    config: Option<&Config>,
    dry_run: bool,
    assume_pi: bool,
) -> Result<(), String> {
    let (model, family) = match sys.pi_model() {
        Ok(model) => {
            let family = Family::of_model(&model);
            (model, Some(family))
        }
        Err(_) if assume_pi => ("a Raspberry Pi (assumed: --assume-pi)".to_string(), None),
        Err(e) => return Err(e),
    };
    let boards_known = config.is_some();
    let uarts = match config {
        Some(config) => boards::plan(config, family)?,
        None => BoardUarts::default(),
    };
    let boot = sys.boot_dir()?;
    let config_path = format!("{boot}/config.txt");
    let cmdline_path = format!("{boot}/cmdline.txt");
    // Both are read before anything is written: a missing or unreadable one changes nothing.
    let config = sys.read_text(&config_path)?;
    let cmdline = sys.read_text(&cmdline_path)?;
    let config_outcome = apply_config_txt(&config, &uarts.overlays);
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
    // With a configuration, its boards' devices are checked one by one instead (`boards`).
    if family == Some(Family::Pi5) && !boards_known {
        // serial0 is the debug connector's UART (ttyAMA10) on these; uart0=on makes ttyAMA0.
        println!(
            "  note: on this board GPIO14/15 is /dev/ttyAMA0 (/dev/serial0 is the debug connector): \
             set device = \"/dev/ttyAMA0\" in /etc/esp-bridge.toml"
        );
    }
    for note in &uarts.notes {
        println!("  note: {note}");
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
            "  config.txt and cmdline.txt already set up: the full UART is on GPIO14/15 with no console on it{}",
            if uarts.overlays.is_empty() {
                ""
            } else {
                ", and the boards' UARTs are on"
            }
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
    // Everything about to be written, checked before the first write: a link at any of them
    // or on the way to them stops the run with nothing changed.
    let mut writes: Vec<String> = Vec::new();
    for plan in &changed {
        writes.push(plan.path.clone());
        if !state.files.iter().any(|f| f.path == plan.path) {
            writes.push(backup_of(&plan.path)?);
        }
    }
    writes.push(STATE_FILE.to_string());
    sys.check_writes(&writes.iter().map(String::as_str).collect::<Vec<_>>())?;
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
                let backup = backup_of(&plan.path)?;
                sys.write_backup(&backup, plan.old.as_bytes())?;
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

/// Where the untouched copy of the boot file `path` goes.
fn backup_of(path: &str) -> Result<String, String> {
    backup_for(path).ok_or_else(|| {
        format!("setup-pi has no backup name for {path}; nothing was changed.\n  hint: this is a bug in setup-pi; please report it")
    })
}
