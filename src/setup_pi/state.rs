//! The record of what setup-pi changed (the state file), from which `--revert` undoes exactly
//! that: per file, where its untouched copy is, the edits made, and a checksum that tells
//! whether anybody edited the file since. Read back, it is checked to name nothing but what
//! setup-pi itself writes, as it decides which files are rewritten and deleted.

use super::boot_files::Edit;
use super::{BLUETOOTH_UNIT, GETTY_UNITS};
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

/// The directory of the record and the backups (inside `--root`).
pub(super) const STATE_DIR: &str = "/var/lib/esp-bridge";
/// Where the record of our changes lives (inside `--root`).
pub(super) const STATE_FILE: &str = "/var/lib/esp-bridge/setup-pi.toml";
/// Where the untouched copies of the files we changed live (inside `--root`).
pub(super) const BACKUP_DIR: &str = "/var/lib/esp-bridge/setup-pi";
/// Where the boot files are: /boot/firmware on Bookworm and later, /boot before.
pub(super) const BOOT_DIRS: [&str; 2] = ["/boot/firmware", "/boot"];
/// The boot files setup-pi edits, in one of [`BOOT_DIRS`].
const BOOT_FILES: [&str; 2] = ["config.txt", "cmdline.txt"];

/// The backup setup-pi keeps of `path`, or None when `path` is no file it edits.
pub(super) fn backup_for(path: &str) -> Option<String> {
    let (dir, name) = path.rsplit_once('/')?;
    (BOOT_DIRS.contains(&dir) && BOOT_FILES.contains(&name)).then(|| format!("{BACKUP_DIR}/{name}"))
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct State {
    #[serde(default)]
    pub(super) files: Vec<FileState>,
    /// Units we disabled, to enable again on --revert.
    #[serde(default)]
    pub(super) units: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct FileState {
    /// The file, as a path inside --root.
    pub(super) path: String,
    /// Its content before our first change, as a path inside --root.
    pub(super) backup: String,
    /// MD5 of the content we left: tells whether anybody edited the file since.
    pub(super) md5_after: String,
    /// Only our edits were made since the backup, so restoring it is an exact undo.
    pub(super) clean: bool,
    pub(super) edits: Vec<Edit>,
}

impl State {
    /// Checks that the record names only what setup-pi itself writes: its boot files, each
    /// with the backup it would have made, and the units it disables. Anything else (a path
    /// going up with `..`, another file, a NUL) did not come from setup-pi, and acting on it
    /// could rewrite or delete any file, so the whole record is refused: the error says what
    /// is wrong in it.
    pub(super) fn check(&self) -> Result<(), String> {
        for f in &self.files {
            let Some(backup) = backup_for(&f.path) else {
                return Err(format!(
                    "it names {:?} as a file setup-pi changed, but setup-pi changes only config.txt and cmdline.txt in {} or {}",
                    f.path, BOOT_DIRS[0], BOOT_DIRS[1]
                ));
            };
            if f.backup != backup {
                return Err(format!(
                    "it names {:?} as the backup of {}, but setup-pi keeps that backup in {backup}",
                    f.backup, f.path
                ));
            }
        }
        for unit in &self.units {
            if unit != BLUETOOTH_UNIT && !GETTY_UNITS.contains(&unit.as_str()) {
                return Err(format!(
                    "it names {unit:?} as a unit setup-pi disabled, but setup-pi disables only {BLUETOOTH_UNIT} and {}",
                    GETTY_UNITS.join(", ")
                ));
            }
        }
        Ok(())
    }
}

pub(super) fn md5_hex(bytes: &[u8]) -> String {
    Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::setup_pi::boot_files::apply_config_txt;

    fn record(path: &str, backup: &str) -> State {
        State {
            files: vec![FileState {
                path: path.into(),
                backup: backup.into(),
                md5_after: md5_hex(b""),
                clean: true,
                edits: Vec::new(),
            }],
            units: Vec::new(),
        }
    }

    #[test]
    fn state_round_trips_through_toml() {
        let o = apply_config_txt("enable_uart=0\n", &[]);
        let state = State {
            files: vec![FileState {
                path: "/boot/firmware/config.txt".into(),
                backup: format!("{BACKUP_DIR}/config.txt"),
                md5_after: md5_hex(o.content.as_bytes()),
                clean: true,
                edits: o.edits.clone(),
            }],
            units: vec![BLUETOOTH_UNIT.into()],
        };
        let text = toml::to_string(&state).expect("serializes");
        let back: State = toml::from_str(&text).expect("parses");
        assert_eq!(back.files[0].edits, o.edits);
        assert_eq!(back.units, [BLUETOOTH_UNIT]);
    }

    #[test]
    fn md5_is_the_usual_hex() {
        assert_eq!(md5_hex(b""), "d41d8cd98f00b204e9800998ecf8427e");
    }

    #[test]
    fn records_of_setup_pis_own_files_pass_the_check() {
        for dir in BOOT_DIRS {
            for name in BOOT_FILES {
                let path = format!("{dir}/{name}");
                let backup = backup_for(&path).expect("a boot file");
                assert_eq!(backup, format!("/var/lib/esp-bridge/setup-pi/{name}"));
                let mut state = record(&path, &backup);
                state.units = vec![BLUETOOTH_UNIT.into(), GETTY_UNITS[0].into()];
                assert_eq!(state.check(), Ok(()), "{path}");
            }
        }
        assert_eq!(State::default().check(), Ok(()));
    }

    #[test]
    fn paths_going_up_or_elsewhere_are_refused() {
        let backup = "/var/lib/esp-bridge/setup-pi/config.txt";
        for path in [
            "/../../../tmp/victim",
            "/boot/firmware/../../../etc/shadow",
            "/boot/firmware/../config.txt",
            "/boot/./config.txt",
            "/boot//config.txt",
            "boot/config.txt",
            "/etc/passwd",
            "/boot/firmware/config.txt\0",
            "/boot/firmware/config.txt\0/x",
            "/boot/firmware/start.elf",
            "/var/lib/esp-bridge/setup-pi.toml",
            "",
        ] {
            let err = record(path, backup).check().expect_err(path);
            assert!(
                err.contains("as a file setup-pi changed"),
                "{path:?}: {err}"
            );
        }
    }

    #[test]
    fn backups_other_than_setup_pis_own_are_refused() {
        let path = "/boot/firmware/config.txt";
        for backup in [
            "/../../../tmp/other",
            "/var/lib/esp-bridge/setup-pi/../../../../tmp/other",
            "/var/lib/esp-bridge/setup-pi/cmdline.txt",
            "/var/lib/esp-bridge/setup-pi.toml",
            "/boot/firmware/config.txt",
            "var/lib/esp-bridge/setup-pi/config.txt",
            "/var/lib/esp-bridge/setup-pi/config.txt\0",
            "",
        ] {
            let err = record(path, backup).check().expect_err(backup);
            assert!(err.contains("as the backup of"), "{backup:?}: {err}");
        }
    }

    #[test]
    fn units_other_than_setup_pis_own_are_refused() {
        for unit in ["ssh.service", "--root=/tmp", "../../hciuart.service", ""] {
            let state = State {
                files: Vec::new(),
                units: vec![unit.into()],
            };
            let err = state.check().expect_err(unit);
            assert!(
                err.contains("as a unit setup-pi disabled"),
                "{unit:?}: {err}"
            );
        }
    }
}
