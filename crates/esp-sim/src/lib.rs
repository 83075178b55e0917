//! A virtual ESP32 (original ESP32, ESP32-D0WD-V3 rev v3.1) at the far end of
//! a Linux pseudo-terminal, faithful enough that the real esptool flashes it.
//! It can also sit on a unix socket instead (a VM's serial port, see
//! [`port`]), and take strap changes from another process ([`control_socket`]).
//!
//! [`Esp32Sim::start`] opens the pty and runs the chip in its own thread:
//! boot straps on EN and IO0 ([`StrapPins`]), the ROM download mode with its
//! SLIP loader and the flasher stub esptool uploads, an application mode with
//! a boot log and a periodic log line, a UART with its own baud rate that
//! garbles whatever the host sends or expects at another rate, and a flash
//! chip that can persist to a file. Everything observable (pin edges, mode
//! changes, baud changes, wrong-rate traffic, every loader command with the
//! rate it arrived at) is recorded as [`SimEvent`]s.
//!
//! Two flasher stubs are modelled, because they change the baud rate
//! differently and a bridge that runs the UART faster than its client asked
//! must survive both ([`StubKind`]): the legacy stub (esptool up to 5.2)
//! computes its new divider from the *old* rate the host names, so a wrong
//! old rate gives a wrong rate; esp-flasher-stub (esptool 5.3 and later) sets
//! the new rate as asked. Which one runs is decided from the address esptool
//! uploaded it to, or forced with [`SimConfig::stub`] (`--stub`).
//!
//! A wiring limit ([`SimConfig::max_baud`], `--max-baud`) models a Pi UART,
//! adapter or cable that cannot carry a rate: above it every byte either way
//! arrives garbled ([`SimEventKind::OverMaxBaud`]).
//!
//! Layout: [`slip`], [`loader`], [`regs`], [`flash`], [`uart`] and [`app`]
//! are pure and unit-tested; [`pty`], [`port`], [`control_socket`] and
//! [`chip`] do the I/O.

mod app;
mod chip;
mod cli;
mod control_socket;
mod flash;
mod loader;
mod port;
mod pty;
mod regs;
mod uart;

use esp_loader::slip;

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, Write as _};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use rustix::event::{EventfdFlags, eventfd};

pub use cli::{SimArgs, run as run_cli};
pub use flash::Flash;

/// The electrical level of a strap pin. Released pins are pulled up (High).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Level {
    Low,
    High,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Low => "low",
            Level::High => "high",
        }
    }
}

/// What the chip does when it comes out of reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BootMode {
    /// IO0 high: boot the application from flash.
    App,
    /// IO0 low: ROM serial download mode ("waiting for download").
    Download,
}

/// What the chip is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChipMode {
    /// Held in reset by EN, or still in the ROM's start-up.
    Reset,
    /// The ROM loader is waiting for commands.
    Download,
    /// The flasher stub uploaded by esptool is running.
    Stub,
    /// The application is running.
    App,
}

impl ChipMode {
    fn name(self) -> &'static str {
        match self {
            ChipMode::Reset => "reset",
            ChipMode::Download => "download",
            ChipMode::Stub => "stub",
            ChipMode::App => "app",
        }
    }
}

/// The chip's UART rate when its divider matches no rate a host can set: a
/// stub was told an old or new rate of 0 (the legacy stub then programs a
/// zero divider, or divides by zero). Every byte either way is garbled
/// until a reset brings the UART back to 115200.
pub const NO_BAUD: u32 = 0;

/// Which flasher stub the chip runs once esptool has uploaded one. They
/// differ where a bridge can trip: CHANGE_BAUDRATE (new rate, old rate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StubKind {
    /// esptool-legacy-flasher-stub (uploaded by esptool up to 5.2; text at
    /// 0x400be000 on the ESP32). Replies at the current rate, waits 10 ms,
    /// then scales its divider by old/new: the new rate is the current one
    /// x new / old, right only if "old" is the rate actually on the line.
    /// Then 1 ms before it reads the next command.
    Legacy,
    /// esp-flasher-stub (preferred by esptool 5.3 and later; text at
    /// 0x400a8000 on the ESP32). Replies, waits 5 ms and until its TX is
    /// idle, sets the rate to "new" (the old one is ignored), waits 5 ms.
    Flasher,
}

impl StubKind {
    pub fn name(self) -> &'static str {
        match self {
            StubKind::Legacy => "legacy",
            StubKind::Flasher => "flasher",
        }
    }
}

/// How the simulator decided which stub was uploaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StubDecidedBy {
    /// A segment was loaded at that stub's text address.
    Address,
    /// Neither stub's text address was loaded: taken for the legacy stub.
    Fallback,
    /// Forced by [`SimConfig::stub`].
    Config,
}

impl StubDecidedBy {
    fn name(self) -> &'static str {
        match self {
            StubDecidedBy::Address => "address",
            StubDecidedBy::Fallback => "fallback",
            StubDecidedBy::Config => "config",
        }
    }
}

/// Which way bytes were travelling when the rates disagreed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Host to chip: the chip received garbage (and the frame failed).
    Rx,
    /// Chip to host: the host received garbage.
    Tx,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Rx => "rx",
            Direction::Tx => "tx",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimEventKind {
    /// EN changed level (High = released, the chip runs).
    En(Level),
    /// IO0 changed level.
    Io0(Level),
    /// The chip entered a mode: `Reset` when EN pulls it into reset (or a
    /// software reset starts), the others when they begin.
    Mode(ChipMode),
    /// The chip's UART changed rate (`to` is [`NO_BAUD`] when no host can
    /// match the new divider).
    Baud { from: u32, to: u32 },
    /// Bytes crossed the line while the chip and the host disagreed on the rate.
    WrongBaud {
        dir: Direction,
        chip_baud: u32,
        host_baud: u32,
        bytes: usize,
    },
    /// Bytes were sent faster than the wiring carries ([`SimConfig::max_baud`]):
    /// the receiver got garbage, whatever its rate. `dir` as for `WrongBaud`;
    /// the sender's rate (the host's for rx, the chip's for tx) was above
    /// `max_baud`.
    OverMaxBaud {
        dir: Direction,
        chip_baud: u32,
        host_baud: u32,
        max_baud: u32,
        bytes: usize,
    },
    /// A complete loader command frame reached the loader (ROM or stub): its
    /// op, the length of its data (after the 8-byte header) and the chip's
    /// UART rate when its last byte arrived. This is the evidence of what
    /// rate a transfer ran at: the `FLASH_DATA`/`FLASH_DEFL_DATA`
    /// (or `MEM_DATA`, `READ_FLASH`) events of a session carry the rate of
    /// its bulk. Frames lost to garbling never get here. JSON:
    /// `{"event":"command","op":"0x11","name":"FLASH_DEFL_DATA","len":16400,"baud":921600}`.
    Command { op: u8, len: usize, baud: u32 },
    /// MEM_END started an uploaded program, taken for this stub.
    /// JSON: `{"event":"stub","kind":"legacy","by":"address"}`.
    Stub { kind: StubKind, by: StubDecidedBy },
    /// A CHANGE_BAUDRATE was accepted: by the ROM (`stub` None) or a stub,
    /// with the arguments it got and the rate it will switch to ([`NO_BAUD`]
    /// if no host can match it). The switch itself follows as a `Baud`
    /// event after the loader's delay. JSON:
    /// `{"event":"change_baudrate","loader":"legacy","new":921600,"old":115200,"rate":921600}`.
    ChangeBaudrate {
        stub: Option<StubKind>,
        new: u32,
        old: u32,
        rate: u32,
    },
}

/// Something that happened, `t_us` microseconds after the sim started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimEvent {
    pub t_us: u64,
    pub kind: SimEventKind,
}

impl SimEvent {
    /// One JSON object, as written to the event log.
    pub fn to_json(&self) -> String {
        let mut s = format!("{{\"t_us\":{},", self.t_us);
        // Writing to a String cannot fail.
        let _ = match &self.kind {
            SimEventKind::En(l) => write!(s, "\"event\":\"en\",\"level\":\"{}\"", l.name()),
            SimEventKind::Io0(l) => write!(s, "\"event\":\"io0\",\"level\":\"{}\"", l.name()),
            SimEventKind::Mode(m) => write!(s, "\"event\":\"mode\",\"mode\":\"{}\"", m.name()),
            SimEventKind::Baud { from, to } => {
                write!(s, "\"event\":\"baud\",\"from\":{from},\"to\":{to}")
            }
            SimEventKind::WrongBaud {
                dir,
                chip_baud,
                host_baud,
                bytes,
            } => write!(
                s,
                "\"event\":\"wrong_baud\",\"dir\":\"{}\",\"chip_baud\":{chip_baud},\
                 \"host_baud\":{host_baud},\"bytes\":{bytes}",
                dir.name()
            ),
            SimEventKind::OverMaxBaud {
                dir,
                chip_baud,
                host_baud,
                max_baud,
                bytes,
            } => write!(
                s,
                "\"event\":\"over_max_baud\",\"dir\":\"{}\",\"chip_baud\":{chip_baud},\
                 \"host_baud\":{host_baud},\"max_baud\":{max_baud},\"bytes\":{bytes}",
                dir.name()
            ),
            SimEventKind::Command { op, len, baud } => write!(
                s,
                "\"event\":\"command\",\"op\":\"0x{op:02x}\",\"name\":\"{}\",\"len\":{len},\
                 \"baud\":{baud}",
                loader::op_name(*op)
            ),
            SimEventKind::Stub { kind, by } => write!(
                s,
                "\"event\":\"stub\",\"kind\":\"{}\",\"by\":\"{}\"",
                kind.name(),
                by.name()
            ),
            SimEventKind::ChangeBaudrate {
                stub,
                new,
                old,
                rate,
            } => write!(
                s,
                "\"event\":\"change_baudrate\",\"loader\":\"{}\",\"new\":{new},\"old\":{old},\
                 \"rate\":{rate}",
                stub.map_or("rom", StubKind::name)
            ),
        };
        s.push('}');
        s
    }
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Flash size in bytes (rounded up to whole 4 KiB sectors).
    pub flash_size: usize,
    /// Make bytes take their wire time at the current rate in both directions.
    pub pace: bool,
    /// What the chip does at power-on, as if IO0 had been strapped so.
    pub power_on: BootMode,
    /// Append every event as a JSON line to this file.
    pub event_log: Option<PathBuf>,
    /// Create this symlink to the pty slave (removed again on drop).
    pub link: Option<PathBuf>,
    /// Load the flash from this file at start and save it back on change.
    pub flash_file: Option<PathBuf>,
    /// Instead of a pty, connect the chip's UART to this unix stream socket
    /// (a VM's serial port). The host's baud rate cannot be seen then; see
    /// [`port::Port::host_baud`]. Not together with `link`.
    pub connect_unix: Option<PathBuf>,
    /// Listen on this unix socket for strap changes (`en=low io0=high`),
    /// see [`control_socket`].
    pub control_unix: Option<PathBuf>,
    /// Which stub the uploaded program is taken for; `None` (auto): decided
    /// at MEM_END from where it was loaded, see [`StubKind`] and
    /// [`SimEventKind::Stub`].
    pub stub: Option<StubKind>,
    /// The fastest rate the wiring between host and chip carries. Bytes sent
    /// faster (in practice: whenever the chip's UART runs above it) arrive
    /// garbled in both directions (the line cannot follow pulses shorter
    /// than a bit at this rate; see the `uart` module), recorded as
    /// [`SimEventKind::OverMaxBaud`]. `None`: no limit.
    pub max_baud: Option<u32>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            flash_size: 4 << 20,
            pace: false,
            power_on: BootMode::App,
            event_log: None,
            link: None,
            flash_file: None,
            connect_unix: None,
            control_unix: None,
            stub: None,
            max_baud: None,
        }
    }
}

/// Caps the in-memory event list; a board left at the wrong rate for days
/// must not eat the host's memory. The event log file still gets everything.
const MAX_EVENTS: usize = 100_000;

struct PinChange {
    at: Instant,
    en: Level,
    io0: Level,
}

struct State {
    en: Level,
    io0: Level,
    pin_changes: Vec<PinChange>,
    events: Vec<SimEvent>,
    log: Option<File>,
    mode: ChipMode,
    baud: u32,
    stop: bool,
}

/// What the handle, the pins and the chip thread share.
struct Shared {
    start: Instant,
    state: Mutex<State>,
    wake: OwnedFd,
    flash: Mutex<Flash>,
    wrong_baud_rx: AtomicU64,
    wrong_baud_tx: AtomicU64,
    wrong_baud_frames: AtomicU64,
    over_max_baud_rx: AtomicU64,
    over_max_baud_tx: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not take the simulator down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_flash(&self) -> MutexGuard<'_, Flash> {
        self.flash.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn t_us(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_micros() as u64
    }

    fn record_locked(&self, st: &mut State, at: Instant, kind: SimEventKind) {
        let ev = SimEvent {
            t_us: self.t_us(at),
            kind,
        };
        if let Some(log) = st.log.as_mut() {
            let line = ev.to_json() + "\n";
            if log.write_all(line.as_bytes()).is_err() {
                // A full disk should not stop the chip; stop logging instead.
                st.log = None;
            }
        }
        if st.events.len() < MAX_EVENTS {
            st.events.push(ev);
        }
    }

    fn record(&self, at: Instant, kind: SimEventKind) {
        let mut st = self.lock();
        self.record_locked(&mut st, at, kind);
    }

    fn wake(&self) {
        // An eventfd write only fails when the counter would overflow, and
        // then the chip thread is due to wake anyway.
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }
}

/// The EN and IO0 lines of the virtual board. Cheap to clone; any thread
/// (a GPIO backend, a test) can drive them.
#[derive(Clone)]
pub struct StrapPins {
    shared: Arc<Shared>,
}

impl StrapPins {
    /// Drives both lines at once. Edges are timestamped now; the chip reacts
    /// to them as of this instant (an EN rising edge samples this IO0).
    pub fn set(&self, en: Level, io0: Level) {
        let at = Instant::now();
        {
            let mut st = self.shared.lock();
            if st.en != en {
                st.en = en;
                self.shared.record_locked(&mut st, at, SimEventKind::En(en));
            }
            if st.io0 != io0 {
                st.io0 = io0;
                self.shared
                    .record_locked(&mut st, at, SimEventKind::Io0(io0));
            }
            st.pin_changes.push(PinChange { at, en, io0 });
        }
        self.shared.wake();
    }

    /// The levels last set: (EN, IO0).
    pub fn levels(&self) -> (Level, Level) {
        let st = self.shared.lock();
        (st.en, st.io0)
    }
}

/// A running virtual ESP32. Dropping it stops the chip and removes the link
/// and the control socket.
pub struct Esp32Sim {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    slave_path: PathBuf,
    link: Option<PathBuf>,
    control: Option<control_socket::ControlSocket>,
}

impl Esp32Sim {
    pub fn start(cfg: SimConfig) -> io::Result<Esp32Sim> {
        let start = Instant::now();
        let port = match &cfg.connect_unix {
            Some(_) if cfg.link.is_some() => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a link to the pty makes no sense when the chip is on a unix socket",
                ));
            }
            Some(path) => port::Port::Unix(port::UnixPort::connect(path)?),
            None => port::Port::Pty(pty::Pty::open(chip::BOOT_BAUD)?),
        };
        let slave_path = match &port {
            port::Port::Pty(p) => p.slave_path().to_path_buf(),
            port::Port::Unix(u) => u.path().to_path_buf(),
        };
        let flash = match &cfg.flash_file {
            Some(path) => Flash::load_or_new(cfg.flash_size, path)?,
            None => Flash::new(cfg.flash_size),
        };
        let log = match &cfg.event_log {
            Some(path) => Some(File::options().create(true).append(true).open(path)?),
            None => None,
        };
        let wake = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        if let Some(link) = &cfg.link {
            // Replace a stale link from an earlier run, never a real file.
            if std::fs::symlink_metadata(link).is_ok_and(|m| m.file_type().is_symlink()) {
                std::fs::remove_file(link)?;
            }
            std::os::unix::fs::symlink(&slave_path, link)?;
        }
        let shared = Arc::new(Shared {
            start,
            state: Mutex::new(State {
                en: Level::High,
                io0: Level::High,
                pin_changes: Vec::new(),
                events: Vec::new(),
                log,
                mode: ChipMode::Reset,
                baud: chip::BOOT_BAUD,
                stop: false,
            }),
            wake,
            flash: Mutex::new(flash),
            wrong_baud_rx: AtomicU64::new(0),
            wrong_baud_tx: AtomicU64::new(0),
            wrong_baud_frames: AtomicU64::new(0),
            over_max_baud_rx: AtomicU64::new(0),
            over_max_baud_tx: AtomicU64::new(0),
        });
        let control = match &cfg.control_unix {
            Some(path) => {
                let pins = StrapPins {
                    shared: Arc::clone(&shared),
                };
                match control_socket::ControlSocket::start(path, pins) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        if let Some(link) = &cfg.link {
                            let _ = std::fs::remove_file(link);
                        }
                        return Err(e);
                    }
                }
            }
            None => None,
        };
        let chip = chip::Chip::new(Arc::clone(&shared), port, &cfg, start);
        let thread = std::thread::Builder::new()
            .name("esp32-sim".into())
            .spawn(move || chip.run());
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                if let Some(link) = &cfg.link {
                    let _ = std::fs::remove_file(link);
                }
                return Err(e);
            }
        };
        Ok(Esp32Sim {
            shared,
            thread: Some(thread),
            slave_path,
            link: cfg.link,
            control,
        })
    }

    /// The port to open: the link if one was asked for, else `/dev/pts/N`
    /// (or the socket the chip is connected to).
    pub fn device_path(&self) -> &Path {
        self.link.as_deref().unwrap_or(&self.slave_path)
    }

    /// The pty slave itself, whatever the link (the socket in connect mode).
    pub fn slave_path(&self) -> &Path {
        &self.slave_path
    }

    pub fn pins(&self) -> StrapPins {
        StrapPins {
            shared: Arc::clone(&self.shared),
        }
    }

    pub fn events(&self) -> Vec<SimEvent> {
        self.shared.lock().events.clone()
    }

    /// Bytes from the host that reached the chip at the wrong rate (each one
    /// spoiling the frame or line it belonged to).
    pub fn wrong_baud_bytes(&self) -> u64 {
        self.shared.wrong_baud_rx.load(Ordering::Relaxed)
    }

    /// Loader frames lost because some of their bytes came garbled (at the
    /// wrong rate, or over the wiring's limit).
    pub fn wrong_baud_frames(&self) -> u64 {
        self.shared.wrong_baud_frames.load(Ordering::Relaxed)
    }

    /// Bytes the chip sent while the host listened at another rate.
    pub fn wrong_baud_tx_bytes(&self) -> u64 {
        self.shared.wrong_baud_tx.load(Ordering::Relaxed)
    }

    /// Bytes from the host sent faster than [`SimConfig::max_baud`] (all garbled).
    pub fn over_max_baud_bytes(&self) -> u64 {
        self.shared.over_max_baud_rx.load(Ordering::Relaxed)
    }

    /// Bytes the chip sent faster than [`SimConfig::max_baud`] (all garbled).
    pub fn over_max_baud_tx_bytes(&self) -> u64 {
        self.shared.over_max_baud_tx.load(Ordering::Relaxed)
    }

    /// A copy of the whole flash content.
    pub fn flash(&self) -> Vec<u8> {
        self.shared.lock_flash().contents().to_vec()
    }

    pub fn mode(&self) -> ChipMode {
        self.shared.lock().mode
    }

    /// The chip's current UART rate ([`NO_BAUD`] if no host can match it).
    pub fn baud(&self) -> u32 {
        self.shared.lock().baud
    }
}

impl Drop for Esp32Sim {
    fn drop(&mut self) {
        // No strap changes from outside once the chip is stopping.
        drop(self.control.take());
        self.shared.lock().stop = true;
        self.shared.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(link) = &self.link
            && std::fs::symlink_metadata(link).is_ok_and(|m| m.file_type().is_symlink())
        {
            let _ = std::fs::remove_file(link);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::termios::{OptionalActions, tcgetattr, tcsetattr};
    use std::time::Duration;

    /// Opens the slave as a host program would: raw, at `baud`, non-blocking.
    fn open_host(path: &Path, baud: u32) -> File {
        let f = File::options().read(true).write(true).open(path).unwrap();
        let mut t = tcgetattr(&f).unwrap();
        t.make_raw();
        t.set_speed(baud).unwrap();
        tcsetattr(&f, OptionalActions::Now, &t).unwrap();
        let flags = rustix::fs::fcntl_getfl(&f).unwrap();
        rustix::fs::fcntl_setfl(&f, flags | rustix::fs::OFlags::NONBLOCK).unwrap();
        f
    }

    /// Sends a SYNC at 115200 to a paced chip in download mode: its eight 14-byte replies
    /// must take their wire time (and not much more).
    fn assert_sync_takes_its_wire_time(host: &mut (impl std::io::Write + std::os::fd::AsFd)) {
        let frame = sync();
        let t = Instant::now();
        host.write_all(&frame).unwrap();
        let mut got = Vec::new();
        while got
            .windows(6)
            .filter(|w| *w == [0x55, 0, 0, 0, 0, 0xC0])
            .count()
            < 8
            && t.elapsed() < Duration::from_secs(1)
        {
            got.extend(read_until(host, b"", Duration::from_millis(1)));
        }
        let took = t.elapsed();
        let wire = uart::wire_time(frame.len() + 8 * 14, 115_200);
        assert!(took >= wire, "{took:?} < {wire:?}");
        assert!(took < wire + Duration::from_millis(100), "{took:?}");
    }

    /// Reads until `want` shows up (or `limit` passes); returns all that came.
    fn read_until(f: &impl std::os::fd::AsFd, want: &[u8], limit: Duration) -> Vec<u8> {
        let t = Instant::now();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while t.elapsed() < limit {
            if !want.is_empty() && got.windows(want.len()).any(|w| w == want) {
                break;
            }
            match rustix::io::read(f, &mut buf[..]) {
                Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        got
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    fn command(op: u8, data: &[u8], chk: u32) -> Vec<u8> {
        let mut p = vec![0, op];
        p.extend_from_slice(&(data.len() as u16).to_le_bytes());
        p.extend_from_slice(&chk.to_le_bytes());
        p.extend_from_slice(data);
        slip::encode(&p)
    }

    fn sync() -> Vec<u8> {
        let mut d = vec![0x07, 0x07, 0x12, 0x20];
        d.extend_from_slice(&[0x55; 32]);
        command(loader::op::SYNC, &d, 0)
    }

    fn words(w: &[u32]) -> Vec<u8> {
        w.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn wait_mode(sim: &Esp32Sim, mode: ChipMode) {
        let t = Instant::now();
        while sim.mode() != mode && t.elapsed() < Duration::from_secs(2) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(sim.mode(), mode);
    }

    fn event_time(sim: &Esp32Sim, kind: &SimEventKind) -> u64 {
        sim.events()
            .iter()
            .rev()
            .find(|e| &e.kind == kind)
            .map(|e| e.t_us)
            .unwrap_or_else(|| panic!("no {kind:?} in {:?}", sim.events()))
    }

    /// Polls `cond` for up to two seconds.
    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let t = Instant::now();
        while !cond() {
            assert!(t.elapsed() < Duration::from_secs(2), "timed out: {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn has_event(sim: &Esp32Sim, kind: &SimEventKind) -> bool {
        sim.events().iter().any(|e| &e.kind == kind)
    }

    /// A stub's reply to `op` with nothing in it: value 0, two status bytes 0.
    fn stub_ok(op: u8) -> [u8; 12] {
        [0xC0, 1, op, 2, 0, 0, 0, 0, 0, 0, 0, 0xC0]
    }

    /// Uploads a small program at `text` through the ROM, as esptool uploads
    /// a stub, and waits for its OHAI.
    fn upload_stub(host: &mut File, text: u32) {
        let body = [0x11u8; 64];
        host.write_all(&command(
            loader::op::MEM_BEGIN,
            &words(&[64, 1, 0x1800, text]),
            0,
        ))
        .unwrap();
        read_until(host, &[0xC0, 1, 5], Duration::from_secs(1));
        let mut d = words(&[64, 0, 0, 0]);
        d.extend_from_slice(&body);
        let chk = u32::from(loader::checksum(&body));
        host.write_all(&command(loader::op::MEM_DATA, &d, chk))
            .unwrap();
        read_until(host, &[0xC0, 1, 7], Duration::from_secs(1));
        host.write_all(&command(loader::op::MEM_END, &words(&[0, text + 0x10]), 0))
            .unwrap();
        let out = read_until(host, b"\xC0OHAI\xC0", Duration::from_secs(1));
        assert!(contains(&out, b"\xC0OHAI\xC0"), "{out:?}");
    }

    /// A sim in download mode with a host at 115200 past the ROM banner.
    fn download_sim(cfg: SimConfig) -> (Esp32Sim, File) {
        let sim = Esp32Sim::start(SimConfig {
            power_on: BootMode::Download,
            ..cfg
        })
        .unwrap();
        let host = open_host(sim.device_path(), 115_200);
        wait_mode(&sim, ChipMode::Download);
        read_until(&host, b"waiting for download\r\n", Duration::from_secs(1));
        (sim, host)
    }

    fn change_baud(new: u32, old: u32) -> Vec<u8> {
        command(loader::op::CHANGE_BAUDRATE, &words(&[new, old]), 0)
    }

    #[test]
    fn legacy_stub_takes_the_old_rate_it_is_told_for_the_truth() {
        let (sim, mut host) = download_sim(SimConfig::default());
        upload_stub(&mut host, loader::LEGACY_STUB_TEXT);
        assert_eq!(sim.mode(), ChipMode::Stub);
        assert!(has_event(
            &sim,
            &SimEventKind::Stub {
                kind: StubKind::Legacy,
                by: StubDecidedBy::Address
            }
        ));
        // The right old rate. A SYNC sent right behind it arrives while the
        // stub still waits, so at the old rate: understood, but answered at
        // the new one, which the host (still at 115200) cannot read.
        let mut both = change_baud(921_600, 115_200);
        both.extend_from_slice(&sync());
        host.write_all(&both).unwrap();
        let out = read_until(
            &host,
            &stub_ok(loader::op::CHANGE_BAUDRATE),
            Duration::from_secs(1),
        );
        assert!(
            contains(&out, &stub_ok(loader::op::CHANGE_BAUDRATE)),
            "{out:?}"
        );
        let sync_at = |baud| SimEventKind::Command {
            op: loader::op::SYNC,
            len: 36,
            baud,
        };
        wait_for("the SYNC", || has_event(&sim, &sync_at(115_200)));
        assert_eq!(sim.baud(), 921_600);
        let asked = event_time(
            &sim,
            &SimEventKind::ChangeBaudrate {
                stub: Some(StubKind::Legacy),
                new: 921_600,
                old: 115_200,
                rate: 921_600,
            },
        );
        let switched = event_time(
            &sim,
            &SimEventKind::Baud {
                from: 115_200,
                to: 921_600,
            },
        );
        assert!(switched >= asked + 10_000, "{asked} -> {switched}");
        let out = read_until(&host, b"", Duration::from_millis(100));
        assert!(!contains(&out, &[0xC0, 1, 8]), "{out:?}");
        wait_for("garbled replies", || sim.wrong_baud_tx_bytes() > 0);
        assert_eq!(sim.wrong_baud_bytes(), 0);

        // At the new rate the stub answers.
        let mut host = open_host(sim.device_path(), 921_600);
        host.write_all(&sync()).unwrap();
        let out = read_until(&host, &stub_ok(8), Duration::from_secs(1));
        assert!(contains(&out, &stub_ok(8)), "{out:?}");
        assert!(has_event(&sim, &sync_at(921_600)));

        // A wrong old rate (what a client that does not know the line was
        // switched under it sends): 921600 x 921600 / 115200.
        host.write_all(&change_baud(921_600, 115_200)).unwrap();
        let out = read_until(
            &host,
            &stub_ok(loader::op::CHANGE_BAUDRATE),
            Duration::from_secs(1),
        );
        assert!(
            contains(&out, &stub_ok(loader::op::CHANGE_BAUDRATE)),
            "the reply still comes at the old rate: {out:?}"
        );
        wait_for("the wrong rate", || sim.baud() == 7_372_800);
        host.write_all(&sync()).unwrap();
        let out = read_until(&host, b"", Duration::from_millis(150));
        assert!(!contains(&out, &[0xC0, 1, 8]), "{out:?}");
        assert!(sim.wrong_baud_bytes() > 0);
        // A reset brings back the ROM at 115200.
        sim.pins().set(Level::Low, Level::High);
        wait_for("the reset", || sim.baud() == 115_200);
    }

    #[test]
    fn legacy_stub_told_an_old_rate_of_zero_is_lost_until_reset() {
        let (sim, mut host) = download_sim(SimConfig::default());
        upload_stub(&mut host, loader::LEGACY_STUB_TEXT);
        host.write_all(&change_baud(921_600, 0)).unwrap();
        let out = read_until(
            &host,
            &stub_ok(loader::op::CHANGE_BAUDRATE),
            Duration::from_secs(1),
        );
        assert!(
            contains(&out, &stub_ok(loader::op::CHANGE_BAUDRATE)),
            "{out:?}"
        );
        wait_for("no rate", || sim.baud() == NO_BAUD);
        assert!(has_event(
            &sim,
            &SimEventKind::Baud {
                from: 115_200,
                to: NO_BAUD
            }
        ));
        assert!(has_event(
            &sim,
            &SimEventKind::ChangeBaudrate {
                stub: Some(StubKind::Legacy),
                new: 921_600,
                old: 0,
                rate: NO_BAUD
            }
        ));
        for baud in [115_200, 921_600] {
            let mut host = open_host(sim.device_path(), baud);
            host.write_all(&sync()).unwrap();
            let out = read_until(&host, b"", Duration::from_millis(150));
            assert!(!contains(&out, &[0xC0, 1, 8]), "{baud}: {out:?}");
        }
        assert!(sim.wrong_baud_bytes() > 0);
        sim.pins().set(Level::Low, Level::High);
        wait_for("the reset", || sim.baud() == 115_200);
    }

    #[test]
    fn flasher_stub_sets_the_new_rate_whatever_old_rate_it_is_told() {
        let (sim, mut host) = download_sim(SimConfig::default());
        upload_stub(&mut host, loader::FLASHER_STUB_TEXT);
        assert!(has_event(
            &sim,
            &SimEventKind::Stub {
                kind: StubKind::Flasher,
                by: StubDecidedBy::Address
            }
        ));
        host.write_all(&change_baud(921_600, 12_345)).unwrap();
        let out = read_until(
            &host,
            &stub_ok(loader::op::CHANGE_BAUDRATE),
            Duration::from_secs(1),
        );
        assert!(
            contains(&out, &stub_ok(loader::op::CHANGE_BAUDRATE)),
            "{out:?}"
        );
        wait_for("the new rate", || sim.baud() == 921_600);
        let asked = event_time(
            &sim,
            &SimEventKind::ChangeBaudrate {
                stub: Some(StubKind::Flasher),
                new: 921_600,
                old: 12_345,
                rate: 921_600,
            },
        );
        let switched = event_time(
            &sim,
            &SimEventKind::Baud {
                from: 115_200,
                to: 921_600,
            },
        );
        assert!(switched >= asked + 5_000, "{asked} -> {switched}");
        let mut host = open_host(sim.device_path(), 921_600);
        host.write_all(&sync()).unwrap();
        let out = read_until(&host, &stub_ok(8), Duration::from_secs(1));
        assert!(contains(&out, &stub_ok(8)), "{out:?}");
    }

    #[test]
    fn a_forced_stub_kind_overrides_the_upload_address() {
        let (sim, mut host) = download_sim(SimConfig {
            stub: Some(StubKind::Flasher),
            ..SimConfig::default()
        });
        upload_stub(&mut host, loader::LEGACY_STUB_TEXT);
        assert!(has_event(
            &sim,
            &SimEventKind::Stub {
                kind: StubKind::Flasher,
                by: StubDecidedBy::Config
            }
        ));
        // So the old rate is ignored.
        host.write_all(&change_baud(460_800, 1)).unwrap();
        wait_for("the new rate", || sim.baud() == 460_800);
    }

    #[test]
    fn above_the_wiring_limit_everything_is_garbled_both_ways() {
        let dir = socket_dir("max-baud");
        // On a socket the host is taken to follow the chip's rate, so only
        // the wiring can spoil the bytes.
        let (sim, mut host) = sim_on_socket(
            &dir,
            SimConfig {
                power_on: BootMode::Download,
                max_baud: Some(460_800),
                ..SimConfig::default()
            },
        );
        read_until(&host, b"waiting for download\r\n", Duration::from_secs(2));
        // A SYNC right behind the switch arrives at 115200, but its replies
        // leave at 921600: too fast for the wiring.
        let mut both = change_baud(921_600, 0);
        both.extend_from_slice(&sync());
        host.write_all(&both).unwrap();
        let out = read_until(&host, b"", Duration::from_millis(300));
        assert!(
            contains(&out, &[0xC0, 1, 0x0F, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xC0]),
            "the reply at 115200 passes: {out:?}"
        );
        assert!(!contains(&out, &[0xC0, 1, 8]), "{out:?}");
        assert!(sim.over_max_baud_tx_bytes() > 0);
        assert!(sim.events().iter().any(|e| matches!(
            e.kind,
            SimEventKind::OverMaxBaud {
                dir: Direction::Tx,
                chip_baud: 921_600,
                host_baud: 921_600,
                max_baud: 460_800,
                ..
            }
        )));
        // What the host sends at 921600 arrives garbled too.
        host.write_all(&sync()).unwrap();
        let out = read_until(&host, b"", Duration::from_millis(300));
        assert!(!contains(&out, &[0xC0, 1, 8]), "{out:?}");
        assert_eq!(sim.over_max_baud_bytes(), sync().len() as u64);
        assert!(sim.events().iter().any(|e| matches!(
            e.kind,
            SimEventKind::OverMaxBaud {
                dir: Direction::Rx,
                chip_baud: 921_600,
                host_baud: 921_600,
                max_baud: 460_800,
                ..
            }
        )));
        assert!(
            !sim.events()
                .iter()
                .any(|e| matches!(e.kind, SimEventKind::Command { baud: 921_600, .. })),
            "no command got through at 921600"
        );
        assert_eq!(sim.wrong_baud_bytes(), 0, "the rates agreed");
        drop(sim);
        let _ = std::fs::remove_dir_all(&dir);

        // At the limit itself the wiring is fine.
        let dir = socket_dir("max-baud-ok");
        let (sim, mut host) = sim_on_socket(
            &dir,
            SimConfig {
                power_on: BootMode::Download,
                max_baud: Some(921_600),
                ..SimConfig::default()
            },
        );
        read_until(&host, b"waiting for download\r\n", Duration::from_secs(2));
        host.write_all(&change_baud(921_600, 0)).unwrap();
        read_until(&host, &[0xC0, 1, 0x0F], Duration::from_secs(1));
        host.write_all(&sync()).unwrap();
        let out = read_until(&host, &[0x55, 0, 0, 0, 0, 0xC0], Duration::from_secs(1));
        assert!(contains(&out, &[0xC0, 1, 8, 4, 0]), "{out:?}");
        assert_eq!(sim.over_max_baud_bytes() + sim.over_max_baud_tx_bytes(), 0);
        drop(sim);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_wiring_limit_garbles_a_pty_host_at_the_chips_rate() {
        let (sim, mut host) = download_sim(SimConfig {
            max_baud: Some(230_400),
            ..SimConfig::default()
        });
        host.write_all(&change_baud(460_800, 0)).unwrap();
        read_until(&host, &[0xC0, 1, 0x0F], Duration::from_secs(1));
        wait_for("the new rate", || sim.baud() == 460_800);
        let mut host = open_host(sim.device_path(), 460_800);
        host.write_all(&sync()).unwrap();
        let out = read_until(&host, b"", Duration::from_millis(200));
        assert!(!contains(&out, &[0xC0, 1, 8]), "{out:?}");
        assert_eq!(sim.over_max_baud_bytes(), sync().len() as u64);
        assert_eq!(sim.wrong_baud_bytes(), 0);
    }

    #[test]
    fn every_command_is_recorded_with_the_rate_it_came_at() {
        let (sim, mut host) = download_sim(SimConfig::default());
        host.write_all(&command(loader::op::READ_REG, &words(&[0x4000_1000]), 0))
            .unwrap();
        read_until(&host, &[0xC0, 1, 0x0A], Duration::from_secs(1));
        host.write_all(&change_baud(230_400, 0)).unwrap();
        read_until(&host, &[0xC0, 1, 0x0F], Duration::from_secs(1));
        let mut host = open_host(sim.device_path(), 230_400);
        host.write_all(&sync()).unwrap();
        read_until(&host, &[0x55, 0, 0, 0, 0, 0xC0], Duration::from_secs(1));
        let commands: Vec<SimEventKind> = sim
            .events()
            .into_iter()
            .filter(|e| matches!(e.kind, SimEventKind::Command { .. }))
            .map(|e| e.kind)
            .collect();
        assert_eq!(
            commands,
            [
                SimEventKind::Command {
                    op: loader::op::READ_REG,
                    len: 4,
                    baud: 115_200
                },
                SimEventKind::Command {
                    op: loader::op::CHANGE_BAUDRATE,
                    len: 8,
                    baud: 115_200
                },
                SimEventKind::Command {
                    op: loader::op::SYNC,
                    len: 36,
                    baud: 230_400
                },
            ]
        );
    }

    #[test]
    fn new_events_as_json() {
        let json = |kind| SimEvent { t_us: 7, kind }.to_json();
        assert_eq!(
            json(SimEventKind::Command {
                op: 0x11,
                len: 16_400,
                baud: 921_600
            }),
            "{\"t_us\":7,\"event\":\"command\",\"op\":\"0x11\",\"name\":\"FLASH_DEFL_DATA\",\
             \"len\":16400,\"baud\":921600}"
        );
        assert_eq!(
            json(SimEventKind::Stub {
                kind: StubKind::Flasher,
                by: StubDecidedBy::Address
            }),
            "{\"t_us\":7,\"event\":\"stub\",\"kind\":\"flasher\",\"by\":\"address\"}"
        );
        assert_eq!(
            json(SimEventKind::ChangeBaudrate {
                stub: Some(StubKind::Legacy),
                new: 921_600,
                old: 0,
                rate: NO_BAUD
            }),
            "{\"t_us\":7,\"event\":\"change_baudrate\",\"loader\":\"legacy\",\"new\":921600,\
             \"old\":0,\"rate\":0}"
        );
        assert_eq!(
            json(SimEventKind::ChangeBaudrate {
                stub: None,
                new: 460_800,
                old: 0,
                rate: 460_800
            }),
            "{\"t_us\":7,\"event\":\"change_baudrate\",\"loader\":\"rom\",\"new\":460800,\
             \"old\":0,\"rate\":460800}"
        );
        assert_eq!(
            json(SimEventKind::OverMaxBaud {
                dir: Direction::Tx,
                chip_baud: 921_600,
                host_baud: 921_600,
                max_baud: 460_800,
                bytes: 12
            }),
            "{\"t_us\":7,\"event\":\"over_max_baud\",\"dir\":\"tx\",\"chip_baud\":921600,\
             \"host_baud\":921600,\"max_baud\":460800,\"bytes\":12}"
        );
        assert_eq!(
            json(SimEventKind::WrongBaud {
                dir: Direction::Rx,
                chip_baud: 115_200,
                host_baud: 9_600,
                bytes: 3
            }),
            "{\"t_us\":7,\"event\":\"wrong_baud\",\"dir\":\"rx\",\"chip_baud\":115200,\
             \"host_baud\":9600,\"bytes\":3}"
        );
    }

    #[test]
    fn app_boots_logs_every_second_and_echoes_lines() {
        let sim = Esp32Sim::start(SimConfig::default()).unwrap();
        let mut host = open_host(sim.device_path(), 115_200);
        wait_mode(&sim, ChipMode::App);
        let out = read_until(&host, b"uptime 1 s\r\n", Duration::from_secs(3));
        assert!(
            contains(&out, b"boot:0x13 (SPI_FAST_FLASH_BOOT)"),
            "{out:?}"
        );
        assert!(contains(
            &out,
            b"I (1260) app: hello from the virtual ESP32, uptime 1 s\r\n"
        ));
        host.write_all(b"ping 42\r\n").unwrap();
        let out = read_until(&host, b"got: ping 42\r\n", Duration::from_secs(2));
        assert!(contains(&out, b"app: got: ping 42\r\n"), "{out:?}");
        assert_eq!(sim.wrong_baud_bytes(), 0);
    }

    #[test]
    fn classic_reset_into_download_mode_with_timing() {
        let sim = Esp32Sim::start(SimConfig::default()).unwrap();
        let host = open_host(sim.device_path(), 115_200);
        wait_mode(&sim, ChipMode::App);
        let pins = sim.pins();
        pins.set(Level::Low, Level::High);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(sim.mode(), ChipMode::Reset);
        read_until(&host, b"", Duration::from_millis(20));
        pins.set(Level::High, Level::Low);
        std::thread::sleep(Duration::from_millis(50));
        pins.set(Level::High, Level::High);
        wait_mode(&sim, ChipMode::Download);
        let out = read_until(&host, b"waiting for download\r\n", Duration::from_secs(1));
        assert!(
            contains(
                &out,
                b"rst:0x1 (POWERON_RESET),boot:0x3 (DOWNLOAD_BOOT(UART0/UART1/SDIO_REI_REO_V2))\r\nwaiting for download\r\n"
            ),
            "{out:?}"
        );
        let en_low = event_time(&sim, &SimEventKind::En(Level::Low));
        let en_high = event_time(&sim, &SimEventKind::En(Level::High));
        let io0_low = event_time(&sim, &SimEventKind::Io0(Level::Low));
        let io0_high = event_time(&sim, &SimEventKind::Io0(Level::High));
        let download = event_time(&sim, &SimEventKind::Mode(ChipMode::Download));
        assert!(en_high - en_low >= 100_000);
        assert_eq!(io0_low, en_high, "both lines change in one set()");
        assert!(io0_high - en_high >= 50_000);
        assert!(
            download >= en_high + 3_000,
            "the ROM takes its start-up time"
        );
        assert!(download < en_high + 200_000);
        // A SYNC is answered now.
        let mut host = host;
        host.write_all(&sync()).unwrap();
        let out = read_until(
            &host,
            &[0x20, 0x55, 0, 0, 0, 0, 0xC0],
            Duration::from_secs(1),
        );
        assert!(contains(&out, &[0xC0, 1, 8, 4, 0]), "{out:?}");
    }

    #[test]
    fn en_low_holds_the_chip_silent_and_deaf() {
        let sim = Esp32Sim::start(SimConfig {
            power_on: BootMode::Download,
            ..SimConfig::default()
        })
        .unwrap();
        let mut host = open_host(sim.device_path(), 115_200);
        wait_mode(&sim, ChipMode::Download);
        read_until(&host, b"waiting for download\r\n", Duration::from_secs(1));
        sim.pins().set(Level::Low, Level::Low);
        std::thread::sleep(Duration::from_millis(20));
        host.write_all(&sync()).unwrap();
        let out = read_until(&host, b"", Duration::from_millis(200));
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(sim.mode(), ChipMode::Reset);
    }

    #[test]
    fn baud_change_is_followed_and_every_reset_restores_115200() {
        let sim = Esp32Sim::start(SimConfig {
            power_on: BootMode::Download,
            ..SimConfig::default()
        })
        .unwrap();
        let mut host = open_host(sim.device_path(), 115_200);
        wait_mode(&sim, ChipMode::Download);
        host.write_all(&command(
            loader::op::CHANGE_BAUDRATE,
            &words(&[921_600, 0]),
            0,
        ))
        .unwrap();
        // The reply comes at the old rate.
        let out = read_until(&host, &[0xC0, 1, 0x0F], Duration::from_secs(1));
        assert!(contains(
            &out,
            &[0xC0, 1, 0x0F, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xC0]
        ));
        assert_eq!(sim.baud(), 921_600);
        // Still at 115200, the host is now the one at the wrong rate.
        host.write_all(&sync()).unwrap();
        let out = read_until(&host, b"", Duration::from_millis(150));
        assert!(!contains(&out, &[0xC0, 1, 8]), "{out:?}");
        assert!(sim.wrong_baud_bytes() > 0);
        let host = open_host(sim.device_path(), 921_600);
        let mut host = host;
        host.write_all(&sync()).unwrap();
        let out = read_until(&host, &[0x55, 0, 0, 0, 0, 0xC0], Duration::from_secs(1));
        assert!(contains(&out, &[0xC0, 1, 8, 4, 0]), "{out:?}");
        // An EN pulse resets the UART to 115200.
        sim.pins().set(Level::Low, Level::High);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(sim.baud(), 115_200);
        let events = sim.events();
        assert!(events.iter().any(|e| e.kind
            == SimEventKind::Baud {
                from: 115_200,
                to: 921_600
            }));
        assert!(events.iter().any(|e| e.kind
            == SimEventKind::Baud {
                from: 921_600,
                to: 115_200
            }));
    }

    #[test]
    fn output_at_the_wrong_rate_arrives_as_garbage() {
        let sim = Esp32Sim::start(SimConfig::default()).unwrap();
        let host = open_host(sim.device_path(), 9_600);
        let out = read_until(&host, b"", Duration::from_millis(400));
        assert!(!contains(&out, b"ets Jun"), "{out:?}");
        assert!(sim.wrong_baud_tx_bytes() > 0);
        assert!(sim.events().iter().any(|e| matches!(
            e.kind,
            SimEventKind::WrongBaud {
                dir: Direction::Tx,
                chip_baud: 115_200,
                host_baud: 9_600,
                ..
            }
        )));
    }

    #[test]
    fn pacing_makes_bytes_take_their_wire_time() {
        let sim = Esp32Sim::start(SimConfig {
            power_on: BootMode::Download,
            pace: true,
            ..SimConfig::default()
        })
        .unwrap();
        let mut host = open_host(sim.device_path(), 115_200);
        wait_mode(&sim, ChipMode::Download);
        read_until(&host, b"waiting for download\r\n", Duration::from_secs(1));
        assert_sync_takes_its_wire_time(&mut host);
    }

    #[test]
    fn event_log_link_and_flash_file() {
        let dir = std::env::temp_dir().join(format!("esp-sim-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("events.jsonl");
        let link = dir.join("ttyESP");
        let flash_file = dir.join("flash.bin");
        let _ = std::fs::remove_file(&log);
        let mut seed = vec![0xFFu8; 0x2000];
        seed[0x1000..0x1004].copy_from_slice(b"seed");
        std::fs::write(&flash_file, &seed).unwrap();
        {
            let sim = Esp32Sim::start(SimConfig {
                power_on: BootMode::Download,
                flash_size: 0x10000,
                event_log: Some(log.clone()),
                link: Some(link.clone()),
                flash_file: Some(flash_file.clone()),
                ..SimConfig::default()
            })
            .unwrap();
            assert_eq!(sim.device_path(), link);
            assert_eq!(std::fs::read_link(&link).unwrap(), sim.slave_path());
            assert_eq!(&sim.flash()[0x1000..0x1004], b"seed");
            assert_eq!(sim.flash().len(), 0x10000);
            let mut host = open_host(&link, 115_200);
            wait_mode(&sim, ChipMode::Download);
            // Write one ROM block at 0x2000.
            host.write_all(&command(
                loader::op::FLASH_BEGIN,
                &words(&[0x400, 1, 0x400, 0x2000]),
                0,
            ))
            .unwrap();
            read_until(&host, &[0xC0, 1, 2], Duration::from_secs(1));
            let block = [0x42u8; 0x400];
            let mut d = words(&[0x400, 0, 0, 0]);
            d.extend_from_slice(&block);
            let chk = u32::from(loader::checksum(&block));
            host.write_all(&command(loader::op::FLASH_DATA, &d, chk))
                .unwrap();
            let out = read_until(&host, &[0xC0, 1, 3, 4, 0], Duration::from_secs(1));
            assert!(contains(
                &out,
                &[0xC0, 1, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xC0]
            ));
            sim.pins().set(Level::Low, Level::High);
            sim.pins().set(Level::High, Level::High);
        }
        assert!(
            std::fs::symlink_metadata(&link).is_err(),
            "link removed on drop"
        );
        let saved = std::fs::read(&flash_file).unwrap();
        assert_eq!(saved.len(), 0x10000);
        assert_eq!(&saved[0x1000..0x1004], b"seed");
        assert!(saved[0x2000..0x2400].iter().all(|&b| b == 0x42));
        let log = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = log.lines().collect();
        assert!(
            lines
                .iter()
                .all(|l| l.starts_with("{\"t_us\":") && l.ends_with('}'))
        );
        assert!(
            lines
                .iter()
                .any(|l| l.ends_with("\"event\":\"en\",\"level\":\"low\"}"))
        );
        assert!(
            lines
                .iter()
                .any(|l| l.ends_with("\"event\":\"mode\",\"mode\":\"download\"}"))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    /// A fresh directory for sockets; short, since a socket path must fit in 108 bytes.
    fn socket_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("esp-sim-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Plays qemu's `-chardev socket,server=on`: listens, lets the sim connect.
    fn sim_on_socket(dir: &Path, cfg: SimConfig) -> (Esp32Sim, std::os::unix::net::UnixStream) {
        let path = dir.join("ttyS1.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let sim = Esp32Sim::start(SimConfig {
            connect_unix: Some(path.clone()),
            ..cfg
        })
        .unwrap();
        assert_eq!(sim.device_path(), path);
        let (stream, _) = listener.accept().unwrap();
        stream.set_nonblocking(true).unwrap();
        (sim, stream)
    }

    #[test]
    fn on_a_unix_socket_the_loader_runs_and_the_host_is_assumed_at_the_chips_rate() {
        let dir = socket_dir("unix-loader");
        let (sim, mut host) = sim_on_socket(
            &dir,
            SimConfig {
                power_on: BootMode::Download,
                ..SimConfig::default()
            },
        );
        let out = read_until(&host, b"waiting for download\r\n", Duration::from_secs(2));
        assert!(contains(&out, b"waiting for download\r\n"), "{out:?}");
        host.write_all(&sync()).unwrap();
        let out = read_until(&host, &[0x55, 0, 0, 0, 0, 0xC0], Duration::from_secs(1));
        assert!(contains(&out, &[0xC0, 1, 8, 4, 0]), "{out:?}");
        // A baud change: nothing tells the chip the host's new rate, so it
        // assumes the host followed, and the next frame is understood.
        host.write_all(&command(
            loader::op::CHANGE_BAUDRATE,
            &words(&[921_600, 0]),
            0,
        ))
        .unwrap();
        let out = read_until(&host, &[0xC0, 1, 0x0F], Duration::from_secs(1));
        assert!(contains(&out, &[0xC0, 1, 0x0F]), "{out:?}");
        assert_eq!(sim.baud(), 921_600);
        host.write_all(&sync()).unwrap();
        let out = read_until(&host, &[0x55, 0, 0, 0, 0, 0xC0], Duration::from_secs(1));
        assert!(contains(&out, &[0xC0, 1, 8, 4, 0]), "{out:?}");
        assert_eq!(sim.wrong_baud_bytes(), 0);
        assert_eq!(sim.wrong_baud_tx_bytes(), 0);
        drop(sim);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn on_a_unix_socket_pacing_still_takes_the_wire_time() {
        let dir = socket_dir("unix-pace");
        let (sim, mut host) = sim_on_socket(
            &dir,
            SimConfig {
                power_on: BootMode::Download,
                pace: true,
                ..SimConfig::default()
            },
        );
        wait_mode(&sim, ChipMode::Download);
        read_until(&host, b"waiting for download\r\n", Duration::from_secs(1));
        assert_sync_takes_its_wire_time(&mut host);
        drop(sim);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_socket_or_a_link_with_it_is_refused() {
        let dir = socket_dir("unix-refused");
        let Err(e) = Esp32Sim::start(SimConfig {
            connect_unix: Some(dir.join("nobody")),
            ..SimConfig::default()
        }) else {
            panic!("started on a socket nobody listens on");
        };
        assert!(e.to_string().contains("nobody"), "{e}");
        let Err(e) = Esp32Sim::start(SimConfig {
            connect_unix: Some(dir.join("nobody")),
            link: Some(dir.join("link")),
            ..SimConfig::default()
        }) else {
            panic!("started with a link to no pty");
        };
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Sends one request line to the control socket and returns the answer.
    fn ask(conn: &mut std::os::unix::net::UnixStream, line: &str) -> String {
        use std::io::BufRead as _;
        conn.write_all(line.as_bytes()).unwrap();
        let mut answer = String::new();
        std::io::BufReader::new(&*conn)
            .read_line(&mut answer)
            .unwrap();
        answer
    }

    #[test]
    fn the_control_socket_sets_both_straps_at_once() {
        let dir = socket_dir("control");
        let path = dir.join("control.sock");
        // A socket left over from a run that died is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let sim = Esp32Sim::start(SimConfig {
            control_unix: Some(path.clone()),
            ..SimConfig::default()
        })
        .unwrap();
        let host = open_host(sim.device_path(), 115_200);
        wait_mode(&sim, ChipMode::App);
        let mut conn = std::os::unix::net::UnixStream::connect(&path).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        assert_eq!(ask(&mut conn, "en=low io0=low\n"), "ok\n");
        assert_eq!(sim.pins().levels(), (Level::Low, Level::Low));
        // The chip thread acts on the edge a moment after the answer.
        wait_mode(&sim, ChipMode::Reset);
        assert_eq!(
            event_time(&sim, &SimEventKind::En(Level::Low)),
            event_time(&sim, &SimEventKind::Io0(Level::Low)),
            "one request, one instant"
        );
        // EN alone: IO0 stays low, so the chip latches download mode.
        assert_eq!(ask(&mut conn, "en=high\r\n"), "ok\n");
        wait_mode(&sim, ChipMode::Download);
        let out = read_until(&host, b"waiting for download\r\n", Duration::from_secs(1));
        assert!(contains(&out, b"waiting for download"), "{out:?}");
        assert_eq!(ask(&mut conn, "get\n"), "en=high io0=low\n");
        let answer = ask(&mut conn, "reset please\n");
        assert!(answer.starts_with("error: "), "{answer}");
        // A second client at the same time is served too.
        let mut other = std::os::unix::net::UnixStream::connect(&path).unwrap();
        other
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        assert_eq!(ask(&mut other, "io0=1\n"), "ok\n");
        assert_eq!(ask(&mut conn, "get\n"), "en=high io0=high\n");
        drop(sim);
        assert!(
            std::fs::symlink_metadata(&path).is_err(),
            "socket removed on drop"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_control_socket_never_replaces_a_file_that_is_not_a_socket() {
        let dir = socket_dir("control-file");
        let path = dir.join("precious");
        std::fs::write(&path, b"data").unwrap();
        let Err(e) = Esp32Sim::start(SimConfig {
            control_unix: Some(path.clone()),
            ..SimConfig::default()
        }) else {
            panic!("replaced a regular file");
        };
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
