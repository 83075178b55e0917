//! The record of what setup-pi changed (the state file), from which `--revert` undoes exactly
//! that: per file, where its untouched copy is, the edits made, and a checksum that tells
//! whether anybody edited the file since.

use super::boot_files::Edit;
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};

/// Where the record of our changes lives (inside `--root`).
pub(super) const STATE_FILE: &str = "/var/lib/esp-bridge/setup-pi.toml";
/// Where the untouched copies of the files we changed live (inside `--root`).
pub(super) const BACKUP_DIR: &str = "/var/lib/esp-bridge/setup-pi";

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

pub(super) fn md5_hex(bytes: &[u8]) -> String {
    Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::setup_pi::apply::BLUETOOTH_UNIT;
    use crate::setup_pi::boot_files::apply_config_txt;

    #[test]
    fn state_round_trips_through_toml() {
        let o = apply_config_txt("enable_uart=0\n");
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
}
