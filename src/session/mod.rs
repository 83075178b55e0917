//! One client session: the pump between the client's TCP connection and the UART.
//!
//! The session owns the ordering guarantee. Everything the client sends is parsed into one
//! queue of data and port commands, applied strictly in that order: a command runs only after
//! every byte before it was handed to the UART, and a command that changes the line settings
//! first waits for those bytes to leave the UART (tcdrain on the blocking pool, while the
//! other direction keeps flowing). Replies go back as soon as the command was applied.
//!
//! Memory is bounded in both directions: the client is read only when the previous input was
//! applied and its replies are not piling up; the UART is read only while the data waiting for
//! the client is below [`HIGH_WATER`]. A client that stops reading therefore pauses reading of
//! the UART (the kernel buffers a little more, then the device's own flow control or overrun
//! takes over); a client that reads loses nothing.

mod port;
mod view;

pub use port::ComPort;
pub use view::ClientView;

use crate::log_limit::limited;
use crate::protocol::esp_raw::EspRaw;
use crate::protocol::{Engine, Event, PortCommand};
use crate::uart::{Drain, Uart};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::fanout::Fanout;
use crate::seat::Heard;

/// Most escaped device data held for a slow client before the UART is no longer read.
pub const HIGH_WATER: usize = 64 * 1024;
const READ_CHUNK: usize = 16 * 1024;
/// How often the modem input lines are sampled for NOTIFY-MODEMSTATE.
const MODEM_POLL: Duration = Duration::from_millis(200);
/// How long a closing session may take to hand its last bytes over (to the UART, then to
/// the client) before it gives up on them.
const LINGER: Duration = Duration::from_secs(2);
/// How long a client that closed its sending side (`socat -t 2 - TCP:... < file`) still gets
/// the device's output. A client that closed altogether is noticed sooner on the RFC 2217
/// port (a telnet NOP draws its reset); esptool on the raw port never half-closes.
pub const HALF_CLOSE_LINGER: Duration = Duration::from_secs(3);
/// How often a client whose input is not being read (the device does not take it) is
/// checked for having gone: a reset, a keepalive timeout or a close is seen within this.
const LIVENESS_CHECK: Duration = Duration::from_secs(1);

/// Why a session was asked to stop from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    /// The service is shutting down.
    Shutdown,
    /// Another client writes from now on; this one goes back to watching.
    HandOver,
    /// The board's serial device failed under another client.
    DeviceGone,
}

/// Why a session ended.
#[derive(Debug)]
pub enum EndReason {
    ClientClosed,
    /// The client closed its sending side and took the device's output for
    /// [`HALF_CLOSE_LINGER`].
    HalfClosed,
    ClientError(io::Error),
    DeviceGone(io::Error),
    Stopped(StopRequest),
    /// The raw port's exchange with the chip failed; the text says why and the fix.
    Aborted(String),
    /// The client opened a telnet subnegotiation and did not finish it in time.
    TelnetStalled,
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndReason::ClientClosed => write!(f, "client disconnected"),
            EndReason::HalfClosed => write!(
                f,
                "client closed its sending side; it had the device's output for {} s more",
                HALF_CLOSE_LINGER.as_secs()
            ),
            // ETIMEDOUT on a socket with keepalive and a user timeout: the peer vanished
            // without closing (unplugged, Wi-Fi lost). Said plainly, as that is the usual case.
            EndReason::ClientError(e) if e.kind() == io::ErrorKind::TimedOut => write!(
                f,
                "client stopped answering: no acknowledgement within the keepalive time ({e}); it vanished without closing the connection"
            ),
            EndReason::ClientError(e) => write!(f, "client connection failed: {e}"),
            EndReason::DeviceGone(e) => write!(f, "serial device failed or vanished: {e}"),
            EndReason::Stopped(StopRequest::Shutdown) => write!(f, "service shutting down"),
            EndReason::Stopped(StopRequest::HandOver) => {
                write!(f, "another client writes now; this one watches")
            }
            EndReason::Stopped(StopRequest::DeviceGone) => {
                write!(f, "serial device failed or vanished")
            }
            EndReason::TelnetStalled => write!(
                f,
                "client stalled in a telnet subnegotiation for {} s (IAC SB without IAC SE): a broken or hostile client",
                crate::protocol::telnet::NEGOTIATION_TIME.as_secs()
            ),
            EndReason::Aborted(why) => write!(f, "{why}"),
        }
    }
}

/// What the session did, for the closing log line.
#[derive(Debug)]
pub struct Report {
    pub reason: EndReason,
    pub to_device: u64,
    pub to_client: u64,
    pub duration: Duration,
    pub final_baud: u32,
    pub ignored_input: u64,
    /// Times output to the device was discarded because flow control held it.
    pub discarded: u64,
}

pub use crate::control::SharedControl;

/// How the client's bytes are framed, by the port it connected to.
pub enum Framing {
    /// Telnet with RFC 2217 COM-PORT control (`rfc2217://`).
    Rfc2217(Engine),
    /// The ESP-aware raw port (`socket://`): bytes pass unchanged, but for the bridge's own
    /// flash-rate exchange (`flash_baud`).
    /// Boxed: it carries the flash-rate exchange's state, four times the codec's size.
    EspRaw(Box<EspRaw>),
}

impl Framing {
    /// The raw port, starting at `line` baud; `flash_baud` as configured for the board;
    /// `can_reset`: the chip can be put into its bootloader from here.
    pub fn esp_raw(line: u32, flash_baud: Option<u32>, can_reset: bool) -> Self {
        Framing::EspRaw(Box::new(EspRaw::new(line, flash_baud, can_reset)))
    }
}

/// Static facts a session needs.
pub struct SessionInfo {
    pub id: u64,
    pub peer: SocketAddr,
    pub device: String,
}

pub struct Session<U: Uart> {
    info: SessionInfo,
    tcp: TcpStream,
    port: ComPort<U>,
    framing: Framing,
    /// Parsed client input not yet applied; the front item is in progress.
    inbound: VecDeque<Event>,
    /// How much of the front data item was already written to the UART.
    inbound_offset: usize,
    /// Bytes committed for the client (replies and data, in order), and how far sent.
    out: Vec<u8>,
    out_pos: usize,
    /// Escaped device data not yet committed to `out`; dropped by PURGE rx.
    pending: Vec<u8>,
    /// FLOWCONTROL-SUSPEND from the client: no device data is sent until RESUME.
    suspended: bool,
    /// Data was written to the UART since the last drain.
    tx_dirty: bool,
    drain: Option<Drain>,
    modem_timer: tokio::time::Interval,
    liveness: tokio::time::Interval,
    client_eof: bool,
    /// Runs from the client's half-close; the session ends when it fires.
    linger: Option<Pin<Box<tokio::time::Sleep>>>,
    /// An [`Event::Settle`] in progress: nothing more goes to the device until it fires.
    settle: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The raw port's next deadline ([`EspRaw::deadline`]) and its timer.
    raw_timer: Option<(Instant, Pin<Box<tokio::time::Sleep>>)>,
    /// The watchers of this board get every byte the device sends.
    fanout: Fanout,
    /// When the client last sent anything (a writer silent long enough may be replaced).
    heard: Heard,
    /// Since when the client has been inside a telnet subnegotiation.
    subnegotiation_since: Option<Instant>,
    /// Times a drain discarded output because flow control held it.
    discarded: u64,
    to_device: u64,
    to_client: u64,
    ignored: u64,
    events: Vec<Event>,
    net_buf: Vec<u8>,
    dev_buf: Vec<u8>,
}

/// Where a session takes over from the connection's watching: what was not yet sent to the
/// client, and the client's input from its claim on.
pub struct Start {
    pub out: Vec<u8>,
    pub input: Claim,
}

/// The client input that claimed the board.
pub enum Claim {
    /// RFC 2217: parsed already (the engine is the watcher's).
    Events(Vec<Event>),
    /// The raw port: bytes, framed by the session.
    Bytes(Vec<u8>),
}

/// What a session leaves when it ends: the connection (for watching again, after a hand-over)
/// and the device, unless it failed.
pub struct Parts<U> {
    pub tcp: TcpStream,
    pub framing: Framing,
    pub out: Vec<u8>,
    pub uart: Option<U>,
}

impl<U: Uart> Session<U> {
    pub fn new(
        info: SessionInfo,
        tcp: TcpStream,
        port: ComPort<U>,
        framing: Framing,
        fanout: Fanout,
        heard: Heard,
    ) -> Self {
        let mut modem_timer = tokio::time::interval(MODEM_POLL);
        modem_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut liveness = tokio::time::interval(LIVENESS_CHECK);
        liveness.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Session {
            info,
            tcp,
            port,
            framing,
            inbound: VecDeque::new(),
            inbound_offset: 0,
            out: Vec::new(),
            out_pos: 0,
            pending: Vec::new(),
            suspended: false,
            tx_dirty: false,
            drain: None,
            modem_timer,
            liveness,
            client_eof: false,
            linger: None,
            settle: None,
            raw_timer: None,
            fanout,
            heard,
            subnegotiation_since: None,
            discarded: 0,
            to_device: 0,
            to_client: 0,
            ignored: 0,
            events: Vec::new(),
            net_buf: vec![0; READ_CHUNK],
            dev_buf: vec![0; READ_CHUNK],
        }
    }

    /// Serves the client until it leaves, the device fails, or `stop` says so; starts from
    /// where the connection's watching left off.
    pub async fn run(
        mut self,
        start: Start,
        mut stop: watch::Receiver<Option<StopRequest>>,
    ) -> (Report, Parts<U>) {
        let started = Instant::now();
        self.out = start.out;
        match start.input {
            Claim::Events(events) => self.inbound.extend(events),
            Claim::Bytes(bytes) => self.take_client_input(&bytes),
        }
        let reason = loop {
            if let Some(request) = *stop.borrow_and_update() {
                break EndReason::Stopped(request);
            }
            tokio::select! {
                end = poll_fn(|cx| self.poll_pump(cx)) => break end,
                changed = stop.changed() => {
                    if changed.is_err() {
                        break EndReason::Stopped(StopRequest::Shutdown);
                    }
                }
            }
        };
        self.heard.set_leaving(true);
        let final_baud = self.port.baud();
        self.finish(&reason).await;
        let report = Report {
            to_device: self.to_device,
            to_client: self.to_client,
            duration: started.elapsed(),
            final_baud,
            ignored_input: self.ignored,
            discarded: self.discarded,
            reason,
        };
        let device_ok = !matches!(
            report.reason,
            EndReason::DeviceGone(_) | EndReason::Stopped(StopRequest::DeviceGone)
        );
        let mut out = self.out;
        out.drain(..self.out_pos.min(out.len()));
        let parts = Parts {
            tcp: self.tcp,
            framing: self.framing,
            out,
            uart: device_ok.then(|| self.port.into_uart()),
        };
        (report, parts)
    }

    /// Hands over what can still be handed over and tells the client why it ends. (The bridge
    /// releases the control lines once the session is over.)
    async fn finish(&mut self, reason: &EndReason) {
        // A client that sent IAC SB and never IAC SE is broken or hostile (a slowloris);
        // the operator looking at a stuck port wants to know which it was.
        if let Framing::Rfc2217(engine) = &self.framing
            && engine.in_subnegotiation()
        {
            limited!(
                warn,
                "clients gone mid-subnegotiation",
                session = self.info.id,
                peer = %self.info.peer,
                "client left in the middle of a subnegotiation (IAC SB without IAC SE): a broken or hostile client"
            );
        }
        let device_ok = !matches!(
            reason,
            EndReason::DeviceGone(_) | EndReason::Stopped(StopRequest::DeviceGone)
        );
        if device_ok {
            // Input the client sent before it left (or before the stop) still goes out.
            self.client_eof = true;
            let _ = tokio::time::timeout(LINGER, poll_fn(|cx| self.poll_inbound_only(cx))).await;
        }
        let notice = match reason {
            EndReason::DeviceGone(_) => Some(format!(
                "\r\n[esp-bridge] serial device {} failed or disappeared; closing. Reconnect when it is back.\r\n",
                self.info.device
            )),
            EndReason::Stopped(StopRequest::Shutdown) => {
                Some("\r\n[esp-bridge] service is shutting down; closing.\r\n".to_string())
            }
            EndReason::Stopped(StopRequest::HandOver) => Some(
                "\r\n[esp-bridge] another client writes to this board now (this one had been silent); this connection goes on watching.\r\n".to_string(),
            ),
            EndReason::Stopped(StopRequest::DeviceGone) => Some(format!(
                "\r\n[esp-bridge] serial device {} failed or disappeared; closing. Reconnect when it is back.\r\n",
                self.info.device
            )),
            EndReason::TelnetStalled => Some(format!("\r\n[esp-bridge] {reason}; closing.\r\n")),
            EndReason::Aborted(why) => Some(format!("\r\n[esp-bridge] {why}\r\n")),
            _ => None,
        };
        if let Some(text) = notice {
            self.out
                .extend_from_slice(&std::mem::take(&mut self.pending));
            Engine::encode_data(text.as_bytes(), &mut self.out);
        }
        if !matches!(reason, EndReason::ClientClosed | EndReason::ClientError(_)) {
            let _ = tokio::time::timeout(LINGER, poll_fn(|cx| self.poll_flush_client(cx))).await;
        }
        if device_ok {
            // What the client leaves behind on the port goes: BREAK, its flow control and
            // line settings; what is still queued leaves first, bounded.
            if self.port.restore().await {
                self.discarded = self.discarded.saturating_add(1);
            }
        }
    }

    /// One pass of the pump; returns when the session must end.
    fn poll_pump(&mut self, cx: &mut Context<'_>) -> Poll<EndReason> {
        // Bounded so that a firehose in one direction cannot starve the runtime.
        for _ in 0..64 {
            let mut progress = false;
            match self.poll_client_write(cx) {
                Ok(p) => progress |= p,
                Err(e) => return Poll::Ready(e),
            }
            match self.poll_inbound(cx) {
                Ok(p) => progress |= p,
                Err(e) => return Poll::Ready(e),
            }
            match self.poll_device_read(cx) {
                Ok(p) => progress |= p,
                Err(e) => return Poll::Ready(e),
            }
            match self.poll_client_read(cx) {
                Ok(p) => progress |= p,
                Err(e) => return Poll::Ready(e),
            }
            progress |= self.poll_raw_deadline(cx);
            self.poll_modem(cx);
            if let Err(e) = self.poll_liveness(cx) {
                return Poll::Ready(e);
            }
            if self.client_eof {
                if !self.may_half_close() && self.inbound.is_empty() {
                    return Poll::Ready(EndReason::ClientClosed);
                }
                let linger = self
                    .linger
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(HALF_CLOSE_LINGER)));
                if linger.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(EndReason::HalfClosed);
                }
            }
            if !progress {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Applies the remaining input (used while closing).
    fn poll_inbound_only(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match self.poll_inbound(cx) {
                Ok(true) => continue,
                Ok(false) if self.inbound.is_empty() && self.drain.is_none() => {
                    return Poll::Ready(());
                }
                Ok(false) => return Poll::Pending,
                Err(_) => return Poll::Ready(()),
            }
        }
    }

    fn poll_flush_client(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match self.poll_client_write(cx) {
                Ok(true) => continue,
                Ok(false) if self.out_pos >= self.out.len() => return Poll::Ready(()),
                Ok(false) => return Poll::Pending,
                Err(_) => return Poll::Ready(()),
            }
        }
    }

    fn poll_client_write(&mut self, cx: &mut Context<'_>) -> Result<bool, EndReason> {
        if self.out_pos >= self.out.len() {
            self.out.clear();
            self.out_pos = 0;
            if self.pending.is_empty() || self.suspended {
                return Ok(false);
            }
            std::mem::swap(&mut self.out, &mut self.pending);
        }
        match Pin::new(&mut self.tcp).poll_write(cx, &self.out[self.out_pos..]) {
            Poll::Ready(Ok(0)) => Err(EndReason::ClientClosed),
            Poll::Ready(Ok(n)) => {
                self.out_pos += n;
                self.to_client += n as u64;
                Ok(true)
            }
            Poll::Ready(Err(e)) => Err(client_error(e)),
            Poll::Pending => Ok(false),
        }
    }

    /// Backpressure: the client is read only when its last input was applied and it keeps
    /// up with what is sent to it.
    fn reading_client(&self) -> bool {
        let held = matches!(&self.framing, Framing::EspRaw(raw) if raw.holding());
        !self.client_eof
            && !held
            && self.inbound.is_empty()
            && self.out.len() - self.out_pos <= HIGH_WATER
    }

    fn poll_client_read(&mut self, cx: &mut Context<'_>) -> Result<bool, EndReason> {
        if !self.reading_client() {
            return Ok(false);
        }
        let mut buf = ReadBuf::new(&mut self.net_buf);
        match Pin::new(&mut self.tcp).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len();
                if n == 0 {
                    self.client_closed_sending();
                    return Ok(true);
                }
                self.heard.now();
                let input = std::mem::take(&mut self.net_buf);
                self.take_client_input(&input[..n]);
                self.net_buf = input;
                Ok(true)
            }
            Poll::Ready(Err(e)) => Err(client_error(e)),
            Poll::Pending => Ok(false),
        }
    }

    /// The client's bytes, framed into the queue of things to apply.
    fn take_client_input(&mut self, input: &[u8]) {
        match &mut self.framing {
            Framing::Rfc2217(engine) => {
                engine.receive(input, &mut self.events, &mut self.out);
                self.subnegotiation_since =
                    engine.subnegotiation_since(self.subnegotiation_since, Instant::now);
            }
            Framing::EspRaw(raw) => raw.from_client(input, &mut self.pending, &mut self.events),
        }
        self.inbound.extend(self.events.drain(..));
    }

    fn poll_device_read(&mut self, cx: &mut Context<'_>) -> Result<bool, EndReason> {
        if self.suspended || self.pending.len() >= HIGH_WATER {
            return Ok(false);
        }
        let mut buf = ReadBuf::new(&mut self.dev_buf);
        match Pin::new(self.port.uart()).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len();
                if n == 0 {
                    return Err(EndReason::DeviceGone(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "end of file",
                    )));
                }
                self.fanout.publish(&self.dev_buf[..n]);
                match &mut self.framing {
                    Framing::Rfc2217(_) => {
                        Engine::encode_data(&self.dev_buf[..n], &mut self.pending)
                    }
                    Framing::EspRaw(raw) => {
                        raw.from_device(
                            &self.dev_buf[..n],
                            Instant::now(),
                            &mut self.pending,
                            &mut self.events,
                        );
                        self.queue_first();
                    }
                }
                Ok(true)
            }
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
            Poll::Ready(Err(e)) => Err(EndReason::DeviceGone(e)),
            Poll::Pending => Ok(false),
        }
    }

    /// Puts the events the device's bytes (or a raw-port deadline) caused before any client
    /// input still queued, behind the data item being written: a baud switch answers a reply
    /// the client has not read yet, so nothing it sent can depend on it.
    fn queue_first(&mut self) {
        let at = usize::from(self.inbound_offset > 0).min(self.inbound.len());
        for event in self.events.drain(..).rev() {
            self.inbound.insert(at, event);
        }
    }

    /// The raw port's exchange with the chip waits for replies with a deadline.
    fn poll_raw_deadline(&mut self, cx: &mut Context<'_>) -> bool {
        let Framing::EspRaw(raw) = &mut self.framing else {
            return false;
        };
        let Some(due) = raw.deadline() else {
            self.raw_timer = None;
            return false;
        };
        if self.raw_timer.as_ref().is_none_or(|(at, _)| *at != due) {
            let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(due));
            self.raw_timer = Some((due, Box::pin(sleep)));
        }
        let Some((_, timer)) = &mut self.raw_timer else {
            return false;
        };
        if timer.as_mut().poll(cx).is_pending() {
            return false;
        }
        self.raw_timer = None;
        raw.on_deadline(Instant::now(), &mut self.pending, &mut self.events);
        self.queue_first();
        true
    }

    /// Applies queued client input in order. Returns whether anything was done.
    fn poll_inbound(&mut self, cx: &mut Context<'_>) -> Result<bool, EndReason> {
        if let Some(e) = self.port.take_failure() {
            return Err(EndReason::DeviceGone(e));
        }
        let mut progress = false;
        while let Some(front) = self.inbound.front() {
            match front {
                Event::Data(data) => {
                    let rest = &data[self.inbound_offset..];
                    match Pin::new(self.port.uart()).poll_write(cx, rest) {
                        Poll::Ready(Ok(n)) => {
                            self.to_device += n as u64;
                            self.tx_dirty = true;
                            progress = true;
                            if n >= rest.len() {
                                self.inbound.pop_front();
                                self.inbound_offset = 0;
                            } else {
                                self.inbound_offset += n;
                            }
                        }
                        Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                        Poll::Ready(Err(e)) => return Err(EndReason::DeviceGone(e)),
                        Poll::Pending => return Ok(progress),
                    }
                }
                Event::Port(_) | Event::SwitchBaud(_) => {
                    let needs_drain = match front {
                        Event::Port(cmd) => self.port.needs_drain(cmd),
                        Event::SwitchBaud(baud) => self.port.switch_needs_drain(*baud),
                        _ => false,
                    };
                    if self.tx_dirty && needs_drain {
                        let port = &mut self.port;
                        let drain = self.drain.get_or_insert_with(|| port.uart().drain());
                        match drain.as_mut().poll(cx) {
                            Poll::Ready(result) => {
                                self.drain = None;
                                self.tx_dirty = false;
                                if let Ok(crate::uart::Drained::Discarded) = result {
                                    self.discarded = self.discarded.saturating_add(1);
                                    limited!(
                                        warn,
                                        "discarded output",
                                        session = self.info.id,
                                        "the device did not take its output in time (flow control holding it: an XOFF from the device, CTS low?): discarded it before the next setting change"
                                    );
                                }
                                if let Err(e) = result {
                                    limited!(
                                        warn,
                                        "failed drains",
                                        session = self.info.id,
                                        "waiting for the UART to send its queue failed: {e}"
                                    );
                                }
                            }
                            Poll::Pending => return Ok(progress),
                        }
                    }
                    match self.inbound.pop_front() {
                        Some(Event::Port(cmd)) => self.apply(cmd),
                        Some(Event::SwitchBaud(baud)) => self.port.switch_baud(baud),
                        _ => {}
                    }
                    progress = true;
                }
                Event::EnterBootloader => {
                    self.inbound.pop_front();
                    self.port.enter_bootloader();
                    progress = true;
                }
                Event::Settle(wait) => {
                    let wait = *wait;
                    let timer = self
                        .settle
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(wait)));
                    if timer.as_mut().poll(cx).is_pending() {
                        return Ok(progress);
                    }
                    self.settle = None;
                    self.inbound.pop_front();
                    progress = true;
                }
                Event::Notice(_) => {
                    if let Some(Event::Notice(text)) = self.inbound.pop_front() {
                        limited!(info, "flash rate notes", session = self.info.id, "{text}");
                    }
                    progress = true;
                }
                Event::Abort(why) => return Err(EndReason::Aborted(why.clone())),
                Event::ComPortEnabled => {
                    self.inbound.pop_front();
                    let reply = self.port.modem_state(true);
                    self.reply(reply);
                    progress = true;
                }
                Event::Ignored(_) => {
                    if let Some(Event::Ignored(what)) = self.inbound.pop_front() {
                        note_ignored(&mut self.ignored, self.info.id, self.info.peer, &what);
                    }
                    progress = true;
                }
            }
        }
        Ok(progress)
    }

    /// Whether the client's end of stream may be a half-close worth lingering for: not for
    /// esptool on the raw port, which only ever closes.
    fn may_half_close(&self) -> bool {
        !matches!(&self.framing, Framing::EspRaw(raw) if raw.is_esptool())
    }

    /// The client sent its end of stream.
    fn client_closed_sending(&mut self) {
        if self.client_eof {
            return;
        }
        self.client_eof = true;
        self.heard.set_leaving(true);
        if let Framing::Rfc2217(_) = self.framing {
            // A telnet no-op: harmless to a client that only shut down its sending side, and
            // answered with a reset by one that closed altogether, which ends the session at
            // the next liveness check instead of after the linger.
            self.out
                .extend_from_slice(&crate::protocol::telnet::NOP_COMMAND);
        }
    }

    /// While the client's socket is not read (its input waits for the device, or it has
    /// half-closed), checks now and then that it is still there: a reset, a keepalive
    /// timeout or an end of stream would otherwise go unseen for as long as the device
    /// does not take the input. poll(2) tells them apart from data still queued in the
    /// socket: POLLERR/POLLHUP for a reset or a timeout, POLLRDHUP for the client's FIN.
    fn poll_liveness(&mut self, cx: &mut Context<'_>) -> Result<(), EndReason> {
        use rustix::event::{PollFd, PollFlags, Timespec};
        let reading = self.reading_client();
        while self.liveness.poll_tick(cx).is_ready() {
            if self
                .subnegotiation_since
                .is_some_and(|t| t.elapsed() >= crate::protocol::telnet::NEGOTIATION_TIME)
            {
                return Err(EndReason::TelnetStalled);
            }
            if reading {
                continue;
            }
            let mut fds = [PollFd::new(&self.tcp, PollFlags::RDHUP)];
            let now = Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            if rustix::event::poll(&mut fds, Some(&now)).is_err() {
                continue;
            }
            let seen = fds[0].revents();
            if seen.intersects(PollFlags::ERR | PollFlags::HUP) {
                let sock = socket2::SockRef::from(&self.tcp);
                return Err(match sock.take_error() {
                    Ok(Some(e)) => client_error(e),
                    _ => EndReason::ClientClosed,
                });
            }
            if seen.contains(PollFlags::RDHUP) {
                self.client_closed_sending();
            }
        }
        Ok(())
    }

    /// Applies one port command: the session's own (flow control towards the client, the
    /// receive buffer it holds) here, the rest on the port.
    fn apply(&mut self, cmd: PortCommand) {
        match cmd {
            PortCommand::FlowControlSuspend => self.suspended = true,
            PortCommand::FlowControlResume => self.suspended = false,
            cmd => {
                if let PortCommand::Purge(Ok(which)) = &cmd
                    && which.rx()
                {
                    self.pending.clear();
                }
                let reply = self.port.apply(cmd);
                self.reply(reply);
            }
        }
    }

    fn reply(&mut self, reply: Option<crate::protocol::Reply>) {
        if let Some(r) = reply {
            Engine::reply(&r, &mut self.out);
        }
    }

    fn poll_modem(&mut self, cx: &mut Context<'_>) {
        let rfc2217 = matches!(&self.framing, Framing::Rfc2217(e) if e.com_port_active());
        if self.port.modem_lines_known_absent() || !rfc2217 {
            return;
        }
        while self.modem_timer.poll_tick(cx).is_ready() {
            let reply = self.port.modem_state(false);
            self.reply(reply);
        }
    }
}

/// Counts a malformed request the client sent and logs it: the first few of a connection are
/// worth a line each; a flood is summed up at the end of the session, and across connections
/// by the rate limit. (A watcher's requests are counted the same way.)
pub fn note_ignored(count: &mut u64, id: u64, peer: SocketAddr, what: &str) {
    *count = count.saturating_add(1);
    if *count <= 5 {
        limited!(
            warn,
            "ignored requests",
            session = id,
            peer = %peer,
            "ignored input from the client: {what}"
        );
    }
}

pub fn client_error(e: io::Error) -> EndReason {
    match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => EndReason::ClientClosed,
        _ => EndReason::ClientError(e),
    }
}
