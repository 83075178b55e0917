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
//!   next command (which it sends only after reading the reply) goes out at the new rate;
//! - with a `flash_baud`, once the flasher stub runs the line moves to that rate whatever the
//!   client asked ([`super::flash_rate`]).
//!
//! Nothing is escaped or added, and bytes pass through as they come, except while the
//! bridge's own exchange with the stub is under way (the client's bytes wait) and the
//! client's CHANGE_BAUDRATE once the line runs at the flash rate (answered here).

use super::Event;
use super::flash_rate::{Chip, FlashRate};
use std::time::Instant;

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
    /// The UART's rate as this session set it.
    line: u32,
    flash: FlashRate,
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
    /// A session starting at `line` baud; `flash_baud` is the board's flash rate (`None`:
    /// the client's own); `can_reset`: the session can put the chip into its bootloader.
    pub fn new(line: u32, flash_baud: Option<u32>, can_reset: bool) -> Self {
        EspRaw {
            opening: Opening::Undecided,
            first: Vec::new(),
            to_chip: FrameWatcher::default(),
            from_chip: FrameWatcher::default(),
            pending_baud: None,
            line,
            flash: FlashRate::new(flash_baud, line, can_reset),
        }
    }

    /// Whether the client opened like esptool.
    pub fn is_esptool(&self) -> bool {
        self.opening == Opening::Esptool
    }

    /// Whether the client's bytes are held now: the session does not read the client
    /// meanwhile (what one read brought is kept here).
    pub fn holding(&self) -> bool {
        self.flash.holding()
    }

    /// When [`EspRaw::on_deadline`] is due, if ever.
    pub fn deadline(&self) -> Option<Instant> {
        self.flash.deadline()
    }

    /// The time is past [`EspRaw::deadline`].
    pub fn on_deadline(&mut self, now: Instant, to_client: &mut Vec<u8>, events: &mut Vec<Event>) {
        let mut own = Vec::new();
        self.flash.on_deadline(now, &mut own);
        self.settle(own, to_client, events);
    }

    /// Takes the flash-rate exchange's events: notes the line rate it sets, and passes on
    /// the client bytes it let go as the state now says.
    fn settle(&mut self, own: Vec<Event>, to_client: &mut Vec<u8>, events: &mut Vec<Event>) {
        for e in &own {
            if let Event::SwitchBaud(b) = e {
                self.line = *b;
            }
        }
        events.extend(own);
        let released = self.flash.take_released();
        if !released.is_empty() {
            self.forward_to_chip(&released, to_client, events);
        }
    }

    /// Bytes from the client: passed on as data, after an [`Event::EnterBootloader`] when
    /// they open like esptool. Replies made here (a CHANGE_BAUDRATE answered at the flash
    /// rate) go to `to_client`.
    pub fn from_client(&mut self, input: &[u8], to_client: &mut Vec<u8>, events: &mut Vec<Event>) {
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
            self.forward_to_chip(&held, to_client, events);
            self.forward_to_chip(&input[take..], to_client, events);
            return;
        }
        self.forward_to_chip(input, to_client, events);
    }

    fn forward_to_chip(&mut self, bytes: &[u8], to_client: &mut Vec<u8>, events: &mut Vec<Event>) {
        if bytes.is_empty() {
            return;
        }
        if self.flash.holding() {
            self.flash.hold(bytes);
            return;
        }
        if self.flash.fast() {
            let mut data = Vec::with_capacity(bytes.len());
            self.flash.gate(bytes, &mut data, to_client);
            if !data.is_empty() {
                events.push(Event::Data(data));
            }
            return;
        }
        if self.opening == Opening::Esptool {
            self.flash.record(bytes);
        }
        let pending = &mut self.pending_baud;
        let mut mem_end = false;
        self.to_chip.feed(bytes, |head, _| {
            if head.len() >= 2 && head[0] == DIR_REQUEST && head[1] == op::MEM_END {
                mem_end = true;
            }
            if head.len() >= 12 && head[0] == DIR_REQUEST && head[1] == op::CHANGE_BAUDRATE {
                let new = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
                *pending = (new > 0).then_some(new);
            }
        });
        if mem_end && self.opening == Opening::Esptool {
            self.flash.client_mem_end();
        }
        events.push(Event::Data(bytes.to_vec()));
    }

    /// Bytes from the chip, appended to `to_client` unchanged (unless they answer the
    /// bridge's own commands). When they complete a successful CHANGE_BAUDRATE reply,
    /// [`Event::SwitchBaud`] is pushed: the session applies it before it takes any further
    /// client input.
    pub fn from_device(
        &mut self,
        data: &[u8],
        now: Instant,
        to_client: &mut Vec<u8>,
        events: &mut Vec<Event>,
    ) {
        if self.flash.watching_chip() {
            let mut own = Vec::new();
            let chip = self.flash.from_device(data, self.line, now, &mut own);
            if chip == Chip::ForClient {
                to_client.extend_from_slice(data);
            }
            self.settle(own, to_client, events);
            return;
        }
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
                self.line = baud;
                self.flash.client_switched(baud);
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
            let mut r = EspRaw::new(115_200, None, false);
            let mut ev = Vec::new();
            r.from_client(&sync[..split], &mut Vec::new(), &mut ev);
            r.from_client(&sync[split..], &mut Vec::new(), &mut ev);
            assert_eq!(ev.first(), Some(&Event::EnterBootloader), "split {split}");
            assert_eq!(Event::data_of(&ev), sync, "split {split}");
        }
    }

    #[test]
    fn a_terminal_never_triggers_the_bootloader() {
        for opening in [&b"hello\r\n"[..], &[SLIP_END, 0x41], &[SLIP_END, 0, 0x10]] {
            let mut r = EspRaw::new(115_200, None, false);
            let mut ev = Vec::new();
            r.from_client(opening, &mut Vec::new(), &mut ev);
            r.from_client(&sync_frame(), &mut Vec::new(), &mut ev);
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
                let mut r = EspRaw::new(115_200, None, false);
                let mut ev = Vec::new();
                r.from_client(b"x", &mut Vec::new(), &mut ev);
                r.from_client(&req[..split], &mut Vec::new(), &mut ev);
                r.from_client(&req[split..], &mut Vec::new(), &mut ev);
                ev.clear();
                let mut out = Vec::new();
                let (a, b) = rep.split_at(rep.len() / 2);
                r.from_device(a, Instant::now(), &mut out, &mut ev);
                assert!(ev.is_empty(), "not before the reply is complete");
                r.from_device(b, Instant::now(), &mut out, &mut ev);
                assert_eq!(ev, vec![Event::SwitchBaud(921_600)]);
                assert_eq!(out, rep, "reply passes unchanged");
            }
        }
    }

    #[test]
    fn failed_or_unrelated_replies_do_not_switch() {
        let mut r = EspRaw::new(115_200, None, false);
        let mut ev = Vec::new();
        r.from_client(&change_baud(460_800), &mut Vec::new(), &mut ev);
        ev.clear();
        let mut out = Vec::new();
        r.from_device(&reply(op::SYNC, &[0, 0]), Instant::now(), &mut out, &mut ev);
        r.from_device(
            &reply(op::CHANGE_BAUDRATE, &[1, 5]),
            Instant::now(),
            &mut out,
            &mut ev,
        );
        r.from_device(
            &reply(op::CHANGE_BAUDRATE, &[0, 0]),
            Instant::now(),
            &mut out,
            &mut ev,
        );
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
            let mut r = EspRaw::new(115_200, None, false);
            let mut ev = Vec::new();
            for piece in stream.chunks(chunk) {
                r.from_client(piece, &mut Vec::new(), &mut ev);
            }
            assert_eq!(
                Event::data_of(&ev),
                stream,
                "chunk {chunk}: bytes pass unchanged"
            );
            ev.clear();
            let mut out = Vec::new();
            r.from_device(
                &reply(op::CHANGE_BAUDRATE, &[0, 0]),
                Instant::now(),
                &mut out,
                &mut ev,
            );
            assert_eq!(ev, vec![Event::SwitchBaud(460_800)], "chunk {chunk}");
        }
    }

    #[test]
    fn escaped_baud_values_are_decoded() {
        // 0xC0 and 0xDB inside the value travel escaped.
        let baud = u32::from_le_bytes([0xC0, 0xDB, 0x0E, 0x00]);
        let mut r = EspRaw::new(115_200, None, false);
        let mut ev = Vec::new();
        r.from_client(&change_baud(baud), &mut Vec::new(), &mut ev);
        ev.clear();
        let mut out = Vec::new();
        r.from_device(
            &reply(op::CHANGE_BAUDRATE, &[0, 0]),
            Instant::now(),
            &mut out,
            &mut ev,
        );
        assert_eq!(ev, vec![Event::SwitchBaud(baud)]);
    }

    // ---- the flash rate ([`super::super::flash_rate`]) -------------------------------------

    use crate::protocol::flash_rate::change_baudrate_reply;
    use std::time::Duration;

    fn request(op: u8, data: &[u8]) -> Vec<u8> {
        let mut p = vec![DIR_REQUEST, op];
        p.extend((data.len() as u16).to_le_bytes());
        p.extend([0; 4]);
        p.extend_from_slice(data);
        slip(&p)
    }

    fn change(new: u32, old: u32) -> Vec<u8> {
        let mut d = new.to_le_bytes().to_vec();
        d.extend(old.to_le_bytes());
        request(op::CHANGE_BAUDRATE, &d)
    }

    /// The stub upload esptool makes: MEM_BEGIN, two MEM_DATA, MEM_END.
    fn stub_upload() -> Vec<u8> {
        let mut out = request(op::MEM_BEGIN, &[0; 16]);
        out.extend(request(op::MEM_DATA, &[0xC0; 40]));
        out.extend(request(op::MEM_DATA, &[0x11; 40]));
        out.extend(request(op::MEM_END, &[0, 0, 0, 0, 0x58, 0xe6, 0x0b, 0x40]));
        out
    }

    struct Run {
        raw: EspRaw,
        now: Instant,
        to_client: Vec<u8>,
    }

    impl Run {
        /// esptool's session up to its stub upload, against a raw port with `flash`.
        fn up_to_stub(flash: Option<u32>, can_reset: bool) -> Run {
            let mut run = Run {
                raw: EspRaw::new(115_200, flash, can_reset),
                now: Instant::now(),
                to_client: Vec::new(),
            };
            let ev = run.client(&sync_frame());
            assert_eq!(ev[0], Event::EnterBootloader);
            run.client(&stub_upload());
            run
        }
        fn client(&mut self, bytes: &[u8]) -> Vec<Event> {
            let mut ev = Vec::new();
            self.raw.from_client(bytes, &mut self.to_client, &mut ev);
            ev
        }
        fn chip(&mut self, bytes: &[u8]) -> Vec<Event> {
            let mut ev = Vec::new();
            self.raw
                .from_device(bytes, self.now, &mut self.to_client, &mut ev);
            ev
        }
        fn later(&mut self, by: Duration) -> Vec<Event> {
            self.now += by;
            let mut ev = Vec::new();
            if self.raw.deadline().is_some_and(|d| d <= self.now) {
                self.raw.on_deadline(self.now, &mut self.to_client, &mut ev);
            }
            ev
        }
    }

    fn hello() -> Vec<u8> {
        slip(b"OHAI")
    }

    #[test]
    fn after_ohai_the_line_moves_to_the_flash_rate_and_the_client_never_knows() {
        let mut run = Run::up_to_stub(Some(921_600), true);
        // The stub greets: the greeting goes to the client, the bridge asks for the rate at
        // the line's rate (the legacy stub needs the real old rate).
        let ev = run.chip(&hello());
        assert_eq!(ev, vec![Event::Data(change(921_600, 115_200))]);
        assert_eq!(run.to_client, hello());
        assert!(run.raw.holding());
        // esptool's next command (its own CHANGE_BAUDRATE to 460800), split in two reads: held.
        let mine = change(460_800, 115_200);
        let mut next = mine.clone();
        next.extend(request(op::SPI_ATTACH, &[0; 4]));
        assert!(run.client(&next[..5]).is_empty());
        // The stub's reply is the bridge's: swallowed; the UART follows after the stub.
        let ev = run.chip(&reply(op::CHANGE_BAUDRATE, &[0, 0]));
        assert_eq!(
            ev,
            vec![
                Event::SwitchBaud(921_600),
                Event::Settle(Duration::from_millis(30)),
                Event::Data(change(921_600, 921_600)),
            ]
        );
        assert_eq!(
            run.to_client,
            hello(),
            "the bridge's reply is not the client's"
        );
        // The probe comes back at the new rate: the held bytes go, the client's
        // CHANGE_BAUDRATE answered here (never to the chip), SPI_ATTACH passed on.
        let ev = run.chip(&reply(op::CHANGE_BAUDRATE, &[0, 0]));
        assert!(
            matches!(&ev[0], Event::Notice(t) if t.contains("921600")),
            "{ev:?}"
        );
        assert!(!run.raw.holding());
        let ev2 = run.client(&next[5..]);
        let mut to_chip = Event::data_of(&ev);
        to_chip.extend(Event::data_of(&ev2));
        let mut want = vec![SLIP_END, SLIP_END];
        want.extend(request(op::SPI_ATTACH, &[0; 4]));
        assert_eq!(
            to_chip, want,
            "only frame delimiters of the swallowed request"
        );
        let mut want_client = hello();
        want_client.extend(change_baudrate_reply());
        assert_eq!(run.to_client, want_client);
        // Bulk data passes unchanged afterwards, escaped bytes and all.
        let block = request(op::FLASH_DEFL_DATA, &[0xC0, 0xDB, 0x0F, 0x00].repeat(100));
        for chunk in [1, 3, 7, block.len()] {
            let mut got = Vec::new();
            for piece in block.chunks(chunk) {
                got.extend(Event::data_of(&run.client(piece)));
            }
            assert_eq!(got, block, "chunk {chunk}");
        }
    }

    #[test]
    fn a_client_change_split_anywhere_is_answered_once_and_never_reaches_the_chip() {
        let mine = change(2_000_000, 115_200);
        for split in 0..=mine.len() {
            let mut run = Run::up_to_stub(Some(115_200), true);
            // Already at the flash rate: nothing to change, only the client to answer.
            assert!(run.chip(&hello()).is_empty());
            let mut to_chip = Event::data_of(&run.client(&mine[..split]));
            to_chip.extend(Event::data_of(&run.client(&mine[split..])));
            assert!(
                to_chip.iter().all(|&b| b == SLIP_END),
                "split {split}: {to_chip:?}"
            );
            let mut want = hello();
            want.extend(change_baudrate_reply());
            assert_eq!(run.to_client, want, "split {split}");
        }
    }

    #[test]
    fn a_stub_that_does_not_answer_the_change_leaves_the_clients_rate() {
        let mut run = Run::up_to_stub(Some(921_600), true);
        run.chip(&hello());
        assert!(run.client(&request(op::SPI_ATTACH, &[0; 4])).is_empty());
        let ev = run.later(Duration::from_millis(600));
        assert!(
            matches!(&ev[0], Event::Notice(t) if t.contains("did not answer")),
            "{ev:?}"
        );
        assert_eq!(Event::data_of(&ev), request(op::SPI_ATTACH, &[0; 4]));
        assert!(!ev.iter().any(|e| matches!(e, Event::SwitchBaud(_))));
        // From now on the client's own changes go to the chip as before.
        let ev = run.client(&change(460_800, 115_200));
        assert_eq!(Event::data_of(&ev), change(460_800, 115_200));
    }

    #[test]
    fn wiring_that_cannot_carry_the_rate_brings_the_stub_up_again_at_the_clients_rate() {
        let mut run = Run::up_to_stub(Some(2_000_000), true);
        run.chip(&hello());
        run.chip(&reply(op::CHANGE_BAUDRATE, &[0, 0]));
        let held = request(op::SPI_ATTACH, &[0; 4]);
        assert!(run.client(&held).is_empty());
        // Garbage at the new rate, then nothing: the probe failed.
        assert!(run.chip(&[0xC0, 0x13, 0x77, 0xC0, 0xFF]).is_empty());
        let ev = run.later(Duration::from_millis(600));
        assert_eq!(
            ev,
            vec![
                Event::SwitchBaud(115_200),
                Event::EnterBootloader,
                Event::Settle(Duration::from_millis(400)),
                Event::Data(request(op::SYNC, &{
                    let mut d = vec![7, 7, 0x12, 0x20];
                    d.extend([0x55; 32]);
                    d
                })),
            ]
        );
        // No answer yet: SYNC again.
        let ev = run.later(Duration::from_millis(600));
        assert_eq!(ev.len(), 1, "{ev:?}");
        // The ROM's boot message and its SYNC replies (the ROM's four status bytes).
        run.chip(b"ets Jun  8 2016 00:22:57\r\nwaiting for download\r\n");
        let ev = run.chip(&reply(op::SYNC, &[0, 0, 0, 0]));
        assert_eq!(ev[0], Event::Settle(Duration::from_millis(100)));
        // The recorded upload goes again, frame by frame, each after the previous reply.
        let mut decoder = esp_loader::slip::Decoder::new();
        let frames: Vec<Vec<u8>> = stub_upload()
            .iter()
            .filter_map(|&b| match decoder.push(b) {
                Some(esp_loader::slip::Decoded::Frame(f)) => Some(slip(&f)),
                _ => None,
            })
            .collect();
        assert_eq!(Event::data_of(&ev), frames[0]);
        for pair in frames.windows(2) {
            run.chip(&reply(op::SYNC, &[0, 0, 0, 0])); // a late SYNC reply: ignored
            let op = pair[0][2];
            let ev = run.chip(&reply(op, &[0, 0, 0, 0]));
            assert_eq!(Event::data_of(&ev), pair[1]);
        }
        assert!(run.chip(&reply(op::MEM_END, &[0, 0, 0, 0])).is_empty());
        // The stub greets again: the client's held bytes go at its own rate.
        let ev = run.chip(&hello());
        assert!(
            matches!(&ev[0], Event::Notice(t) if t.contains("did not answer at 2000000")),
            "{ev:?}"
        );
        assert_eq!(Event::data_of(&ev), held);
        assert_eq!(
            run.to_client,
            hello(),
            "nothing of the second start reached the client"
        );
        assert!(!run.raw.holding());
    }

    #[test]
    fn without_a_way_to_reset_a_failed_probe_ends_the_session_with_the_fix() {
        let mut run = Run::up_to_stub(Some(2_000_000), false);
        run.chip(&hello());
        run.chip(&reply(op::CHANGE_BAUDRATE, &[0, 0]));
        let ev = run.later(Duration::from_millis(600));
        assert!(
            matches!(&ev[..], [Event::Abort(t)] if t.contains("set flash_baud lower")),
            "{ev:?}"
        );
    }

    #[test]
    fn a_refusing_stub_a_terminal_and_no_flash_rate_change_nothing() {
        let mut run = Run::up_to_stub(Some(921_600), true);
        run.chip(&hello());
        let ev = run.chip(&reply(op::CHANGE_BAUDRATE, &[1, 5]));
        assert!(
            matches!(&ev[0], Event::Notice(t) if t.contains("refused")),
            "{ev:?}"
        );
        assert!(!run.raw.holding());
        // No flash rate: the greeting is only passed on.
        let mut run = Run::up_to_stub(None, true);
        assert!(run.chip(&hello()).is_empty());
        assert!(!run.raw.holding());
        // A terminal that happens to send a MEM_END frame: never treated as esptool.
        let mut raw = EspRaw::new(115_200, Some(921_600), true);
        let mut out = Vec::new();
        let mut ev = Vec::new();
        raw.from_client(b"hello", &mut out, &mut ev);
        raw.from_client(&stub_upload(), &mut out, &mut ev);
        raw.from_device(&hello(), Instant::now(), &mut out, &mut ev);
        assert!(!raw.holding());
        assert!(!ev.iter().any(|e| matches!(e, Event::SwitchBaud(_))));
    }
}
