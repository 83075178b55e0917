//! The chip itself: one thread that owns the chip's UART (a pty master or a
//! socket, see [`super::port`]),
//! follows the boot straps, and runs whichever firmware is active (ROM
//! loader, flasher stub, or application).
//!
//! It never blocks on I/O: it polls the master and a wake-up eventfd with a
//! timeout set to its next deadline (end of a busy period, boot, next log
//! line, paced byte), so pin changes and shutdown are handled at once.
//!
//! Reset model: EN low holds the chip in reset (silent, deaf; its UART FIFOs
//! are lost). On EN rising, IO0 is latched; after the ROM's start-up time the
//! chip prints the ROM banner at 115200 and enters download mode or the
//! application. Software resets (the stub's or ROM's "reboot") boot again as
//! latched. Every reset puts the UART back at 115200.
//!
//! Line model: a byte is judged when it is read from the port, i.e. when it
//! arrives at the chip's UART (paced: about when its wire time has passed),
//! against the rate the UART has at that moment: so while a stub waits
//! before switching rates, what arrives is received at the old rate. Output
//! keeps the rate it was queued at. Bytes sent faster than the wiring's
//! limit (`max_baud`) arrive garbled either way.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::app::App;
use super::loader::{Effect, Env, Loader, ResetKind};
use super::port::Port;
use super::slip::{self, Decoded};
use super::uart;
use super::{
    BootMode, ChipMode, Direction, Level, NO_BAUD, PinChange, Shared, SimConfig, SimEventKind,
    StubKind,
};

/// The ESP32 ROM's UART rate after any reset (40 MHz crystal).
pub const BOOT_BAUD: u32 = 115_200;
/// Where the application partition starts, and how much of it names the image.
const APP_OFFSET: u32 = 0x10000;
const APP_DIGEST_LEN: usize = 64 * 1024;

/// From EN rising (or a software reset) to the ROM's first output.
const ROM_STARTUP: Duration = Duration::from_millis(3);
/// Bound on bytes waiting to go out; beyond it the line is "busy" and new
/// output is lost, as bytes are when nobody listens to a real UART.
const MAX_OUT: usize = 1 << 20;
/// Bound on bytes received but not yet handled (the chip is busy).
const MAX_RX: usize = 256 << 10;
/// How often a flash backed by a file is saved while it keeps changing.
const SAVE_EVERY: Duration = Duration::from_millis(500);
/// Longest sleep between checks when nothing is due.
const IDLE_WAIT: Duration = Duration::from_secs(1);
/// While pacing, bytes move in slices of about this much wire time.
const PACE_SLICE: Duration = Duration::from_millis(2);

const ROM_BANNER: &str = "ets Jun  8 2016 00:22:57\r\n\r\n";
const DOWNLOAD_BOOT: &str = "boot:0x3 (DOWNLOAD_BOOT(UART0/UART1/SDIO_REI_REO_V2))\r\n";
const SPI_BOOT: &str = "boot:0x13 (SPI_FAST_FLASH_BOOT)\r\n";
const SPI_BOOT_TAIL: &str = "configsip: 0, SPIWP:0xee\r\n\
    clk_drv:0x00,q_drv:0x00,d_drv:0x00,cs0_drv:0x00,hd_drv:0x00,wp_drv:0x00\r\n\
    mode:DIO, clock div:2\r\n\
    load:0x3fff0030,len:7104\r\n\
    load:0x40078000,len:15576\r\n\
    load:0x40080400,len:4\r\n\
    entry 0x4008064c\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    PowerOn,
    Software,
}

impl Cause {
    fn rst(self) -> &'static str {
        match self {
            Cause::PowerOn => "rst:0x1 (POWERON_RESET),",
            Cause::Software => "rst:0xc (SW_CPU_RESET),",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Boot {
    /// Through the ROM, which boots as the straps were latched.
    Rom(Cause),
    /// The loader jumps straight into the application.
    AppDirect,
}

enum Run {
    Held,
    Booting {
        at: Instant,
        boot: Boot,
    },
    Download {
        loader: Box<Loader>,
        slip: slip::Decoder,
    },
    App {
        app: App,
        boot_at: Instant,
    },
}

struct OutChunk {
    bytes: Vec<u8>,
    pos: usize,
    baud: u32,
    /// Whether the rate comparison for this chunk has been made.
    checked: bool,
}

struct RxChunk {
    bytes: Vec<u8>,
    pos: usize,
    garbled: bool,
    ready_at: Instant,
    /// The chip's rate when these bytes arrived.
    baud: u32,
}

pub(super) struct Chip {
    shared: Arc<Shared>,
    port: Port,
    pace: bool,
    flash_file: Option<PathBuf>,
    power_on: BootMode,
    stub: Option<StubKind>,
    max_baud: Option<u32>,
    start: Instant,
    run: Run,
    latched: BootMode,
    en: Level,
    baud: u32,
    out: VecDeque<OutChunk>,
    out_len: usize,
    rx: VecDeque<RxChunk>,
    rx_len: usize,
    rx_free_at: Instant,
    tx_free_at: Instant,
    pending: VecDeque<Effect>,
    busy_until: Instant,
    flash_idle_at: Instant,
    last_save: Instant,
    io_error_logged: bool,
}

impl Chip {
    pub(super) fn new(shared: Arc<Shared>, port: Port, cfg: &SimConfig, start: Instant) -> Chip {
        Chip {
            shared,
            port,
            pace: cfg.pace,
            flash_file: cfg.flash_file.clone(),
            power_on: cfg.power_on,
            stub: cfg.stub,
            max_baud: cfg.max_baud,
            start,
            run: Run::Held,
            latched: cfg.power_on,
            en: Level::High,
            baud: BOOT_BAUD,
            out: VecDeque::new(),
            out_len: 0,
            rx: VecDeque::new(),
            rx_len: 0,
            rx_free_at: start,
            tx_free_at: start,
            pending: VecDeque::new(),
            busy_until: start,
            flash_idle_at: start,
            last_save: start,
            io_error_logged: false,
        }
    }

    pub(super) fn run(mut self) {
        // Power-on counts as a reset with the configured straps.
        self.latched = self.power_on;
        self.run = Run::Booting {
            at: self.start + ROM_STARTUP,
            boot: Boot::Rom(Cause::PowerOn),
        };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if self.shared.lock().stop {
                break;
            }
            let now = Instant::now();
            self.apply_pin_changes();
            self.step(now);
            self.maybe_save(now, false);

            let now = Instant::now();
            let want_read = !self.pace || self.rx_free_at <= now;
            let want_write = !self.out.is_empty() && (!self.pace || self.tx_free_at <= now);
            let timeout = self
                .next_deadline(now)
                .map(|d| d.saturating_duration_since(now))
                .unwrap_or(IDLE_WAIT)
                .min(IDLE_WAIT);
            let waited = self
                .port
                .wait(&self.shared.wake, want_read, want_write, Some(timeout));
            let ready = match waited {
                Ok(r) => r,
                Err(e) => {
                    self.io_error("poll", &e);
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            if ready.woken {
                let mut b = [0u8; 8];
                let _ = rustix::io::read(&self.shared.wake, &mut b);
            }
            if ready.readable && want_read {
                let max = if self.pace {
                    slice_bytes(self.host_baud())
                } else {
                    buf.len()
                };
                match self.port.read(&mut buf[..max]) {
                    Ok(0) => {}
                    Ok(n) => self.receive(&buf[..n], Instant::now()),
                    Err(e) => {
                        self.io_error("read", &e);
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
            if ready.writable && want_write {
                self.transmit(Instant::now());
            }
        }
        self.maybe_save(Instant::now(), true);
    }

    fn io_error(&mut self, what: &str, e: &std::io::Error) {
        if !self.io_error_logged {
            tracing::warn!("virtual ESP32: {} {what} failed: {e}", self.port.describe());
            self.io_error_logged = true;
        }
    }

    /// The host's rate; where the port cannot tell, the chip's own (see
    /// [`Port::host_baud`]).
    fn host_baud(&self) -> u32 {
        self.port.host_baud().unwrap_or(self.baud)
    }

    fn set_mode(&self, mode: ChipMode, at: Instant) {
        let mut st = self.shared.lock();
        st.mode = mode;
        self.shared
            .record_locked(&mut st, at, SimEventKind::Mode(mode));
    }

    fn set_baud(&mut self, baud: u32, at: Instant) {
        if baud == self.baud {
            return;
        }
        let from = self.baud;
        self.baud = baud;
        let mut st = self.shared.lock();
        st.baud = baud;
        self.shared
            .record_locked(&mut st, at, SimEventKind::Baud { from, to: baud });
    }

    fn apply_pin_changes(&mut self) {
        let changes: Vec<PinChange> = std::mem::take(&mut self.shared.lock().pin_changes);
        for c in changes {
            match (self.en, c.en) {
                (Level::High, Level::Low) => {
                    // Reset: everything in flight inside the chip is gone.
                    self.clear_chip();
                    self.run = Run::Held;
                    self.set_mode(ChipMode::Reset, c.at);
                    self.set_baud(BOOT_BAUD, c.at);
                }
                (Level::Low, Level::High) => {
                    self.latched = match c.io0 {
                        Level::Low => BootMode::Download,
                        Level::High => BootMode::App,
                    };
                    self.run = Run::Booting {
                        at: c.at + ROM_STARTUP,
                        boot: Boot::Rom(Cause::PowerOn),
                    };
                }
                _ => {}
            }
            self.en = c.en;
        }
    }

    fn clear_chip(&mut self) {
        self.out.clear();
        self.out_len = 0;
        self.rx.clear();
        self.rx_len = 0;
        self.pending.clear();
        let now = Instant::now();
        self.busy_until = now;
        self.flash_idle_at = now;
    }

    /// Everything that is due: boot, queued effects, received input, app output.
    fn step(&mut self, now: Instant) {
        if let Run::Booting { at, boot } = self.run
            && now >= at
        {
            self.boot(boot, at);
        }
        self.run_effects(now);
        self.handle_rx(now);
        let text = match &mut self.run {
            Run::App { app, boot_at } => {
                app.poll(now.saturating_duration_since(*boot_at).as_millis() as u64)
            }
            _ => Vec::new(),
        };
        self.send(text);
    }

    /// The first 16 hex digits of the MD5 of the app partition's first 64 KiB (at 0x10000):
    /// which image the chip boots.
    fn app_digest(&self) -> String {
        use md5::{Digest, Md5};
        let flash = self.shared.lock_flash();
        let image = flash.read(APP_OFFSET, APP_DIGEST_LEN).unwrap_or(&[]);
        Md5::digest(image)
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn boot(&mut self, boot: Boot, at: Instant) {
        match (boot, self.latched) {
            (Boot::Rom(cause), BootMode::Download) => {
                let text = format!(
                    "{ROM_BANNER}{}{DOWNLOAD_BOOT}waiting for download\r\n",
                    cause.rst()
                );
                self.send(text.into_bytes());
                self.run = Run::Download {
                    loader: Box::new(Loader::rom(self.stub)),
                    slip: slip::Decoder::new(),
                };
                self.set_mode(ChipMode::Download, at);
            }
            (Boot::Rom(cause), BootMode::App) => {
                let text = format!("{ROM_BANNER}{}{SPI_BOOT}{SPI_BOOT_TAIL}", cause.rst());
                self.send(text.into_bytes());
                self.run = Run::App {
                    app: App::new(false).with_image_digest(&self.app_digest()),
                    boot_at: at,
                };
                self.set_mode(ChipMode::App, at);
            }
            (Boot::AppDirect, _) => {
                self.run = Run::App {
                    app: App::new(true).with_image_digest(&self.app_digest()),
                    boot_at: at,
                };
                self.set_mode(ChipMode::App, at);
            }
        }
    }

    fn software_reset(&mut self, kind: ResetKind, now: Instant) {
        // What is already queued for the UART still leaves (the loaders
        // answer before they reset); input and pending work are dropped.
        self.rx.clear();
        self.rx_len = 0;
        self.pending.clear();
        self.busy_until = now;
        self.set_mode(ChipMode::Reset, now);
        self.set_baud(BOOT_BAUD, now);
        let boot = match kind {
            ResetKind::Reboot => Boot::Rom(Cause::Software),
            ResetKind::RunApp => Boot::AppDirect,
        };
        self.run = Run::Booting {
            at: now + ROM_STARTUP,
            boot,
        };
    }

    fn run_effects(&mut self, now: Instant) {
        while now >= self.busy_until {
            let Some(effect) = self.pending.pop_front() else {
                return;
            };
            match effect {
                Effect::Send(payload) => self.send(slip::encode(&payload)),
                Effect::Busy(d) => self.busy_until = self.busy_until.max(now) + d,
                Effect::FlashWork(d) => self.flash_idle_at = self.flash_idle_at.max(now) + d,
                Effect::WaitFlash => self.busy_until = self.busy_until.max(self.flash_idle_at),
                Effect::SetBaud(b) => self.set_baud(b, now),
                Effect::WaitTxIdle => {
                    if !self.tx_idle(now) {
                        // Tried again when output moves (see next_deadline).
                        self.pending.push_front(Effect::WaitTxIdle);
                        return;
                    }
                }
                Effect::StubStarted(kind, by) => {
                    self.set_mode(ChipMode::Stub, now);
                    self.shared.record(now, SimEventKind::Stub { kind, by });
                }
                Effect::Record(kind) => self.shared.record(now, kind),
                Effect::Reset(kind) => {
                    self.software_reset(kind, now);
                    return;
                }
            }
        }
    }

    /// Whether everything queued has left the UART.
    fn tx_idle(&self, now: Instant) -> bool {
        self.out.is_empty() && (!self.pace || self.tx_free_at <= now)
    }

    /// The wiring's limit, if bytes sent at `sender_baud` exceed it.
    fn over_limit(&self, sender_baud: u32) -> Option<u32> {
        self.max_baud.filter(|&max| sender_baud > max)
    }

    /// What a receiver at `rx_baud` gets of `bytes` sent at `tx_baud`, and
    /// whether that is garbled; records and counts the wrong rate or the
    /// overrun wiring limit.
    fn cross_line(
        &self,
        dir: Direction,
        bytes: &[u8],
        tx_baud: u32,
        rx_baud: u32,
        now: Instant,
    ) -> Option<Vec<u8>> {
        let (chip_baud, host_baud) = match dir {
            Direction::Rx => (rx_baud, tx_baud),
            Direction::Tx => (tx_baud, rx_baud),
        };
        let wrong = !rates_match(tx_baud, rx_baud);
        let over = self.over_limit(tx_baud);
        if !wrong && over.is_none() {
            return None;
        }
        let n = bytes.len();
        if wrong {
            let counter = match dir {
                Direction::Rx => &self.shared.wrong_baud_rx,
                Direction::Tx => &self.shared.wrong_baud_tx,
            };
            counter.fetch_add(n as u64, Ordering::Relaxed);
            let kind = SimEventKind::WrongBaud {
                dir,
                chip_baud,
                host_baud,
                bytes: n,
            };
            self.shared.record(now, kind);
        }
        if let Some(max_baud) = over {
            let counter = match dir {
                Direction::Rx => &self.shared.over_max_baud_rx,
                Direction::Tx => &self.shared.over_max_baud_tx,
            };
            counter.fetch_add(n as u64, Ordering::Relaxed);
            let kind = SimEventKind::OverMaxBaud {
                dir,
                chip_baud,
                host_baud,
                max_baud,
                bytes: n,
            };
            self.shared.record(now, kind);
        }
        Some(match over {
            Some(max) => uart::through_slow_wire(bytes, tx_baud, rx_baud, max),
            None => uart::garble(bytes, tx_baud, rx_baud),
        })
    }

    /// Takes bytes read from the master: checks them against the rate the
    /// chip listens at (and the wiring's limit), and queues them for when
    /// they have "arrived".
    fn receive(&mut self, bytes: &[u8], now: Instant) {
        if matches!(self.run, Run::Held | Run::Booting { .. }) {
            // In reset the UART is not listening.
            return;
        }
        let host_rate = self.host_baud();
        let (data, garbled) = match self.cross_line(Direction::Rx, bytes, host_rate, self.baud, now)
        {
            Some(garbage) => (garbage, true),
            None => (bytes.to_vec(), false),
        };
        let ready_at = if self.pace {
            let at = self.rx_free_at.max(now) + uart::wire_time(bytes.len(), host_rate);
            self.rx_free_at = at;
            at
        } else {
            now
        };
        if self.rx_len + data.len() > MAX_RX {
            // The chip is not reading: its FIFO overflows.
            return;
        }
        self.rx_len += data.len();
        self.rx.push_back(RxChunk {
            bytes: data,
            pos: 0,
            garbled,
            ready_at,
            baud: self.baud,
        });
    }

    /// Feeds received bytes to the running firmware while it is free.
    fn handle_rx(&mut self, now: Instant) {
        loop {
            if !self.pending.is_empty() || now < self.busy_until {
                return;
            }
            let Some(chunk) = self.rx.front_mut() else {
                return;
            };
            if chunk.ready_at > now {
                return;
            }
            let garbled = chunk.garbled;
            let arrived_at_baud = chunk.baud;
            let rest = &chunk.bytes[chunk.pos..];
            let mut used = rest.len();
            let mut echo = Vec::new();
            match &mut self.run {
                Run::Download { loader, slip } => {
                    for (i, &b) in rest.iter().enumerate() {
                        let decoded = if garbled {
                            slip.push_garbled(b)
                        } else {
                            slip.push(b)
                        };
                        if let Some(Decoded::Dropped(slip::Dropped::Garbled)) = decoded {
                            self.shared
                                .wrong_baud_frames
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        if let Some(Decoded::Frame(frame)) = decoded {
                            if let Some((op, len)) = loader.command_of(&frame) {
                                let kind = SimEventKind::Command {
                                    op,
                                    len,
                                    baud: arrived_at_baud,
                                };
                                self.shared.record(now, kind);
                            }
                            let env = Env {
                                baud: self.baud,
                                io0_high_at_boot: self.latched == BootMode::App,
                            };
                            let effects = {
                                let mut flash = self.shared.lock_flash();
                                loader.handle_frame(&frame, &mut flash, env)
                            };
                            self.pending.extend(effects);
                            used = i + 1;
                            break;
                        }
                    }
                }
                Run::App { app, boot_at } => {
                    let ms = now.saturating_duration_since(*boot_at).as_millis() as u64;
                    echo = app.input(ms, rest);
                }
                Run::Held | Run::Booting { .. } => {}
            }
            if let Some(chunk) = self.rx.front_mut() {
                chunk.pos += used;
                if chunk.pos >= chunk.bytes.len() {
                    self.rx_len -= chunk.bytes.len();
                    self.rx.pop_front();
                }
            }
            self.send(echo);
            self.run_effects(now);
        }
    }

    /// Queues bytes for the UART at the chip's current rate.
    fn send(&mut self, bytes: Vec<u8>) {
        if bytes.is_empty() || self.out_len + bytes.len() > MAX_OUT {
            return;
        }
        self.out_len += bytes.len();
        self.out.push_back(OutChunk {
            bytes,
            pos: 0,
            baud: self.baud,
            checked: false,
        });
    }

    /// Moves queued output into the port, garbling what the host cannot
    /// decode at its current rate, and pacing it if asked to.
    fn transmit(&mut self, now: Instant) {
        let host_rx = self.port.host_baud();
        while let Some(front) = self.out.front() {
            if !front.checked {
                self.check_front(host_rx, now);
                if self.out.front().is_some_and(|c| c.bytes.is_empty()) {
                    // Nothing the host could decode.
                    self.out.pop_front();
                    continue;
                }
            }
            let Some(chunk) = self.out.front_mut() else {
                return;
            };
            let rest = chunk.bytes.len() - chunk.pos;
            let n = if self.pace {
                rest.min(slice_bytes(chunk.baud))
            } else {
                rest
            };
            let written = match self.port.write(&chunk.bytes[chunk.pos..chunk.pos + n]) {
                Ok(w) => w,
                Err(e) => {
                    if !self.io_error_logged {
                        tracing::warn!("virtual ESP32: {} write failed: {e}", self.port.describe());
                        self.io_error_logged = true;
                    }
                    0
                }
            };
            chunk.pos += written;
            self.out_len -= written;
            let baud = chunk.baud;
            if chunk.pos >= chunk.bytes.len() {
                self.out.pop_front();
            }
            if self.pace {
                self.tx_free_at = self.tx_free_at.max(now) + uart::wire_time(written, baud);
                return;
            }
            if written < n {
                // The host's input queue is full; wait for POLLOUT.
                return;
            }
        }
    }

    /// Judges the first queued chunk, once, against the host's rate (where
    /// the port cannot tell it, the chip's) and the wiring's limit.
    fn check_front(&mut self, host_rx: Option<u32>, now: Instant) {
        let Some(chunk) = self.out.front() else {
            return;
        };
        let host = host_rx.unwrap_or(chunk.baud);
        let rest = &chunk.bytes[chunk.pos..];
        let garbage = self.cross_line(Direction::Tx, rest, chunk.baud, host, now);
        let Some(chunk) = self.out.front_mut() else {
            return;
        };
        chunk.checked = true;
        if let Some(garbage) = garbage {
            self.out_len = self.out_len - (chunk.bytes.len() - chunk.pos) + garbage.len();
            chunk.bytes = garbage;
            chunk.pos = 0;
        }
    }

    fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| {
            next = Some(next.map_or(t, |n| n.min(t)));
        };
        match &self.run {
            Run::Booting { at, .. } => consider(*at),
            Run::App { app, boot_at } => {
                consider(*boot_at + Duration::from_millis(app.next_due_ms()));
            }
            _ => {}
        }
        if !self.pending.is_empty() {
            let waits_for_tx =
                matches!(self.pending.front(), Some(Effect::WaitTxIdle)) && self.busy_until <= now;
            if !waits_for_tx {
                consider(self.busy_until);
            } else if self.pace && self.out.is_empty() {
                // The last paced byte is still on the wire. (Output still
                // queued wakes the poll once written, or at tx_free_at below.)
                consider(self.tx_free_at);
            }
        }
        if let Some(chunk) = self.rx.front() {
            consider(chunk.ready_at.max(self.busy_until));
        }
        if self.pace {
            if self.rx_free_at > now {
                consider(self.rx_free_at);
            }
            if !self.out.is_empty() && self.tx_free_at > now {
                consider(self.tx_free_at);
            }
        }
        if self.flash_file.is_some() && self.shared.lock_flash().is_dirty() {
            consider(self.last_save + SAVE_EVERY);
        }
        next
    }

    fn maybe_save(&mut self, now: Instant, last: bool) {
        let Some(path) = &self.flash_file else {
            return;
        };
        if !last && now < self.last_save + SAVE_EVERY {
            return;
        }
        let mut flash = self.shared.lock_flash();
        if !flash.is_dirty() {
            return;
        }
        self.last_save = now;
        if let Err(e) = flash.save(path) {
            tracing::warn!("virtual ESP32: saving flash to {}: {e}", path.display());
        }
    }
}

/// Whether a receiver at `rx` understands a sender at `tx`; never at
/// [`NO_BAUD`].
fn rates_match(tx: u32, rx: u32) -> bool {
    tx == rx && tx != NO_BAUD
}

/// How many bytes take about [`PACE_SLICE`] on the wire at `baud`.
fn slice_bytes(baud: u32) -> usize {
    let per_sec = u64::from(baud.max(10)) / uart::BITS_PER_BYTE;
    ((per_sec * PACE_SLICE.as_micros() as u64 / 1_000_000) as usize).max(1)
}
