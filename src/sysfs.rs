//! Reading the kernel's trees (sysfs, /proc/device-tree, /dev) below a root directory: `/` on
//! a Pi, a fixture tree in the tests. Nothing here opens a device.

use std::path::Path;

/// The names in `dir`, sorted; none when it cannot be read.
pub fn names_in(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    names.sort();
    names
}

/// A small text attribute (sysfs file, device-tree string) without surrounding whitespace
/// and NULs; `None` when missing or empty.
pub fn read_trimmed(path: &Path) -> Option<String> {
    let text = std::fs::read(path).ok()?;
    let text = String::from_utf8(text).ok()?;
    let t = text.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    (!t.is_empty()).then(|| t.to_string())
}
