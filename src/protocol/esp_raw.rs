//! The ESP-aware raw port (`esptool --port socket://pi:2218`): a transparent byte pipe that
//! watches the ESP serial-loader protocol go by, with no I/O of its own.
//!
//! esptool cannot reset the chip or change the port's baud rate over a plain TCP socket, so
//! this layer does both on the Pi:
//! - a client whose first bytes are a loader SYNC frame is esptool: the session puts the chip
//!   into the bootloader with the local reset engine (esptool keeps syncing until it answers).
//!   A client that starts with anything else (a terminal, a log reader) is never treated as
//!   esptool, so a raw monitor cannot push the chip into download mode by accident;
//! - the SLIP frames are followed both ways; when the chip acknowledges CHANGE_BAUDRATE, the
//!   UART switches to the new rate before the reply is handed to the client, so the client's
//!   next command (which it sends only after reading the reply) goes out at the new rate.
//!
//! Nothing is escaped, added or held back: bytes pass through as they come.

use super::Event;

use esp_loader::slip::{
    END as SLIP_END, ESC as SLIP_ESC, ESC_END as SLIP_ESC_END, ESC_ESC as SLIP_ESC_ESC,
};
use esp_loader::{DIR_REQUEST, DIR_RESPONSE, op};

/// Bytes of a frame kept for inspection: the 8-byte header and the first data words are all
/// that matters; the rest of a 16 KiB flash block is only counted.
const KEEP: usize = 16;

/// Decodes SLIP frames incrementally, keeping only each frame's first bytes.
#[derive(Debug, Default)]
struct FrameWatcher {
    in_frame: bool,
    escaped: bool,
    head: Vec<u8>,
    /// The frame's decoded length; past the first KEEP bytes an escape pair counts as two
    /// (only "longer than the header" is ever asked of it).
    len: usize,
}

impl FrameWatcher {
    /// Feeds bytes; calls `done` with the head of each complete frame.
    fn feed(&mut self, bytes: &[u8], mut done: impl FnMut(&[u8], usize)) {
        let mut rest = bytes;
        while let Some((&b, tail)) = rest.split_first() {
            if b != SLIP_END && (!self.in_frame || self.head.len() >= KEEP) {
                // Outside a frame, or past the head kept of one, only the next END matters (it
                // never occurs escaped): one scan to it instead of decoding a 16 KiB flash block
                // byte by byte, which was most of the raw port's cost.
                let run = rest
                    .iter()
                    .position(|&b| b == SLIP_END)
                    .unwrap_or(rest.len());
                if self.in_frame {
                    self.len = self.len.saturating_add(run);
                }
                rest = &rest[run..];
                continue;
            }
            rest = tail;
            if b == SLIP_END {
                if self.in_frame && self.len > 0 {
                    done(&self.head, self.len);
                }
                // An END both closes a frame and may open the next one.
                self.in_frame = true;
                self.escaped = false;
                self.head.clear();
                self.len = 0;
                continue;
            }
            let byte = if self.escaped {
                self.escaped = false;
                match b {
                    SLIP_ESC_END => SLIP_END,
                    SLIP_ESC_ESC => SLIP_ESC,
                    other => other,
                }
            } else if b == SLIP_ESC {
                self.escaped = true;
                continue;
            } else {
                b
            };
            if self.head.len() < KEEP {
                self.head.push(byte);
            }
            self.len = self.len.saturating_add(1);
        }
    }
}

/// Whether the client started like esptool, once known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opening {
    Undecided,
    Esptool,
    Other,
}

/// State of one raw session.
#[derive(Debug)]
pub struct EspRaw {
    opening: Opening,
    first: Vec<u8>,
    to_chip: FrameWatcher,
    from_chip: FrameWatcher,
    /// The rate asked for by a CHANGE_BAUDRATE the chip has not answered yet.
    pending_baud: Option<u32>,
}

impl Default for EspRaw {
    fn default() -> Self {
        Self::new()
    }
}

/// The start of a SYNC request as esptool sends it: END, direction 0, SYNC, length 36.
const SYNC_START: [u8; 5] = [
    SLIP_END,
    DIR_REQUEST,
    op::SYNC,
    esp_loader::SYNC_DATA_LEN.to_le_bytes()[0],
    esp_loader::SYNC_DATA_LEN.to_le_bytes()[1],
];

impl EspRaw {
    pub fn new() -> Self {
        EspRaw {
            opening: Opening::Undecided,
            first: Vec::new(),
            to_chip: FrameWatcher::default(),
            from_chip: FrameWatcher::default(),
            pending_baud: None,
        }
    }

    /// Whether the client opened like esptool.
    pub fn is_esptool(&self) -> bool {
        self.opening == Opening::Esptool
    }

    /// Bytes from the client: passed on as data, after an [`Event::EnterBootloader`] when
    /// they open like esptool.
    pub fn from_client(&mut self, input: &[u8], events: &mut Vec<Event>) {
        if self.opening == Opening::Undecided {
            let want = SYNC_START.len() - self.first.len();
            let take = want.min(input.len());
            self.first.extend_from_slice(&input[..take]);
            let n = self.first.len();
            self.opening = if self.first[..] != SYNC_START[..n] {
                Opening::Other
            } else if n == SYNC_START.len() {
                Opening::Esptool
            } else {
                // Not enough to tell yet: hold these few bytes back until the next read.
                return;
            };
            if self.opening == Opening::Esptool {
                events.push(Event::EnterBootloader);
            }
            let held = std::mem::take(&mut self.first);
            self.forward_to_chip(&held, events);
            self.forward_to_chip(&input[take..], events);
            return;
        }
        self.forward_to_chip(input, events);
    }

    fn forward_to_chip(&mut self, bytes: &[u8], events: &mut Vec<Event>) {
        if bytes.is_empty() {
            return;
        }
        let pending = &mut self.pending_baud;
        self.to_chip.feed(bytes, |head, _| {
            if head.len() >= 12 && head[0] == DIR_REQUEST && head[1] == op::CHANGE_BAUDRATE {
                let new = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
                *pending = (new > 0).then_some(new);
            }
        });
        events.push(Event::Data(bytes.to_vec()));
    }

    /// Bytes from the chip, appended to `to_client` unchanged. When they complete a
    /// successful CHANGE_BAUDRATE reply, [`Event::SwitchBaud`] is pushed: the session applies
    /// it before it takes any further client input.
    pub fn from_device(&mut self, data: &[u8], to_client: &mut Vec<u8>, events: &mut Vec<Event>) {
        to_client.extend_from_slice(data);
        if self.pending_baud.is_none() {
            // Nothing to wait for: skip the frame decoding cost on bulk reads.
            self.from_chip = FrameWatcher::default();
            return;
        }
        let mut switch = None;
        let pending = self.pending_baud;
        self.from_chip.feed(data, |head, len| {
            if head.len() >= 8 && head[0] == DIR_RESPONSE && head[1] == op::CHANGE_BAUDRATE {
                // The data is the status bytes (4 from the ROM, 2 from the stub): 0 = done.
                let ok = len > 8 && head.get(8) == Some(&0);
                switch = Some(ok);
            }
        });
        match (switch, pending) {
            (Some(true), Some(baud)) => {
                self.pending_baud = None;
                events.push(Event::SwitchBaud(baud));
            }
            (Some(false), _) => self.pending_baud = None,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slip(payload: &[u8]) -> Vec<u8> {
        let mut out = vec![SLIP_END];
        for &b in payload {
            match b {
                SLIP_END => out.extend([SLIP_ESC, SLIP_ESC_END]),
                SLIP_ESC => out.extend([SLIP_ESC, SLIP_ESC_ESC]),
                _ => out.push(b),
            }
        }
        out.push(SLIP_END);
        out
    }

    fn sync_frame() -> Vec<u8> {
        let mut p = vec![DIR_REQUEST, op::SYNC, 36, 0, 0, 0, 0, 0, 7, 7, 0x12, 0x20];
        p.extend([0x55; 32]);
        slip(&p)
    }

    fn change_baud(baud: u32) -> Vec<u8> {
        let mut p = vec![DIR_REQUEST, op::CHANGE_BAUDRATE, 8, 0, 0, 0, 0, 0];
        p.extend(baud.to_le_bytes());
        p.extend(0u32.to_le_bytes());
        slip(&p)
    }

    fn reply(op: u8, status: &[u8]) -> Vec<u8> {
        let mut p = vec![DIR_RESPONSE, op, status.len() as u8, 0, 0, 0, 0, 0];
        p.extend(status);
        slip(&p)
    }

    #[test]
    fn esptool_opening_asks_for_the_bootloader_and_passes_bytes_unchanged() {
        let sync = sync_frame();
        for split in 1..sync.len() {
            let mut r = EspRaw::new();
            let mut ev = Vec::new();
            r.from_client(&sync[..split], &mut ev);
            r.from_client(&sync[split..], &mut ev);
            assert_eq!(ev.first(), Some(&Event::EnterBootloader), "split {split}");
            assert_eq!(Event::data_of(&ev), sync, "split {split}");
        }
    }

    #[test]
    fn a_terminal_never_triggers_the_bootloader() {
        for opening in [&b"hello\r\n"[..], &[SLIP_END, 0x41], &[SLIP_END, 0, 0x10]] {
            let mut r = EspRaw::new();
            let mut ev = Vec::new();
            r.from_client(opening, &mut ev);
            r.from_client(&sync_frame(), &mut ev);
            assert!(!ev.contains(&Event::EnterBootloader), "{opening:?}");
            let mut want = opening.to_vec();
            want.extend(sync_frame());
            assert_eq!(Event::data_of(&ev), want);
        }
    }

    #[test]
    fn baud_switch_follows_a_successful_reply_split_anywhere() {
        for status in [&[0u8, 0, 0, 0][..], &[0, 0]] {
            let req = change_baud(921_600);
            let rep = reply(op::CHANGE_BAUDRATE, status);
            for split in 0..=req.len() {
                let mut r = EspRaw::new();
                let mut ev = Vec::new();
                r.from_client(b"x", &mut ev);
                r.from_client(&req[..split], &mut ev);
                r.from_client(&req[split..], &mut ev);
                ev.clear();
                let mut out = Vec::new();
                let (a, b) = rep.split_at(rep.len() / 2);
                r.from_device(a, &mut out, &mut ev);
                assert!(ev.is_empty(), "not before the reply is complete");
                r.from_device(b, &mut out, &mut ev);
                assert_eq!(ev, vec![Event::SwitchBaud(921_600)]);
                assert_eq!(out, rep, "reply passes unchanged");
            }
        }
    }

    #[test]
    fn failed_or_unrelated_replies_do_not_switch() {
        let mut r = EspRaw::new();
        let mut ev = Vec::new();
        r.from_client(&change_baud(460_800), &mut ev);
        ev.clear();
        let mut out = Vec::new();
        r.from_device(&reply(op::SYNC, &[0, 0]), &mut out, &mut ev);
        r.from_device(&reply(op::CHANGE_BAUDRATE, &[1, 5]), &mut out, &mut ev);
        r.from_device(&reply(op::CHANGE_BAUDRATE, &[0, 0]), &mut out, &mut ev);
        assert!(ev.is_empty(), "{ev:?}");
    }

    #[test]
    fn a_request_after_a_long_escaped_frame_is_still_seen_at_any_chunking() {
        // A flash block full of bytes that travel escaped, then CHANGE_BAUDRATE: the watcher
        // skips the block's body but must find the next frame wherever the chunks split.
        let mut block = vec![DIR_REQUEST, 0x03, 0, 4, 0, 0, 0, 0];
        block.extend((0..4096u32).map(|i| [SLIP_END, SLIP_ESC, 0x11][i as usize % 3]));
        let mut stream = slip(&block);
        stream.extend(change_baud(460_800));
        for chunk in [1, 2, 3, 7, 16, 17, 1000, stream.len()] {
            let mut r = EspRaw::new();
            let mut ev = Vec::new();
            for piece in stream.chunks(chunk) {
                r.from_client(piece, &mut ev);
            }
            assert_eq!(
                Event::data_of(&ev),
                stream,
                "chunk {chunk}: bytes pass unchanged"
            );
            ev.clear();
            let mut out = Vec::new();
            r.from_device(&reply(op::CHANGE_BAUDRATE, &[0, 0]), &mut out, &mut ev);
            assert_eq!(ev, vec![Event::SwitchBaud(460_800)], "chunk {chunk}");
        }
    }

    #[test]
    fn escaped_baud_values_are_decoded() {
        // 0xC0 and 0xDB inside the value travel escaped.
        let baud = u32::from_le_bytes([0xC0, 0xDB, 0x0E, 0x00]);
        let mut r = EspRaw::new();
        let mut ev = Vec::new();
        r.from_client(&change_baud(baud), &mut ev);
        ev.clear();
        let mut out = Vec::new();
        r.from_device(&reply(op::CHANGE_BAUDRATE, &[0, 0]), &mut out, &mut ev);
        assert_eq!(ev, vec![Event::SwitchBaud(baud)]);
    }
}
