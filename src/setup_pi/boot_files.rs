//! The pure editing of the boot files: `config.txt` and `cmdline.txt` contents in, the new
//! contents and the list of [`Edit`]s made out, and [`undo`] of those edits on a file that may
//! have been edited since. No I/O, so all of it is unit-tested here.

use serde::{Deserialize, Serialize};

/// The comment put above the lines we add, so that a person reading config.txt knows why.
const MARK: &str =
    "# esp-bridge: full UART on GPIO14/15 for the ESP board (undo: esp-bridge setup-pi --revert)";
/// The same, when the lines include the extra UARTs of the boards in /etc/esp-bridge.toml.
const MARK_BOARDS: &str = "# esp-bridge: the UARTs of the ESP boards in /etc/esp-bridge.toml (undo: esp-bridge setup-pi --revert)";
/// Overlays that give the PL011 to GPIO14/15. The `miniuart-bt` ones keep Bluetooth (on the
/// mini UART), so with them hciuart must stay enabled.
const DISABLE_BT: [&str; 3] = ["disable-bt", "pi3-disable-bt", "disable-bt-pi5"];
const MINIUART_BT: [&str; 2] = ["miniuart-bt", "pi3-miniuart-bt"];
/// The Pi 5 keeps UART0 (GPIO14/15) off by default; earlier boards have it on, so this is
/// harmless there.
const UART0_ON: &str = "dtparam=uart0=on";

/// One change made to a file, recorded so that it can be undone later, even after other edits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub(super) enum Edit {
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
pub(super) struct Outcome {
    /// The new content (equal to the input when `edits` is empty).
    pub(super) content: String,
    pub(super) edits: Vec<Edit>,
    /// Things the user should know that we deliberately did not change.
    pub(super) notes: Vec<String>,
    /// config.txt only: Bluetooth is off after this (so hciuart can go too).
    pub(super) bluetooth_off: bool,
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
/// config.txt, and the `dtoverlay=uartN` lines in `uart_overlays` (the extra UARTs the
/// boards of the configuration use). Lines already meaning the same are kept (no
/// duplicates; `dtoverlay=uart3,ctsrts` counts as `dtoverlay=uart3`), comments and
/// conditional sections are left alone, and the file's line endings and missing final
/// newline are preserved.
pub(super) fn apply_config_txt(content: &str, uart_overlays: &[String]) -> Outcome {
    let mut lines = split_lines(content);
    let all = unconditional(&lines);
    let mut notes = Vec::new();

    // The last unconditional enable_uart wins, as in the firmware.
    let mut uart: Option<(usize, bool)> = None;
    // The overlay that already frees the PL011, if any.
    let mut overlay: Option<String> = None;
    // Whether the last unconditional `uart0` parameter turns it on (`dtparam=a=on,uart0`).
    let mut uart0_on = false;
    // The overlays loaded for every board, by name.
    let mut overlays_on: Vec<String> = Vec::new();
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
            overlays_on.push(name.to_string());
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
    let base_lines = add.len();
    for line in uart_overlays {
        let name = line.strip_prefix("dtoverlay=").unwrap_or(line);
        if !overlays_on.iter().any(|on| on == name) && !add.contains(&line.as_str()) {
            add.push(line);
        }
    }
    let mark = if add.len() > base_lines {
        MARK_BOARDS
    } else {
        MARK
    };

    if !add.is_empty() {
        let at = insertion_point(&lines, &all);
        let eol = newline_style(&lines);
        let block: Vec<&str> = std::iter::once(mark).chain(add).collect();
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
pub(super) fn apply_cmdline_txt(content: &str) -> Outcome {
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
pub(super) fn undo(content: &str, edits: &[Edit]) -> (String, Vec<String>) {
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
pub(super) fn describe(edit: &Edit, done: bool) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(content: &str) -> Outcome {
        apply_config_txt(content, &[])
    }

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
        let o = plain(BOOKWORM);
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
    fn the_boards_uarts_are_added_once_and_an_existing_one_with_parameters_counts() {
        let uarts = vec!["dtoverlay=uart3".to_string(), "dtoverlay=uart5".to_string()];
        let o = apply_config_txt(BOOKWORM, &uarts);
        assert_eq!(
            added(&o),
            [
                MARK_BOARDS,
                "enable_uart=1",
                "dtoverlay=disable-bt",
                UART0_ON,
                "dtoverlay=uart3",
                "dtoverlay=uart5"
            ]
        );
        assert!(o.content.ends_with("dtoverlay=uart5\n"), "{}", o.content);
        let again = apply_config_txt(&o.content, &uarts);
        assert!(again.edits.is_empty(), "{:?}", again.edits);
        // Already there with hardware flow control, for every board: kept as is.
        let o = apply_config_txt(
            "enable_uart=1\ndtoverlay=disable-bt\ndtparam=uart0=on\ndtoverlay=uart3,ctsrts\n",
            &uarts,
        );
        assert_eq!(added(&o), [MARK_BOARDS, "dtoverlay=uart5"]);
        // Under a board filter it does not count: ours goes into [all].
        let o = apply_config_txt(
            "enable_uart=1\ndtoverlay=disable-bt\ndtparam=uart0=on\n[pi4]\ndtoverlay=uart3\n[all]\n",
            &uarts[..1],
        );
        assert_eq!(added(&o), [MARK_BOARDS, "dtoverlay=uart3"]);
        assert!(o.content.ends_with("[all]\n# esp-bridge: the UARTs of the ESP boards in /etc/esp-bridge.toml (undo: esp-bridge setup-pi --revert)\ndtoverlay=uart3\n"), "{}", o.content);
    }

    #[test]
    fn applying_twice_changes_nothing() {
        let once = plain(BOOKWORM);
        let twice = plain(&once.content);
        assert!(twice.edits.is_empty());
        assert_eq!(twice.content, once.content);
        let c = apply_cmdline_txt("console=serial0,115200 console=tty1 root=x rootwait\n");
        assert!(apply_cmdline_txt(&c.content).edits.is_empty());
    }

    #[test]
    fn lines_go_into_the_last_all_stretch_not_into_a_board_section() {
        // Bullseye style: ends in [pi4] ... [all]; and a file that ends inside a filter.
        let text = "a=1\n\n[pi4]\narm_boost=1\n";
        let o = plain(text);
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
        let o = plain(text);
        assert!(o.edits.is_empty(), "{:?}", o.edits);
        assert_eq!(o.content, text);
        assert!(o.bluetooth_off);
    }

    #[test]
    fn settings_under_a_board_filter_do_not_count() {
        let text = "[pi4]\nenable_uart=1\ndtoverlay=disable-bt\n[all]\n";
        let o = plain(text);
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
        let o = plain(text);
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
            let o = plain(&format!("enable_uart=1\ndtoverlay=disable-bt\n{text}"));
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
            let o = plain(&format!("enable_uart=1\ndtoverlay=disable-bt\n{on}\n"));
            assert!(o.edits.is_empty(), "{on}: {:?}", o.edits);
        }
    }

    #[test]
    fn miniuart_bt_keeps_bluetooth() {
        let o = plain("enable_uart=1\ndtoverlay=miniuart-bt\ndtparam=uart0=on\n");
        assert!(o.edits.is_empty());
        assert!(!o.bluetooth_off);
        assert_eq!(o.notes.len(), 1);
    }

    #[test]
    fn crlf_and_missing_final_newline_are_kept() {
        let o = plain("a=1\r\n[all]");
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
        let o = plain("");
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
        let o = plain(BOOKWORM);
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
        let o = plain("enable_uart=0\n");
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
}
