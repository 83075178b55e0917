//! `setup-pi --revert`: undoes exactly what the state file records, restoring a file from its
//! backup when it is still as setup-pi left it, or undoing only setup-pi's edits otherwise.

use super::boot_files::{Edit, undo};
use super::state::{BACKUP_DIR, STATE_DIR, STATE_FILE, md5_hex};
use super::system::{System, systemctl};
use super::tree::TreeError;

pub(super) fn revert(sys: &System, dry_run: bool) -> Result<(), String> {
    let Some(state) = sys.load_state()? else {
        println!(
            "esp-bridge setup-pi --revert: nothing to revert ({} does not exist: setup-pi changed nothing here, or it was reverted already)",
            sys.show(STATE_FILE)
        );
        return Ok(());
    };
    println!(
        "esp-bridge setup-pi --revert: undoing the changes recorded in {}",
        sys.show(STATE_FILE)
    );
    let mut changed_any = false;
    // Every file is read and worked out before the first is written.
    let mut writes: Vec<(&str, Vec<u8>)> = Vec::new();
    for f in &state.files {
        let shown = sys.show(&f.path);
        let current = match sys.tree().read(&f.path) {
            Ok(b) => b,
            Err(e) if e.not_found() => {
                println!("  {shown}: gone; nothing to undo there");
                continue;
            }
            Err(e) => return Err(e.message_unchanged(&format!("cannot read {shown}"))),
        };
        let backup = match sys.tree().read(&f.backup) {
            Ok(b) => Some(b),
            Err(e @ TreeError::Refused { .. }) => {
                return Err(e.message_unchanged(&format!("cannot read {}", sys.show(&f.backup))));
            }
            // Gone or unreadable: our edits are undone one by one instead.
            Err(TreeError::Io(_)) => None,
        };
        let (new, how) = match backup {
            Some(b) if f.clean && md5_hex(&current) == f.md5_after => (
                b,
                if dry_run {
                    "unchanged since setup-pi: would be restored from its backup"
                } else {
                    "restored from its backup (unchanged since setup-pi)"
                },
            ),
            _ => {
                let text = String::from_utf8(current.clone()).map_err(|_| {
                    format!(
                        "{shown} is no longer UTF-8 text, so our edits cannot be undone line by line; nothing was changed.\n  \
                         hint: the file as it was before setup-pi is {}",
                        sys.show(&f.backup)
                    )
                })?;
                let (text, notes) = undo(&text, &f.edits);
                for note in notes {
                    println!("  {shown}: note: {note}");
                }
                (
                    text.into_bytes(),
                    if dry_run {
                        "edited since setup-pi: would undo only our edits and keep the others"
                    } else {
                        "edited since setup-pi: undid only our edits, the others are kept"
                    },
                )
            }
        };
        if new == current {
            println!("  {shown}: nothing of ours left to undo");
            continue;
        }
        for edit in &f.edits {
            let what = match (edit, dry_run) {
                (Edit::Added { text, .. }, false) => format!("removed {text}"),
                (Edit::Added { text, .. }, true) => format!("would remove {text}"),
                (Edit::Replaced { from, to, .. }, false) => format!("changed back {to} -> {from}"),
                (Edit::Replaced { from, to, .. }, true) => {
                    format!("would change back {to} -> {from}")
                }
                (Edit::RemovedWord { text, .. }, false) => format!("put back {text}"),
                (Edit::RemovedWord { text, .. }, true) => format!("would put back {text}"),
            };
            println!("  {shown}: {what}");
        }
        println!("  {shown}: {how}");
        changed_any = true;
        writes.push((&f.path, new));
    }
    if !dry_run {
        sys.check_writes(&writes.iter().map(|(path, _)| *path).collect::<Vec<_>>())?;
        for (path, new) in &writes {
            sys.write(path, new)?;
        }
    }
    for unit in &state.units {
        if dry_run {
            println!("  {unit}: would enable again");
            continue;
        }
        if sys.under_root() {
            // This machine's systemd is not the Pi's.
            println!("  {unit}: on the Pi run: sudo systemctl enable {unit}");
            continue;
        }
        match systemctl(&["enable", unit]) {
            Some((true, _)) => println!("  {unit}: enabled again"),
            Some((false, out)) => println!(
                "  {unit}: could not enable it ({}); run: sudo systemctl enable {unit}",
                out.trim()
            ),
            None => println!("  {unit}: systemctl not found; run: sudo systemctl enable {unit}"),
        }
    }
    if dry_run {
        println!("Dry run: nothing was changed.");
        return Ok(());
    }
    for f in &state.files {
        let _ = sys.tree().remove_file(&f.backup);
    }
    sys.tree()
        .remove_file(STATE_FILE)
        .map_err(|e| e.message(&format!("cannot remove {}", sys.show(STATE_FILE))))?;
    // Only if empty: anything else there is not ours to delete.
    let _ = sys.tree().remove_dir(BACKUP_DIR);
    let _ = sys.tree().remove_dir(STATE_DIR);
    if changed_any || !state.units.is_empty() {
        sys.reboot_notice();
    }
    Ok(())
}
