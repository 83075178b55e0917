//! A board's recent output, kept so that what it printed while nobody watched is not lost
//! (`history_kib`): the chunks as the device gave them, each with the time it arrived, bounded
//! in bytes (each chunk's bookkeeping counted too), the oldest dropped first. Rendered as lines,
//! each stamped with the time its first byte arrived. Pure: the time comes in.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What one kept chunk costs beyond its bytes (its time, its vector), counted against the
/// limit so that a flood of one-byte reads cannot hold more than the limit says.
const CHUNK_OVERHEAD: usize = 48;

#[derive(Debug)]
struct Chunk {
    at: SystemTime,
    bytes: Vec<u8>,
}

/// The ring.
#[derive(Debug)]
pub struct History {
    chunks: VecDeque<Chunk>,
    limit: usize,
    used: usize,
    /// Bytes dropped from the front since the start (said at the top of a replay).
    dropped: u64,
}

impl History {
    /// A ring of at most `limit` bytes (0: nothing is kept).
    pub fn new(limit: usize) -> Self {
        History {
            chunks: VecDeque::new(),
            limit,
            used: 0,
            dropped: 0,
        }
    }

    /// Keeps `bytes` that arrived at `at`.
    pub fn push(&mut self, bytes: &[u8], at: SystemTime) {
        if self.limit == 0 || bytes.is_empty() {
            return;
        }
        // More than the whole ring holds: only its end is kept.
        let room = self.limit.saturating_sub(CHUNK_OVERHEAD).max(1);
        let bytes = &bytes[bytes.len().saturating_sub(room)..];
        self.used = self.used.saturating_add(bytes.len() + CHUNK_OVERHEAD);
        self.chunks.push_back(Chunk {
            at,
            bytes: bytes.to_vec(),
        });
        while self.used > self.limit {
            let Some(old) = self.chunks.pop_front() else {
                self.used = 0;
                break;
            };
            self.used = self.used.saturating_sub(old.bytes.len() + CHUNK_OVERHEAD);
            self.dropped = self
                .dropped
                .saturating_add(u64::try_from(old.bytes.len()).unwrap_or(u64::MAX));
        }
    }

    /// The kept output as text lines, each stamped with the UTC time its first byte arrived.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if self.dropped > 0 {
            out.push_str(&format!(
                "[esp-bridge] {} older bytes are no longer kept (history_kib)\n",
                self.dropped
            ));
        }
        let mut lines = Lines::default();
        for c in &self.chunks {
            lines.feed(&c.bytes, c.at, &mut out);
        }
        lines.finish(&mut out);
        out
    }
}

/// Turns a byte stream into lines of text, each with the time its first byte arrived; keeps
/// a partial line until its end arrives. The text is safe to show on a terminal or to log:
/// colour sequences (ESP-IDF's log colours) are left out, other control characters escaped.
#[derive(Debug, Default)]
pub struct Lines {
    partial: Vec<u8>,
    started: Option<SystemTime>,
    text: String,
}

/// The longest line kept whole; a longer one is cut (a board printing binary data).
const MAX_LINE: usize = 1024;

impl Lines {
    /// Appends the complete lines in `bytes` (arrived at `at`) to `out`, stamped.
    pub fn feed(&mut self, bytes: &[u8], at: SystemTime, out: &mut String) {
        self.feed_each(bytes, at, |at, text| stamp(out, at, text));
    }

    /// Hands each complete line in `bytes` (arrived at `at`) to `each`, with its time.
    pub fn feed_each(
        &mut self,
        bytes: &[u8],
        at: SystemTime,
        mut each: impl FnMut(SystemTime, &str),
    ) {
        for &b in bytes {
            if self.partial.is_empty() {
                self.started = Some(at);
            }
            if b == b'\n' || self.partial.len() >= MAX_LINE {
                self.emit(&mut each);
                if b == b'\n' {
                    continue;
                }
                self.started = Some(at);
            }
            self.partial.push(b);
        }
    }

    /// Appends the partial line, if any, stamped.
    pub fn finish(&mut self, out: &mut String) {
        if !self.partial.is_empty() {
            self.emit(|at, text| stamp(out, at, text));
        }
    }

    fn emit(&mut self, mut each: impl FnMut(SystemTime, &str)) {
        let at = self.started.take().unwrap_or(UNIX_EPOCH);
        let raw = String::from_utf8_lossy(&self.partial);
        self.text.clear();
        let mut chars = raw.trim_end_matches('\r').chars().peekable();
        while let Some(ch) = chars.next() {
            if ch == '\u{1b}' && chars.peek() == Some(&'[') {
                // A CSI sequence (colours): its parameters up to the final byte go with it.
                chars.next();
                for c in chars.by_ref() {
                    if ('\u{40}'..='\u{7e}').contains(&c) {
                        break;
                    }
                }
            } else if ch.is_control() && ch != '\t' {
                // Would act on the reader's terminal: shown escaped.
                self.text.extend(ch.escape_default());
            } else {
                self.text.push(ch);
            }
        }
        each(at, &self.text);
        self.partial.clear();
    }
}

/// `out` gets `text` as one line stamped with `at`.
fn stamp(out: &mut String, at: SystemTime, text: &str) {
    out.push_str(&utc(at));
    out.push(' ');
    out.push_str(text);
    out.push('\n');
}

/// `2026-12-08 03:00:01.250` (UTC), as the journal prints with `-o short-iso-precise`.
pub fn utc(at: SystemTime) -> String {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = since.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let (y, m, d) = civil_from_days(days);
    let s = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        since.subsec_millis()
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> SystemTime {
        // 2026-12-08 03:00:00 UTC
        UNIX_EPOCH + Duration::from_secs(1_796_698_800) + Duration::from_millis(ms)
    }

    #[test]
    fn lines_are_stamped_with_the_time_their_first_byte_arrived() {
        let mut h = History::new(64 * 1024);
        h.push(b"ets Jun  8 2016 00:22:57\r\n\r\nrst:0x1 (POWERON", at(0));
        h.push(b"_RESET),boot:0x13\r\nI (30) boot: ESP-IDF", at(250));
        assert_eq!(
            h.render(),
            "2026-12-08 03:00:00.000 ets Jun  8 2016 00:22:57\n\
             2026-12-08 03:00:00.000 \n\
             2026-12-08 03:00:00.000 rst:0x1 (POWERON_RESET),boot:0x13\n\
             2026-12-08 03:00:00.250 I (30) boot: ESP-IDF\n"
        );
    }

    #[test]
    fn the_ring_keeps_the_newest_within_its_limit_and_says_what_it_dropped() {
        let mut h = History::new(4096);
        for i in 0..1000u64 {
            h.push(format!("line {i:04}\n").as_bytes(), at(i));
        }
        let text = h.render();
        assert!(text.ends_with("line 0999\n"), "{text}");
        assert!(text.starts_with("[esp-bridge] "), "{text}");
        assert!(h.used <= 4096);
        // A flood of one-byte chunks counts their bookkeeping: few are kept.
        let mut h = History::new(4096);
        for _ in 0..100_000 {
            h.push(b"x", at(0));
        }
        assert!(h.chunks.len() <= 4096 / (1 + CHUNK_OVERHEAD));
        // A chunk larger than the ring: its end.
        let mut h = History::new(1024);
        h.push(&[b'a'; 10_000], at(0));
        assert!(h.used <= 1024);
        assert_eq!(History::new(0).render(), "");
    }

    #[test]
    fn colours_are_left_out_other_control_characters_escaped_and_long_lines_cut() {
        let mut out = String::new();
        let mut lines = Lines::default();
        lines.feed(b"\x1b[0;32mI (1) ok\x1b[0m\x07\x1bc\r\n", at(0), &mut out);
        assert_eq!(out, "2026-12-08 03:00:00.000 I (1) ok\\u{7}\\u{1b}c\n");
        out.clear();
        lines.feed(&[b'z'; 2500], at(1), &mut out);
        lines.finish(&mut out);
        assert_eq!(out.lines().count(), 3);
    }

    #[test]
    fn dates_across_the_calendar() {
        assert_eq!(utc(UNIX_EPOCH), "1970-01-01 00:00:00.000");
        assert_eq!(
            utc(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29 00:00:00.000"
        );
        assert_eq!(
            at(1_500).duration_since(UNIX_EPOCH).unwrap().as_secs() % 60,
            1
        );
        assert_eq!(utc(at(61_001)), "2026-12-08 03:01:01.001");
    }
}
