//! The raw port's own exchange with the flasher stub: once the stub greets ("OHAI"), the UART
//! moves to the board's `flash_baud`, whatever rate the client asked for, because over TCP the
//! client's rate means nothing and the board's wiring is what limits the speed. No I/O: bytes
//! and the time in, events out; [`super::esp_raw::EspRaw`] drives it.
//!
//! The sequence, each step only after the one before has been answered, with the client's
//! bytes held meanwhile so that its stream and the chip's replies never interleave with the
//! bridge's:
//! 1. until the client's MEM_END, its stream is recorded (bounded): the stub upload, should it
//!    have to be done again;
//! 2. after OHAI: CHANGE_BAUDRATE(flash_baud, line rate) at the line rate, the reply swallowed.
//!    The legacy stub (esptool 4, esptool 5.0-5.2) derives its new divider from the second
//!    argument, which must be the rate actually on the line; esp-flasher-stub ignores it;
//! 3. the UART switches once the stub has (both switch within 10 ms of their reply), and a
//!    probe, CHANGE_BAUDRATE(flash_baud, flash_baud) (no change for either stub), must come
//!    back intact at the new rate;
//! 4. from then on the client's own CHANGE_BAUDRATE is answered here (the reply it expects)
//!    and never reaches the chip, which would otherwise be set to a wrong rate by the legacy
//!    stub (the client names its nominal old rate, not the one on the line).
//!
//! If the probe does not come back (wiring that cannot carry the rate), the chip is reset
//! into its bootloader, synced and given the recorded stub upload again at the client's rate,
//! and the session goes on at that rate: the flash still succeeds, only slower. Without a
//! way to reset the chip the session has to end, with the fix in the log.

use super::Event;
use esp_loader::slip::{self, Decoded, Decoder};
use esp_loader::{DIR_REQUEST, DIR_RESPONSE, STUB_HELLO, op};
use std::time::{Duration, Instant};

/// How long the chip may take to answer one of the bridge's commands.
const REPLY_TIMEOUT: Duration = Duration::from_millis(500);
/// After the stub's reply to CHANGE_BAUDRATE, before anything goes out at the new rate: the
/// legacy stub switches 10 ms after its reply, esp-flasher-stub after 5 ms and its TX idle
/// plus 5 ms (esptool itself waits 50 ms).
const SWITCH_SETTLE: Duration = Duration::from_millis(30);
/// After the reset into download mode, before the first SYNC: the reset sequence and the
/// ROM's boot message.
const RESET_SETTLE: Duration = Duration::from_millis(400);
/// SYNC attempts after that reset, this far apart.
const SYNC_TRIES: u32 = 20;
const SYNC_INTERVAL: Duration = Duration::from_millis(150);
/// After the first SYNC reply, for the other seven to arrive before the upload starts.
const SYNC_SETTLE: Duration = Duration::from_millis(100);
/// The most of the client's stream kept until its stub upload ends: several times any stub
/// (ESP32-S3's is about 20 KiB) with the SYNCs and register reads before it.
const RECORD_MAX: usize = 256 * 1024;

/// Where the exchange stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Recording the client's stream until its MEM_END.
    BeforeStub,
    /// The client's MEM_END went out: the stub's OHAI comes next.
    AwaitHello,
    /// The bridge's CHANGE_BAUDRATE went out at the line rate.
    Changing { deadline: Instant },
    /// At the new rate: the bridge's probe went out.
    Probing { deadline: Instant },
    /// The UART runs at the flash rate; the client's rate changes are answered here.
    Fast,
    /// The chip did not answer at the flash rate: bringing its stub up again at the client's.
    Recovering { step: Recovery, deadline: Instant },
    /// Nothing more to do in this session.
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recovery {
    Syncing { tries: u32 },
    Uploading { next: usize },
    AwaitHello,
}

/// The client's view of the frame it is sending, while the UART is at the flash rate: a
/// CHANGE_BAUDRATE is kept from the chip, everything else passes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Gate {
    /// Between frames, or at a frame's start: its first bytes are held until its op is known.
    Head(Vec<u8>),
    /// The rest of a frame that passes.
    Pass,
    /// The rest of a client's CHANGE_BAUDRATE, answered here.
    Swallow,
}

/// The flash-rate exchange of one raw session.
#[derive(Debug)]
pub struct FlashRate {
    /// The board's `flash_baud`.
    target: Option<u32>,
    /// Whether the session can reset the chip into its bootloader (the fallback needs it).
    can_reset: bool,
    state: State,
    /// The client's stream until its MEM_END (`None` once past [`RECORD_MAX`]).
    recording: Option<Vec<u8>>,
    /// The stub upload, as frames ready to send again.
    upload: Vec<Vec<u8>>,
    /// The rate the client runs the line at (what it would be without this exchange).
    client_rate: u32,
    /// Client bytes held while the bridge's own exchange is under way.
    held: Vec<u8>,
    /// Held bytes let go, for [`FlashRate::take_released`].
    released: Vec<u8>,
    /// The chip's replies during the exchange.
    decoder: Decoder,
    gate: Gate,
}

/// What [`FlashRate::from_device`] made of the chip's bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Chip {
    /// Not the exchange's: they go to the client.
    ForClient,
    /// Taken by the exchange.
    Taken,
}

/// How long `bytes` take on the wire at `baud` (10 bits each).
fn wire_time(bytes: usize, baud: u32) -> Duration {
    let bits = u64::try_from(bytes).unwrap_or(u64::MAX).saturating_mul(10);
    Duration::from_micros(bits.saturating_mul(1_000_000) / u64::from(baud.max(1)))
}

fn request(op: u8, data: &[u8]) -> Vec<u8> {
    let mut payload = vec![DIR_REQUEST, op];
    // The bridge's requests are a few bytes long.
    payload.extend(u16::try_from(data.len()).unwrap_or(u16::MAX).to_le_bytes());
    payload.extend([0; 4]);
    payload.extend_from_slice(data);
    slip::encode(&payload)
}

fn change_baudrate(new: u32, old: u32) -> Vec<u8> {
    let mut data = new.to_le_bytes().to_vec();
    data.extend(old.to_le_bytes());
    request(op::CHANGE_BAUDRATE, &data)
}

fn sync() -> Vec<u8> {
    let mut data = vec![0x07, 0x07, 0x12, 0x20];
    data.extend([0x55; 32]);
    request(op::SYNC, &data)
}

/// The stub's answer to CHANGE_BAUDRATE as the client expects it: done, two status bytes.
pub fn change_baudrate_reply() -> Vec<u8> {
    slip::encode(&[DIR_RESPONSE, op::CHANGE_BAUDRATE, 2, 0, 0, 0, 0, 0, 0, 0])
}

/// A response frame's op and whether it says done (first status byte 0: after the 8-byte
/// header, for the ROM's four status bytes and the stub's two alike).
fn response(frame: &[u8]) -> Option<(u8, bool)> {
    match frame {
        [DIR_RESPONSE, op, _, _, _, _, _, _, status, ..] => Some((*op, *status == 0)),
        _ => None,
    }
}

impl FlashRate {
    /// `target`: the board's flash rate (`None`: the client's rate is used as before);
    /// `line`: the rate the session starts at.
    pub fn new(target: Option<u32>, line: u32, can_reset: bool) -> Self {
        FlashRate {
            target,
            can_reset,
            state: if target.is_some() {
                State::BeforeStub
            } else {
                State::Off
            },
            recording: target.map(|_| Vec::new()),
            upload: Vec::new(),
            client_rate: line,
            held: Vec::new(),
            released: Vec::new(),
            decoder: Decoder::new(),
            gate: Gate::Head(Vec::new()),
        }
    }

    /// Whether client bytes are held now (the session stops reading the client meanwhile).
    pub fn holding(&self) -> bool {
        matches!(
            self.state,
            State::Changing { .. } | State::Probing { .. } | State::Recovering { .. }
        )
    }

    /// Whether the UART runs at the flash rate and the client's rate changes are answered here.
    pub fn fast(&self) -> bool {
        self.state == State::Fast
    }

    /// Whether the chip's bytes are to be looked at frame by frame (the OHAI, or replies to
    /// the bridge's own commands).
    pub fn watching_chip(&self) -> bool {
        self.state == State::AwaitHello || self.holding()
    }

    /// When [`FlashRate::on_deadline`] is due.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Changing { deadline }
            | State::Probing { deadline }
            | State::Recovering { deadline, .. } => Some(*deadline),
            _ => None,
        }
    }

    /// The client changed the line rate (a CHANGE_BAUDRATE to the ROM, passed through).
    pub fn client_switched(&mut self, baud: u32) {
        self.client_rate = baud;
    }

    /// Client bytes going to the chip before the stub runs: recorded for a second upload.
    pub fn record(&mut self, bytes: &[u8]) {
        if let Some(r) = &mut self.recording {
            if r.len().saturating_add(bytes.len()) > RECORD_MAX {
                self.recording = None;
            } else {
                r.extend_from_slice(bytes);
            }
        }
    }

    /// The client sent MEM_END: the stub starts; its upload is kept from the recording.
    pub fn client_mem_end(&mut self) {
        if self.state != State::BeforeStub {
            return;
        }
        self.state = State::AwaitHello;
        let Some(recording) = self.recording.take() else {
            return;
        };
        let mut decoder = Decoder::new();
        self.upload = recording
            .iter()
            .filter_map(|&b| match decoder.push(b) {
                Some(Decoded::Frame(f))
                    if matches!(
                        f.get(..2),
                        Some([DIR_REQUEST, op::MEM_BEGIN | op::MEM_DATA | op::MEM_END])
                    ) =>
                {
                    Some(slip::encode(&f))
                }
                _ => None,
            })
            .collect();
    }

    /// Client bytes while held.
    pub fn hold(&mut self, bytes: &[u8]) {
        self.held.extend_from_slice(bytes);
    }

    /// The stub greeted: the bridge asks it for the flash rate. `line` is the UART's rate now.
    fn start(&mut self, line: u32, now: Instant, events: &mut Vec<Event>) {
        let Some(target) = self.target else {
            self.state = State::Off;
            return;
        };
        self.client_rate = line;
        if target == line {
            // Already there: only the client's own changes need answering.
            self.state = State::Fast;
            return;
        }
        events.push(Event::Data(change_baudrate(target, line)));
        self.decoder.reset();
        self.state = State::Changing {
            deadline: now + REPLY_TIMEOUT,
        };
    }

    /// The chip's bytes. While the exchange is under way they are its own; otherwise only an
    /// OHAI is looked for, and they go to the client.
    pub fn from_device(
        &mut self,
        data: &[u8],
        line: u32,
        now: Instant,
        events: &mut Vec<Event>,
    ) -> Chip {
        if self.state == State::AwaitHello {
            let mut hello = false;
            for &b in data {
                if let Some(Decoded::Frame(f)) = self.decoder.push(b) {
                    hello |= f == STUB_HELLO;
                }
            }
            if hello {
                self.start(line, now, events);
            }
            return Chip::ForClient;
        }
        if !self.holding() {
            return Chip::ForClient;
        }
        for &b in data {
            if let Some(Decoded::Frame(f)) = self.decoder.push(b) {
                self.chip_frame(&f, now, events);
            }
        }
        Chip::Taken
    }

    fn chip_frame(&mut self, frame: &[u8], now: Instant, events: &mut Vec<Event>) {
        let Some(target) = self.target else { return };
        match self.state {
            State::Changing { .. } => match response(frame) {
                Some((op::CHANGE_BAUDRATE, true)) => {
                    events.push(Event::SwitchBaud(target));
                    events.push(Event::Settle(SWITCH_SETTLE));
                    events.push(Event::Data(change_baudrate(target, target)));
                    self.state = State::Probing {
                        deadline: now + SWITCH_SETTLE + REPLY_TIMEOUT,
                    };
                }
                Some((op::CHANGE_BAUDRATE, false)) => self.give_up(
                    format!(
                        "the flasher stub refused {target} baud: flashing at the client's {} baud",
                        self.client_rate
                    ),
                    events,
                ),
                _ => {}
            },
            // Anything else while probing is the wiring failing at this rate; the deadline
            // decides.
            State::Probing { .. } if response(frame) == Some((op::CHANGE_BAUDRATE, true)) => {
                self.state = State::Fast;
                events.push(Event::Notice(format!(
                    "raw port: the flasher stub runs at {target} baud (flash_baud); the client asked for {}",
                    self.client_rate
                )));
                self.release();
            }
            State::Recovering { step, .. } => self.recovery_frame(step, frame, now, events),
            _ => {}
        }
    }

    fn recovery_frame(
        &mut self,
        step: Recovery,
        frame: &[u8],
        now: Instant,
        events: &mut Vec<Event>,
    ) {
        match step {
            Recovery::Syncing { .. } => {
                if response(frame).is_some_and(|(op, _)| op == op::SYNC) {
                    events.push(Event::Settle(SYNC_SETTLE));
                    self.upload_from(0, now + SYNC_SETTLE, events);
                }
            }
            Recovery::Uploading { next } => {
                let want = self.upload.get(next).and_then(|f| f.get(2)).copied();
                match response(frame) {
                    Some((op, true)) if Some(op) == want => self.upload_from(next + 1, now, events),
                    Some((op, false)) if Some(op) == want => events.push(Event::Abort(format!(
                        "the chip refused the flasher stub uploaded again at {} baud; end of session",
                        self.client_rate
                    ))),
                    // The other SYNC replies, or noise.
                    _ => {}
                }
            }
            Recovery::AwaitHello => {
                if frame == STUB_HELLO {
                    let target = self.target.unwrap_or_default();
                    self.give_up(
                        format!(
                            "the board did not answer at {target} baud (flash_baud; wiring that cannot carry it?): its stub was started again and this session flashes at the client's {} baud; lower flash_baud if this happens every time",
                            self.client_rate
                        ),
                        events,
                    );
                }
            }
        }
    }

    /// Sends frame `next` of the recorded upload (the first at `at`), or waits for the OHAI
    /// after the last. Its reply is due once the frame has crossed the wire (a 6 KiB block
    /// takes half a second at 115200) and the chip has had its time.
    fn upload_from(&mut self, next: usize, at: Instant, events: &mut Vec<Event>) {
        let (step, wire) = match self.upload.get(next) {
            Some(frame) => {
                events.push(Event::Data(frame.clone()));
                (
                    Recovery::Uploading { next },
                    wire_time(frame.len(), self.client_rate),
                )
            }
            None => (Recovery::AwaitHello, Duration::ZERO),
        };
        self.state = State::Recovering {
            step,
            deadline: at + wire + REPLY_TIMEOUT,
        };
    }

    /// The time is past [`FlashRate::deadline`].
    pub fn on_deadline(&mut self, now: Instant, events: &mut Vec<Event>) {
        match self.state.clone() {
            State::Changing { deadline } if now >= deadline => self.give_up(
                format!(
                    "the flasher stub did not answer the change to {} baud: flashing at the client's {} baud",
                    self.target.unwrap_or_default(),
                    self.client_rate
                ),
                events,
            ),
            State::Probing { deadline } if now >= deadline => self.recover(now, events),
            State::Recovering {
                step: Recovery::Syncing { tries },
                deadline,
            } if now >= deadline => {
                if tries >= SYNC_TRIES {
                    events.push(Event::Abort(
                        "the chip did not answer after its reset into the bootloader; end of session".into(),
                    ));
                    self.state = State::Off;
                } else {
                    events.push(Event::Data(sync()));
                    self.state = State::Recovering {
                        step: Recovery::Syncing { tries: tries + 1 },
                        deadline: now + SYNC_INTERVAL,
                    };
                }
            }
            State::Recovering { deadline, .. } if now >= deadline => {
                events.push(Event::Abort(
                    "the chip stopped answering while its flasher stub was uploaded again; end of session".into(),
                ));
                self.state = State::Off;
            }
            _ => {}
        }
    }

    /// The probe did not come back: reset the chip and bring its stub up again at the
    /// client's rate, if that can be done.
    fn recover(&mut self, now: Instant, events: &mut Vec<Event>) {
        let target = self.target.unwrap_or_default();
        if !self.can_reset || self.upload.is_empty() {
            events.push(Event::Abort(format!(
                "the board does not answer at {target} baud (flash_baud) and {}: end of session; set flash_baud lower (or 0) for this board",
                if self.can_reset {
                    "its stub upload was not recorded"
                } else {
                    "it cannot be reset from here"
                }
            )));
            self.state = State::Off;
            return;
        }
        events.push(Event::SwitchBaud(self.client_rate));
        events.push(Event::EnterBootloader);
        events.push(Event::Settle(RESET_SETTLE));
        events.push(Event::Data(sync()));
        self.decoder.reset();
        self.state = State::Recovering {
            step: Recovery::Syncing { tries: 1 },
            deadline: now + RESET_SETTLE + SYNC_INTERVAL,
        };
    }

    /// No faster rate this session: say why once and let the client's bytes go.
    fn give_up(&mut self, why: String, events: &mut Vec<Event>) {
        events.push(Event::Notice(format!("raw port: {why}")));
        self.state = State::Off;
        self.release();
    }

    /// Lets the held client bytes go: [`super::esp_raw::EspRaw`] takes them and passes them
    /// on as the state now says.
    fn release(&mut self) {
        self.released.append(&mut self.held);
    }

    /// Client bytes let go since the last call.
    pub fn take_released(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.released)
    }

    /// Client bytes while the UART runs at the flash rate: everything but CHANGE_BAUDRATE
    /// frames goes to `to_chip`; those are answered into `to_client`.
    pub fn gate(&mut self, bytes: &[u8], to_chip: &mut Vec<u8>, to_client: &mut Vec<u8>) {
        let mut rest = bytes;
        while let Some((&b, tail)) = rest.split_first() {
            match &mut self.gate {
                Gate::Pass | Gate::Swallow if b != slip::END => {
                    let run = rest
                        .iter()
                        .position(|&b| b == slip::END)
                        .unwrap_or(rest.len());
                    if self.gate == Gate::Pass {
                        to_chip.extend_from_slice(&rest[..run]);
                    }
                    rest = &rest[run..];
                }
                Gate::Pass | Gate::Swallow => {
                    // END: a frame ends (and the next may start). Every END goes on: an empty
                    // frame is nothing to the stub.
                    if self.gate == Gate::Swallow {
                        to_client.extend(change_baudrate_reply());
                    }
                    to_chip.push(b);
                    self.gate = Gate::Head(Vec::new());
                    rest = tail;
                }
                Gate::Head(head) => {
                    rest = tail;
                    if b == slip::END {
                        to_chip.append(head);
                        to_chip.push(b);
                        continue;
                    }
                    head.push(b);
                    if head.len() < 2 {
                        continue;
                    }
                    // Direction and op travel unescaped (neither is 0xC0 or 0xDB for a request).
                    if head[..] == [DIR_REQUEST, op::CHANGE_BAUDRATE] {
                        self.gate = Gate::Swallow;
                    } else {
                        to_chip.append(head);
                        self.gate = Gate::Pass;
                    }
                }
            }
        }
    }
}
