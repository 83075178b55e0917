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
//! The editing is pure functions over file contents ([`apply_config_txt`],
//! [`apply_cmdline_txt`], [`undo`]), unit-tested here; the rest is thin I/O. Every change is
//! recorded in a state file, so `--revert` undoes exactly ours: by restoring the backup when a
//! file is still as we left it, or by undoing our edits one by one when someone edited it since
//! (their edits stay).

use crate::error::Error;
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the record of our changes lives (inside `--root`).
const STATE_FILE: &str = "/var/lib/esp-bridge/setup-pi.toml";
/// Where the untouched copies of the files we changed live (inside `--root`).
const BACKUP_DIR: &str = "/var/lib/esp-bridge/setup-pi";
/// The device tree's board name: "Raspberry Pi 4 Model B Rev 1.4" and a NUL.
const MODEL_FILE: &str = "/proc/device-tree/model";
/// The comment put above the lines we add, so that a person reading config.txt knows why.
const MARK: &str =
    "# esp-bridge: full UART on GPIO14/15 for the ESP board (undo: esp-bridge setup-pi --revert)";
/// Overlays that give the PL011 to GPIO14/15. The `miniuart-bt` ones keep Bluetooth (on the
/// mini UART), so with them hciuart must stay enabled.
const DISABLE_BT: [&str; 3] = ["disable-bt", "pi3-disable-bt", "disable-bt-pi5"];
const MINIUART_BT: [&str; 2] = ["miniuart-bt", "pi3-miniuart-bt"];
/// The Pi 5 keeps UART0 (GPIO14/15) off by default; earlier boards have it on, so this is
/// harmless there.
const UART0_ON: &str = "dtparam=uart0=on";
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

// ---------------------------------------------------------------------------------------------
// Pure editing over file contents.

/// One change made to a file, recorded so that it can be undone later, even after other edits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Edit {
    /// We added this line; `line` is its 0-based index just after our change.
    Added { line: usize, text: String },
    /// We rewrote line `line` from `from` to `to`.
    Replaced {
        line: usize,
        from: String,
        to: String,
    },
    /// We removed word number `word` (0-based, counted at the moment of removal) of line `line`
    /// together with the whitespace `sep` that separated it from its neighbour.
    RemovedWord {
        line: usize,
        word: usize,
        text: String,
        sep: String,
    },
}

/// What applying our settings to one file gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The new content (equal to the input when `edits` is empty).
    pub content: String,
    pub edits: Vec<Edit>,
    /// Things the user should know that we deliberately did not change.
    pub notes: Vec<String>,
    /// config.txt only: Bluetooth is off after this (so hciuart can go too).
    pub bluetooth_off: bool,
}

impl Outcome {
    /// The outcome of editing `original` into `lines`: byte for byte the original when no
    /// edit was made (so nothing is rewritten, not even line endings).
    fn new(
        original: &str,
        lines: &[Line],
        edits: Vec<Edit>,
        notes: Vec<String>,
        bluetooth_off: bool,
    ) -> Self {
        let content = if edits.is_empty() {
            original.to_string()
        } else {
            join_lines(lines)
        };
        Outcome {
            content,
            edits,
            notes,
            bluetooth_off,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    text: String,
    /// "\n", "\r\n", or "" for a last line without a newline: kept as found.
    eol: String,
}

fn split_lines(content: &str) -> Vec<Line> {
    content
        .split_inclusive('\n')
        .map(|piece| {
            let (text, eol) = if let Some(t) = piece.strip_suffix("\r\n") {
                (t, "\r\n")
            } else if let Some(t) = piece.strip_suffix('\n') {
                (t, "\n")
            } else {
                (piece, "")
            };
            Line {
                text: text.to_string(),
                eol: eol.to_string(),
            }
        })
        .collect()
}

fn join_lines(lines: &[Line]) -> String {
    let mut out = String::new();
    for l in lines {
        out.push_str(&l.text);
        out.push_str(&l.eol);
    }
    out
}

/// The file's own line ending (a config.txt saved by Windows Notepad has CRLF).
fn newline_style(lines: &[Line]) -> &'static str {
    match lines.iter().find(|l| !l.eol.is_empty()) {
        Some(l) if l.eol == "\r\n" => "\r\n",
        _ => "\n",
    }
}

/// `[filter]` of a config.txt section header line.
fn section_header(text: &str) -> Option<&str> {
    text.trim().strip_prefix('[')?.strip_suffix(']')
}

/// `key` and `value` of an active (not commented out) `key=value` config.txt line.
fn setting(text: &str) -> Option<(&str, &str)> {
    let t = text.trim();
    if t.starts_with('#') || t.starts_with('[') {
        return None;
    }
    let (k, v) = t.split_once('=')?;
    Some((k.trim(), v.trim()))
}

/// For each line, whether it applies to every board: before the first conditional filter, or
/// after an `[all]` (which resets all filters).
fn unconditional(lines: &[Line]) -> Vec<bool> {
    let mut all = true;
    lines
        .iter()
        .map(|l| {
            if let Some(filter) = section_header(&l.text) {
                all = filter.trim().eq_ignore_ascii_case("all");
            }
            all
        })
        .collect()
}

/// Where new `[all]` lines go: after the last line of the last stretch that applies to every
/// board (the `[all]` at the end of Raspberry Pi OS's file), before its trailing blank lines so
/// the next section keeps its blank separator.
fn insertion_point(lines: &[Line], all: &[bool]) -> usize {
    let mut at = all.iter().rposition(|&a| a).map_or(0, |i| i + 1);
    while at > 0 && all[at - 1] && lines[at - 1].text.trim().is_empty() {
        at -= 1;
    }
    at
}

/// Sets `enable_uart=1`, `dtoverlay=disable-bt` and `dtparam=uart0=on` for every board in a
/// config.txt. Lines
/// already meaning the same are kept (no duplicates), comments and conditional sections are
/// left alone, and the file's line endings and missing final newline are preserved.
pub fn apply_config_txt(content: &str) -> Outcome {
    let mut lines = split_lines(content);
    let all = unconditional(&lines);
    let mut notes = Vec::new();

    // The last unconditional enable_uart wins, as in the firmware.
    let mut uart: Option<(usize, bool)> = None;
    // The overlay that already frees the PL011, if any.
    let mut overlay: Option<String> = None;
    // Whether the last unconditional `uart0` parameter turns it on (`dtparam=a=on,uart0`).
    let mut uart0_on = false;
    for (i, l) in lines.iter().enumerate() {
        let Some((key, value)) = setting(&l.text) else {
            continue;
        };
        if key == "enable_uart" {
            if all[i] {
                uart = Some((i, value == "1"));
            } else if value != "1" {
                notes.push(format!(
                    "line {}: `{}` under a board filter turns the UART off on the boards it matches; left as is (delete it if this Pi matches)",
                    i + 1,
                    l.text.trim()
                ));
            }
        } else if key == "dtparam" && all[i] {
            for param in value.split(',') {
                let (name, on) = param.split_once('=').unwrap_or((param, "on"));
                if name.trim() == "uart0" {
                    uart0_on = matches!(on.trim(), "on" | "true" | "yes" | "1");
                }
            }
        } else if key == "dtoverlay" && all[i] {
            let name = value.split(',').next().unwrap_or_default().trim();
            if DISABLE_BT.contains(&name) || MINIUART_BT.contains(&name) {
                overlay = Some(name.to_string());
            }
        }
    }

    let mut edits = Vec::new();
    let mut add: Vec<&str> = Vec::new();
    let mut replaced: Option<(usize, String)> = None;
    match uart {
        Some((_, true)) => {}
        Some((i, false)) => {
            // Rewritten in place rather than overridden below, so the file does not say both.
            let from = std::mem::replace(&mut lines[i].text, "enable_uart=1".to_string());
            replaced = Some((i, from));
        }
        None => add.push("enable_uart=1"),
    }
    let bluetooth_off = match &overlay {
        Some(name) if MINIUART_BT.contains(&name.as_str()) => {
            notes.push(format!(
                "dtoverlay={name} already gives the full UART to GPIO14/15 and keeps Bluetooth on the mini UART; left as is, and hciuart stays enabled"
            ));
            false
        }
        Some(_) => true,
        None => {
            add.push("dtoverlay=disable-bt");
            true
        }
    };
    if !uart0_on {
        add.push(UART0_ON);
    }

    if !add.is_empty() {
        let at = insertion_point(&lines, &all);
        let eol = newline_style(&lines);
        let block: Vec<&str> = std::iter::once(MARK).chain(add).collect();
        // A file without a final newline keeps that shape: the newline moves to the line that
        // used to be last, and our last line goes without one.
        let mut last_eol = eol;
        if at == lines.len()
            && let Some(last) = lines.last_mut()
            && last.eol.is_empty()
        {
            last.eol = eol.to_string();
            last_eol = "";
        }
        for (k, text) in block.iter().enumerate() {
            let e = if k + 1 == block.len() { last_eol } else { eol };
            lines.insert(
                at + k,
                Line {
                    text: (*text).to_string(),
                    eol: e.to_string(),
                },
            );
            edits.push(Edit::Added {
                line: at + k,
                text: (*text).to_string(),
            });
        }
        if let Some((i, _)) = &mut replaced
            && *i >= at
        {
            *i += block.len();
        }
    }
    if let Some((i, from)) = replaced {
        edits.insert(
            0,
            Edit::Replaced {
                line: i,
                from,
                to: "enable_uart=1".to_string(),
            },
        );
    }
    Outcome::new(content, &lines, edits, notes, bluetooth_off)
}

/// Byte ranges of the whitespace-separated words of a line.
fn words(text: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        let space = c == ' ' || c == '\t';
        match (space, start) {
            (false, None) => start = Some(i),
            (true, Some(s)) => {
                out.push((s, i));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push((s, text.len()));
    }
    out
}

/// A kernel console on the header UART: `console=serial0,115200`, `console=ttyAMA0`, ...
fn is_serial_console(word: &str) -> bool {
    word.strip_prefix("console=")
        .map(|dev| dev.split(',').next().unwrap_or_default())
        .is_some_and(|dev| matches!(dev, "serial0" | "ttyAMA0" | "ttyS0"))
}

/// Removes the kernel consoles on the header UART from a cmdline.txt, keeping every other byte
/// as it was (the firmware reads only the first line, so only that one is looked at).
pub fn apply_cmdline_txt(content: &str) -> Outcome {
    let mut lines = split_lines(content);
    let mut edits = Vec::new();
    if let Some(first) = lines.first_mut() {
        loop {
            let spans = words(&first.text);
            let Some(k) = spans
                .iter()
                .position(|&(s, e)| is_serial_console(&first.text[s..e]))
            else {
                break;
            };
            let (s, e) = spans[k];
            // Take the separator after the word, or before it when it is the last word, so the
            // words around it keep exactly one separator between them.
            let (from, to, sep) = if k + 1 < spans.len() {
                (s, spans[k + 1].0, first.text[e..spans[k + 1].0].to_string())
            } else if k > 0 {
                (spans[k - 1].1, e, first.text[spans[k - 1].1..s].to_string())
            } else {
                (s, e, String::new())
            };
            edits.push(Edit::RemovedWord {
                line: 0,
                word: k,
                text: first.text[s..e].to_string(),
                sep,
            });
            first.text.replace_range(from..to, "");
        }
    }
    Outcome::new(content, &lines, edits, Vec::new(), false)
}

/// The index of the line equal to `text` nearest to `near`: our line, even if the user added
/// or removed lines around it.
fn nearest(lines: &[Line], text: &str, near: usize) -> Option<usize> {
    lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.text == text)
        .min_by_key(|(i, _)| i.abs_diff(near))
        .map(|(i, _)| i)
}

/// Undoes `edits` (as recorded by the apply functions) on a file that may have been edited
/// since, leaving everything else as it is. Returns the content and a note for each edit that
/// was no longer there to undo.
pub fn undo(content: &str, edits: &[Edit]) -> (String, Vec<String>) {
    let mut lines = split_lines(content);
    let mut notes = Vec::new();
    for edit in edits.iter().rev() {
        match edit {
            Edit::Added { line, text } => match nearest(&lines, text, *line) {
                Some(i) => {
                    let removed = lines.remove(i);
                    // It was the last line, without a newline: the new last line goes without.
                    if removed.eol.is_empty()
                        && i == lines.len()
                        && let Some(prev) = lines.last_mut()
                    {
                        prev.eol.clear();
                    }
                }
                None => notes.push(format!(
                    "the line `{text}` we added is no longer there; nothing to undo for it"
                )),
            },
            Edit::Replaced { line, from, to } => match nearest(&lines, to, *line) {
                Some(i) => lines[i].text.clone_from(from),
                None => notes.push(format!(
                    "the line `{to}` (was `{from}`) has been changed since; left as it is now"
                )),
            },
            Edit::RemovedWord {
                line,
                word,
                text,
                sep,
            } => {
                if lines.is_empty() {
                    lines.push(Line {
                        text: String::new(),
                        eol: String::new(),
                    });
                }
                let i = (*line).min(lines.len() - 1);
                let l = &mut lines[i];
                let spans = words(&l.text);
                if spans.iter().any(|&(s, e)| &l.text[s..e] == text) {
                    notes.push(format!("`{text}` is there already; not added twice"));
                    continue;
                }
                let sep = if sep.is_empty() { " " } else { sep.as_str() };
                if let Some(&(s, _)) = spans.get(*word) {
                    l.text.insert_str(s, &format!("{text}{sep}"));
                } else if let Some(&(_, e)) = spans.last() {
                    l.text.insert_str(e, &format!("{sep}{text}"));
                } else {
                    l.text.insert_str(0, text);
                }
            }
        }
    }
    (join_lines(&lines), notes)
}

/// How an edit reads in the report; `done` false for --dry-run.
fn describe(edit: &Edit, done: bool) -> String {
    match (edit, done) {
        (Edit::Added { line, text }, true) => format!("added line {}: {text}", line + 1),
        (Edit::Added { line, text }, false) => format!("would add line {}: {text}", line + 1),
        (Edit::Replaced { line, from, to }, true) => {
            format!("changed line {}: {from} -> {to}", line + 1)
        }
        (Edit::Replaced { line, from, to }, false) => {
            format!("would change line {}: {from} -> {to}", line + 1)
        }
        (Edit::RemovedWord { text, .. }, true) => format!("removed {text}"),
        (Edit::RemovedWord { text, .. }, false) => format!("would remove {text}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The record of what we changed.

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    #[serde(default)]
    files: Vec<FileState>,
    /// Units we disabled, to enable again on --revert.
    #[serde(default)]
    units: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileState {
    /// The file, as a path inside --root.
    path: String,
    /// Its content before our first change, as a path inside --root.
    backup: String,
    /// MD5 of the content we left: tells whether anybody edited the file since.
    md5_after: String,
    /// Only our edits were made since the backup, so restoring it is an exact undo.
    clean: bool,
    edits: Vec<Edit>,
}

fn md5_hex(bytes: &[u8]) -> String {
    Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Thin I/O.

/// The system being set up: `/`, or the tree under `--root`.
struct System {
    root: Option<PathBuf>,
}

impl System {
    /// The real path of `path` (absolute, as seen on the Pi).
    fn path(&self, path: &str) -> PathBuf {
        match &self.root {
            Some(root) => root.join(path.trim_start_matches('/')),
            None => PathBuf::from(path),
        }
    }

    fn show(&self, path: &str) -> String {
        self.path(path).display().to_string()
    }

    /// The board's name, or an error when this is no Raspberry Pi.
    fn pi_model(&self) -> Result<String, String> {
        let file = self.show(MODEL_FILE);
        let raw = fs::read(self.path(MODEL_FILE)).map_err(|e| {
            format!(
                "cannot read {file} ({e}), so this does not look like a Raspberry Pi; nothing was changed.\n  \
                 hint: on another board, enable its UART by hand; to prepare a Pi's SD card from another machine, \
                 mount its root file system with the boot partition inside and pass --root, with the board's name in <root>{MODEL_FILE}"
            )
        })?;
        let model = String::from_utf8_lossy(&raw)
            .trim_end_matches('\0')
            .trim()
            .to_string();
        if model.contains("Raspberry Pi") {
            Ok(model)
        } else {
            Err(format!(
                "{file} says \"{model}\", not a Raspberry Pi; nothing was changed.\n  \
                 hint: setup-pi edits Raspberry Pi firmware files only; on this board enable the UART by hand"
            ))
        }
    }

    /// Where config.txt and cmdline.txt are: /boot/firmware on Bookworm and later, /boot before.
    fn boot_dir(&self) -> Result<&'static str, String> {
        if self.path("/boot/firmware/config.txt").is_file() {
            return Ok("/boot/firmware");
        }
        if self.path("/boot/firmware").is_dir() {
            return Err(format!(
                "{} is missing: on Raspberry Pi OS Bookworm and later the boot partition is mounted at {}; nothing was changed.\n  \
                 hint: check with `findmnt /boot/firmware`, mount it (sudo mount /boot/firmware), then run esp-bridge setup-pi again",
                self.show("/boot/firmware/config.txt"),
                self.show("/boot/firmware")
            ));
        }
        let old = self.path("/boot/config.txt");
        if old.is_file() {
            let text = fs::read(&old).unwrap_or_default();
            if String::from_utf8_lossy(&text).contains("DO NOT EDIT THIS FILE") {
                return Err(format!(
                    "{} says the real file has moved to /boot/firmware/config.txt, but {} does not exist; nothing was changed.\n  \
                     hint: mount the boot partition at /boot/firmware (sudo mount /boot/firmware), then run esp-bridge setup-pi again",
                    old.display(),
                    self.show("/boot/firmware")
                ));
            }
            return Ok("/boot");
        }
        Err(format!(
            "no config.txt in {} (Bookworm and later) nor in {} (Bullseye and earlier); nothing was changed.\n  \
             hint: is the boot partition mounted? `findmnt /boot/firmware /boot` shows it",
            self.show("/boot/firmware"),
            self.show("/boot")
        ))
    }

    fn read_text(&self, path: &str) -> Result<String, String> {
        let shown = self.show(path);
        let bytes = fs::read(self.path(path)).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => format!(
                "{shown} is missing; every Raspberry Pi OS boot partition has one, so nothing was changed.\n  \
                 hint: check that the boot partition is mounted and complete (restore the file from a fresh Raspberry Pi OS image if it was deleted)"
            ),
            _ => format!("cannot read {shown}: {e}{}", hint_for(&e)),
        })?;
        String::from_utf8(bytes).map_err(|_| {
            format!(
                "{shown} is not UTF-8 text; nothing was changed.\n  hint: open it in a text editor and save it as plain text"
            )
        })
    }

    fn write(&self, path: &str, bytes: &[u8]) -> Result<(), String> {
        write_atomic(&self.path(path), bytes)
            .map_err(|e| format!("cannot write {}: {e}{}", self.show(path), hint_for(&e)))
    }

    fn load_state(&self) -> Result<Option<State>, String> {
        let file = self.show(STATE_FILE);
        let text = match fs::read_to_string(self.path(STATE_FILE)) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read {file}: {e}{}", hint_for(&e))),
        };
        toml::from_str(&text).map(Some).map_err(|e| {
            format!(
                "{file} is damaged ({e}).\n  hint: the untouched files are in {}; compare them with yours, then delete {file}",
                self.show(BACKUP_DIR)
            )
        })
    }

    fn save_state(&self, state: &State) -> Result<(), String> {
        let body = toml::to_string(state).map_err(|e| {
            format!(
                "cannot record the changes in {}: {e}",
                self.show(STATE_FILE)
            )
        })?;
        let text = format!(
            "# Written by esp-bridge setup-pi: what it changed, for `esp-bridge setup-pi --revert`.\n{body}"
        );
        let dir = self.path(BACKUP_DIR);
        fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}{}", dir.display(), hint_for(&e)))?;
        self.write(STATE_FILE, text.as_bytes())
    }

    /// Which units are enabled now and should not be. Under --root nothing is asked of systemd:
    /// the enablement symlinks in the tree are only reported.
    fn enabled_units(&self, candidates: &[&str]) -> Vec<String> {
        candidates
            .iter()
            .filter(|unit| match &self.root {
                Some(_) => self.has_wants_link(unit),
                None => systemctl(&["is-enabled", unit])
                    .is_some_and(|(ok, out)| ok && out.trim() == "enabled"),
            })
            .map(|u| (*u).to_string())
            .collect()
    }

    fn has_wants_link(&self, unit: &str) -> bool {
        let Ok(dirs) = fs::read_dir(self.path("/etc/systemd/system")) else {
            return false;
        };
        dirs.flatten().any(|d| {
            d.file_name().to_string_lossy().ends_with(".wants")
                && d.path().join(unit).symlink_metadata().is_ok()
        })
    }

    /// Says that the changes need a reboot, and tells the system too (Debian's
    /// /run/reboot-required, which login banners and unattended-upgrades read).
    fn reboot_notice(&self) {
        if self.root.is_some() {
            println!("The changes take effect when that Pi next boots.");
            return;
        }
        println!("Reboot for the changes to take effect: sudo reboot");
        let pkgs = "/run/reboot-required.pkgs";
        let listed = fs::read_to_string(pkgs)
            .map(|t| t.lines().any(|l| l == "esp-bridge"))
            .unwrap_or(false);
        let result = fs::write("/run/reboot-required", "*** System restart required ***\n")
            .and_then(|()| {
                if listed {
                    return Ok(());
                }
                use std::io::Write;
                fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(pkgs)?
                    .write_all(b"esp-bridge\n")
            });
        if let Err(e) = result {
            println!("  (could not mark /run/reboot-required: {e})");
        }
    }
}

/// Runs systemctl; None when it is not there (a container, a chroot without systemd).
fn systemctl(args: &[&str]) -> Option<(bool, String)> {
    let out = Command::new("systemctl").args(args).output().ok()?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Some((out.status.success(), text))
}

fn hint_for(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::PermissionDenied => "\n  hint: run it as root: sudo esp-bridge setup-pi",
        io::ErrorKind::ReadOnlyFilesystem => {
            "\n  hint: the file system is mounted read-only; remount it read-write (sudo mount -o remount,rw <mount point>)"
        }
        _ => "",
    }
}

/// Replaces a file through a temporary file and a rename, so that a power cut (a Pi in a
/// drawer) leaves either the old or the new boot file, never half of one.
fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.esp-bridge-new"));
    fs::write(&tmp, bytes)?;
    if let Ok(meta) = fs::metadata(path) {
        // Best effort: the boot partition is FAT, which has no modes to keep.
        let _ = fs::set_permissions(&tmp, meta.permissions());
    }
    let synced = fs::File::open(&tmp).and_then(|f| f.sync_all());
    if let Err(e) = synced.and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if let Some(dir) = path.parent()
        && let Ok(d) = fs::File::open(dir)
    {
        // Best effort: some file systems refuse fsync on a directory.
        let _ = d.sync_all();
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The command.

/// Runs `esp-bridge setup-pi`.
pub fn run(args: SetupPiArgs) -> crate::error::Result {
    if let Some(root) = &args.root
        && !root.is_dir()
    {
        return Err(Error::usage(format!(
            "--root {}: no such directory\n  hint: pass the directory where the Pi's root file system is mounted",
            root.display()
        )));
    }
    let sys = System { root: args.root };
    let result = if args.revert {
        revert(&sys, args.dry_run)
    } else {
        apply(&sys, args.dry_run, args.assume_pi)
    };
    result.map_err(Error::failure)
}

struct FilePlan {
    path: String,
    old: String,
    outcome: Outcome,
}

fn apply(sys: &System, dry_run: bool, assume_pi: bool) -> Result<(), String> {
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
            match sys.root {
                Some(_) => println!("  {unit}: enabled there; would only report it (--root)"),
                None => println!("  {unit}: would disable (systemctl disable {unit})"),
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
        match sys.root {
            Some(_) => println!(
                "  {unit}: enabled in {}; on the Pi run: sudo systemctl disable {unit}",
                sys.show("/etc/systemd/system")
            ),
            None => match systemctl(&["disable", unit]) {
                Some((true, _)) => {
                    println!("  {unit}: disabled");
                    state.units.push(unit.clone());
                }
                Some((false, out)) => println!(
                    "  {unit}: could not disable it ({}); run: sudo systemctl disable {unit}",
                    out.trim()
                ),
                None => {
                    println!("  {unit}: systemctl not found; run: sudo systemctl disable {unit}")
                }
            },
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

fn revert(sys: &System, dry_run: bool) -> Result<(), String> {
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
    for f in &state.files {
        let shown = sys.show(&f.path);
        let current = match fs::read(sys.path(&f.path)) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                println!("  {shown}: gone; nothing to undo there");
                continue;
            }
            Err(e) => return Err(format!("cannot read {shown}: {e}{}", hint_for(&e))),
        };
        let backup = fs::read(sys.path(&f.backup)).ok();
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
        if !dry_run {
            sys.write(&f.path, &new)?;
        }
    }
    for unit in &state.units {
        if dry_run {
            println!("  {unit}: would enable again");
            continue;
        }
        if sys.root.is_some() {
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
        let _ = fs::remove_file(sys.path(&f.backup));
    }
    fs::remove_file(sys.path(STATE_FILE)).map_err(|e| {
        format!(
            "cannot remove {}: {e}{}",
            sys.show(STATE_FILE),
            hint_for(&e)
        )
    })?;
    // Only if empty: anything else there is not ours to delete.
    let _ = fs::remove_dir(sys.path(BACKUP_DIR));
    let _ = fs::remove_dir(sys.path("/var/lib/esp-bridge"));
    if changed_any || !state.units.is_empty() {
        sys.reboot_notice();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOKWORM: &str = "dtparam=audio=on\n\n# Run as fast as firmware / board allows\narm_boost=1\n\n[cm4]\notg_mode=1\n\n[cm5]\ndtoverlay=dwc2,dr_mode=host\n\n[all]\n";

    fn added(outcome: &Outcome) -> Vec<String> {
        outcome
            .edits
            .iter()
            .filter_map(|e| match e {
                Edit::Added { text, .. } => Some(text.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn bookworm_gets_both_lines_after_the_final_all() {
        let o = apply_config_txt(BOOKWORM);
        assert_eq!(
            o.content,
            format!("{BOOKWORM}{MARK}\nenable_uart=1\ndtoverlay=disable-bt\ndtparam=uart0=on\n")
        );
        assert!(o.bluetooth_off);
        assert_eq!(
            added(&o),
            [MARK, "enable_uart=1", "dtoverlay=disable-bt", UART0_ON]
        );
    }

    #[test]
    fn applying_twice_changes_nothing() {
        let once = apply_config_txt(BOOKWORM);
        let twice = apply_config_txt(&once.content);
        assert!(twice.edits.is_empty());
        assert_eq!(twice.content, once.content);
        let c = apply_cmdline_txt("console=serial0,115200 console=tty1 root=x rootwait\n");
        assert!(apply_cmdline_txt(&c.content).edits.is_empty());
    }

    #[test]
    fn lines_go_into_the_last_all_stretch_not_into_a_board_section() {
        // Bullseye style: ends in [pi4] ... [all]; and a file that ends inside a filter.
        let text = "a=1\n\n[pi4]\narm_boost=1\n";
        let o = apply_config_txt(text);
        assert_eq!(
            o.content,
            format!(
                "a=1\n{MARK}\nenable_uart=1\ndtoverlay=disable-bt\ndtparam=uart0=on\n\n[pi4]\narm_boost=1\n"
            )
        );
    }

    #[test]
    fn equivalent_lines_are_not_duplicated_and_comments_are_left_alone() {
        let text = "#dtoverlay=disable-bt\n# enable_uart=1\nenable_uart=1\ndtoverlay=pi3-disable-bt\ndtparam=audio=on,uart0\n";
        let o = apply_config_txt(text);
        assert!(o.edits.is_empty(), "{:?}", o.edits);
        assert_eq!(o.content, text);
        assert!(o.bluetooth_off);
    }

    #[test]
    fn settings_under_a_board_filter_do_not_count() {
        let text = "[pi4]\nenable_uart=1\ndtoverlay=disable-bt\n[all]\n";
        let o = apply_config_txt(text);
        assert_eq!(
            added(&o),
            [MARK, "enable_uart=1", "dtoverlay=disable-bt", UART0_ON]
        );
        assert!(o.content.ends_with(&format!(
            "[all]\n{MARK}\nenable_uart=1\ndtoverlay=disable-bt\ndtparam=uart0=on\n"
        )));
    }

    #[test]
    fn enable_uart_0_is_rewritten_in_place() {
        let text = "enable_uart=0\ndtoverlay=disable-bt\ndtparam=uart0=on\n[pi3]\nenable_uart=0\n";
        let o = apply_config_txt(text);
        assert_eq!(
            o.content,
            "enable_uart=1\ndtoverlay=disable-bt\ndtparam=uart0=on\n[pi3]\nenable_uart=0\n"
        );
        assert_eq!(
            o.edits,
            [Edit::Replaced {
                line: 0,
                from: "enable_uart=0".into(),
                to: "enable_uart=1".into()
            }]
        );
        assert!(
            o.notes.iter().any(|n| n.contains("line 5")),
            "{:?}",
            o.notes
        );
    }

    #[test]
    fn uart0_is_added_unless_already_on_for_every_board() {
        // Off for every board, or on only under [pi5]: ours goes after and wins.
        for text in ["dtparam=uart0=off\n", "[pi5]\ndtparam=uart0=on\n[all]\n"] {
            let o = apply_config_txt(&format!("enable_uart=1\ndtoverlay=disable-bt\n{text}"));
            assert_eq!(added(&o), [MARK, UART0_ON], "{text}");
            assert!(
                o.content.ends_with(&format!("{MARK}\n{UART0_ON}\n")),
                "{text}"
            );
        }
        for on in [
            "dtparam=uart0=on",
            "dtparam=uart0",
            "dtparam=i2c_arm=on,uart0=true",
        ] {
            let o = apply_config_txt(&format!("enable_uart=1\ndtoverlay=disable-bt\n{on}\n"));
            assert!(o.edits.is_empty(), "{on}: {:?}", o.edits);
        }
    }

    #[test]
    fn miniuart_bt_keeps_bluetooth() {
        let o = apply_config_txt("enable_uart=1\ndtoverlay=miniuart-bt\ndtparam=uart0=on\n");
        assert!(o.edits.is_empty());
        assert!(!o.bluetooth_off);
        assert_eq!(o.notes.len(), 1);
    }

    #[test]
    fn crlf_and_missing_final_newline_are_kept() {
        let o = apply_config_txt("a=1\r\n[all]");
        assert_eq!(
            o.content,
            format!(
                "a=1\r\n[all]\r\n{MARK}\r\nenable_uart=1\r\ndtoverlay=disable-bt\r\ndtparam=uart0=on"
            )
        );
        let (back, notes) = undo(&o.content, &o.edits);
        assert_eq!(back, "a=1\r\n[all]");
        assert!(notes.is_empty());
    }

    #[test]
    fn empty_config_txt() {
        let o = apply_config_txt("");
        assert_eq!(
            o.content,
            format!("{MARK}\nenable_uart=1\ndtoverlay=disable-bt\ndtparam=uart0=on\n")
        );
        assert_eq!(undo(&o.content, &o.edits).0, "");
    }

    #[test]
    fn cmdline_consoles_go_and_every_other_byte_stays() {
        for (before, after) in [
            (
                "console=serial0,115200 console=tty1 root=PARTUUID=abc-02 rootfstype=ext4 fsck.repair=yes rootwait quiet splash plymouth.ignore-serial-consoles\n",
                "console=tty1 root=PARTUUID=abc-02 rootfstype=ext4 fsck.repair=yes rootwait quiet splash plymouth.ignore-serial-consoles\n",
            ),
            (
                "console=tty1 console=ttyAMA0,115200 root=x\r\n",
                "console=tty1 root=x\r\n",
            ),
            ("root=x  console=ttyS0,9600", "root=x"),
            ("console=serial0,115200", ""),
            ("a console=serial0 b console=ttyAMA0,115200\tc\n", "a b c\n"),
            (
                "console=serial1,115200 console=tty1\n",
                "console=serial1,115200 console=tty1\n",
            ),
        ] {
            let o = apply_cmdline_txt(before);
            assert_eq!(o.content, after, "from {before:?}");
            let (back, notes) = undo(&o.content, &o.edits);
            assert_eq!(back, before, "undo of {before:?}");
            assert!(notes.is_empty());
        }
    }

    #[test]
    fn only_the_first_cmdline_line_counts() {
        let text = "root=x\nconsole=serial0,115200\n";
        assert!(apply_cmdline_txt(text).edits.is_empty());
    }

    #[test]
    fn undo_keeps_the_users_later_edits() {
        let o = apply_config_txt(BOOKWORM);
        // The user adds a line before ours and one after, and changes an unrelated one.
        let edited = o
            .content
            .replace("arm_boost=1\n", "arm_boost=0\n")
            .replace("[all]\n", "[all]\ndtparam=spi=on\n")
            + "gpu_mem=64\n";
        let (back, notes) = undo(&edited, &o.edits);
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(
            back,
            BOOKWORM
                .replace("arm_boost=1\n", "arm_boost=0\n")
                .replace("[all]\n", "[all]\ndtparam=spi=on\n")
                + "gpu_mem=64\n"
        );
    }

    #[test]
    fn undo_of_a_line_the_user_removed_says_so() {
        let o = apply_config_txt("enable_uart=0\n");
        let edited = o.content.replace("enable_uart=1\n", "enable_uart=2\n");
        let (back, notes) = undo(&edited, &o.edits);
        assert_eq!(back, "enable_uart=2\n");
        assert_eq!(notes.len(), 1, "{notes:?}");
    }

    #[test]
    fn cmdline_undo_after_user_edit() {
        let o = apply_cmdline_txt("console=serial0,115200 console=tty1 root=x rootwait\n");
        let edited = o.content.replace("rootwait", "rootwait quiet");
        let (back, _) = undo(&edited, &o.edits);
        assert_eq!(
            back,
            "console=serial0,115200 console=tty1 root=x rootwait quiet\n"
        );
        // Put back by the user already: not twice.
        let (same, notes) = undo(&back, &o.edits);
        assert_eq!(same, back);
        assert_eq!(notes.len(), 1);
    }

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
