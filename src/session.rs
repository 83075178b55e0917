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

use crate::config::{FlowControl, Parity};
use crate::control::{Control, ModemOutputs};
use crate::protocol::esp_raw::EspRaw;
use crate::protocol::rfc2217::{self, control as ctl, purge};
use crate::protocol::{Engine, Event, PortCommand};
use crate::uart::{Drain, LineSettings, Uart};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// Most escaped device data held for a slow client before the UART is no longer read.
pub const HIGH_WATER: usize = 64 * 1024;
const READ_CHUNK: usize = 16 * 1024;
/// How often the modem input lines are sampled for NOTIFY-MODEMSTATE.
const MODEM_POLL: Duration = Duration::from_millis(200);
/// How long a closing session may take to hand its last bytes over (to the UART, then to
/// the client) before it gives up on them.
const LINGER: Duration = Duration::from_secs(2);
/// Baud rate changes per session logged at info level; the rest go to debug.
const BAUD_CHANGES_LOGGED: u64 = 10;

/// Why a session was asked to stop from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    /// The service is shutting down.
    Shutdown,
    /// A new client replaced this one (second_client = "replace").
    Replaced,
}

/// Why a session ended.
#[derive(Debug)]
pub enum EndReason {
    ClientClosed,
    ClientError(io::Error),
    DeviceGone(io::Error),
    Stopped(StopRequest),
}

impl std::fmt::Display for EndReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndReason::ClientClosed => write!(f, "client disconnected"),
            // ETIMEDOUT on a socket with keepalive and a user timeout: the peer vanished
            // without closing (unplugged, Wi-Fi lost). Said plainly, as that is the usual case.
            EndReason::ClientError(e) if e.kind() == io::ErrorKind::TimedOut => write!(
                f,
                "client stopped answering: no acknowledgement within the keepalive time ({e}); it vanished without closing the connection"
            ),
            EndReason::ClientError(e) => write!(f, "client connection failed: {e}"),
            EndReason::DeviceGone(e) => write!(f, "serial device failed or vanished: {e}"),
            EndReason::Stopped(StopRequest::Shutdown) => write!(f, "service shutting down"),
            EndReason::Stopped(StopRequest::Replaced) => write!(f, "replaced by a new client"),
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
}

/// The control lines, shared between the server (which releases them at shutdown) and the
/// session being served.
pub type SharedControl = Arc<Mutex<Box<dyn Control>>>;

/// How the client's bytes are framed, by the port it connected to.
pub enum Framing {
    /// Telnet with RFC 2217 COM-PORT control (`rfc2217://`).
    Rfc2217(Engine),
    /// The ESP-aware raw port (`socket://`): bytes pass unchanged.
    EspRaw(EspRaw),
}

impl Framing {
    pub fn rfc2217() -> Self {
        Framing::Rfc2217(Engine::new())
    }
    pub fn esp_raw() -> Self {
        Framing::EspRaw(EspRaw::new())
    }
}

/// Static facts a session needs.
pub struct SessionInfo {
    pub id: u64,
    pub peer: SocketAddr,
    pub signature: String,
    pub device: String,
}

pub struct Session<U: Uart> {
    info: SessionInfo,
    tcp: TcpStream,
    uart: U,
    control: SharedControl,
    framing: Framing,
    settings: LineSettings,
    outputs: ModemOutputs,
    break_on: bool,
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
    modem_supported: Option<bool>,
    modem_last: u8,
    modem_mask: u8,
    modem_timer: tokio::time::Interval,
    client_eof: bool,
    device_error: Option<io::Error>,
    to_device: u64,
    to_client: u64,
    ignored: u64,
    /// Baud rate changes applied in this session (only the first few are logged at info).
    baud_changes: u64,
    events: Vec<Event>,
    net_buf: Vec<u8>,
    dev_buf: Vec<u8>,
}

impl<U: Uart> Session<U> {
    pub fn new(
        info: SessionInfo,
        tcp: TcpStream,
        uart: U,
        control: SharedControl,
        settings: LineSettings,
        framing: Framing,
    ) -> Self {
        let mut modem_timer = tokio::time::interval(MODEM_POLL);
        modem_timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Session {
            info,
            tcp,
            uart,
            control,
            framing,
            settings,
            outputs: ModemOutputs::default(),
            break_on: false,
            inbound: VecDeque::new(),
            inbound_offset: 0,
            out: Vec::new(),
            out_pos: 0,
            pending: Vec::new(),
            suspended: false,
            tx_dirty: false,
            drain: None,
            modem_supported: None,
            modem_last: 0,
            modem_mask: 0xff,
            modem_timer,
            client_eof: false,
            device_error: None,
            to_device: 0,
            to_client: 0,
            ignored: 0,
            baud_changes: 0,
            events: Vec::new(),
            net_buf: vec![0; READ_CHUNK],
            dev_buf: vec![0; READ_CHUNK],
        }
    }

    /// Serves the client until it leaves, the device fails, or `stop` says so.
    pub async fn run(mut self, mut stop: watch::Receiver<Option<StopRequest>>) -> Report {
        let started = Instant::now();
        if let Framing::Rfc2217(engine) = &mut self.framing {
            let greeting = engine.greeting();
            self.out.extend_from_slice(&greeting);
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
        self.finish(&reason).await;
        Report {
            reason,
            to_device: self.to_device,
            to_client: self.to_client,
            duration: started.elapsed(),
            final_baud: self.settings.baud,
            ignored_input: self.ignored,
        }
    }

    /// Hands over what can still be handed over, tells the client why it ends, and releases
    /// the control lines.
    async fn finish(&mut self, reason: &EndReason) {
        // A client that sent IAC SB and never IAC SE is broken or hostile (a slowloris);
        // the operator looking at a stuck port wants to know which it was.
        if let Framing::Rfc2217(engine) = &self.framing
            && engine.in_subnegotiation()
        {
            tracing::warn!(
                session = self.info.id,
                peer = %self.info.peer,
                "client left in the middle of a subnegotiation (IAC SB without IAC SE): a broken or hostile client"
            );
        }
        let device_ok = !matches!(reason, EndReason::DeviceGone(_));
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
            EndReason::Stopped(StopRequest::Replaced) => Some(
                "\r\n[esp-bridge] another client took over this port; closing.\r\n".to_string(),
            ),
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
        let mut control = self
            .control
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = control.release() {
            tracing::error!(
                session = self.info.id,
                "could not release the control lines: {e}"
            );
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
            self.poll_modem(cx);
            if self.client_eof && self.inbound.is_empty() {
                return Poll::Ready(EndReason::ClientClosed);
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

    fn poll_client_read(&mut self, cx: &mut Context<'_>) -> Result<bool, EndReason> {
        // Backpressure: read more only when the last input was applied and the client is
        // keeping up with our replies.
        if self.client_eof || !self.inbound.is_empty() || self.out.len() - self.out_pos > HIGH_WATER
        {
            return Ok(false);
        }
        let mut buf = ReadBuf::new(&mut self.net_buf);
        match Pin::new(&mut self.tcp).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len();
                if n == 0 {
                    self.client_eof = true;
                    return Ok(true);
                }
                match &mut self.framing {
                    Framing::Rfc2217(engine) => {
                        engine.receive(&self.net_buf[..n], &mut self.events, &mut self.out)
                    }
                    Framing::EspRaw(raw) => raw.from_client(&self.net_buf[..n], &mut self.events),
                }
                self.inbound.extend(self.events.drain(..));
                Ok(true)
            }
            Poll::Ready(Err(e)) => Err(client_error(e)),
            Poll::Pending => Ok(false),
        }
    }

    fn poll_device_read(&mut self, cx: &mut Context<'_>) -> Result<bool, EndReason> {
        if self.suspended || self.pending.len() >= HIGH_WATER {
            return Ok(false);
        }
        let mut buf = ReadBuf::new(&mut self.dev_buf);
        match Pin::new(&mut self.uart).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len();
                if n == 0 {
                    return Err(EndReason::DeviceGone(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "end of file",
                    )));
                }
                match &mut self.framing {
                    Framing::Rfc2217(_) => {
                        Engine::encode_data(&self.dev_buf[..n], &mut self.pending)
                    }
                    Framing::EspRaw(raw) => {
                        raw.from_device(&self.dev_buf[..n], &mut self.pending, &mut self.events);
                        // A baud switch goes before any client input still queued: the
                        // client sends its next command only after it read this reply.
                        for event in self.events.drain(..).rev() {
                            self.inbound.push_front(event);
                        }
                    }
                }
                Ok(true)
            }
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
            Poll::Ready(Err(e)) => Err(EndReason::DeviceGone(e)),
            Poll::Pending => Ok(false),
        }
    }

    /// Applies queued client input in order. Returns whether anything was done.
    fn poll_inbound(&mut self, cx: &mut Context<'_>) -> Result<bool, EndReason> {
        if let Some(e) = self.device_error.take() {
            return Err(EndReason::DeviceGone(e));
        }
        let mut progress = false;
        while let Some(front) = self.inbound.front() {
            match front {
                Event::Data(data) => {
                    let rest = &data[self.inbound_offset..];
                    match Pin::new(&mut self.uart).poll_write(cx, rest) {
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
                    if self.tx_dirty && self.changes_line_settings(front) {
                        let drain = self.drain.get_or_insert_with(|| self.uart.drain());
                        match drain.as_mut().poll(cx) {
                            Poll::Ready(result) => {
                                self.drain = None;
                                self.tx_dirty = false;
                                if let Err(e) = result {
                                    tracing::warn!(
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
                        Some(Event::SwitchBaud(baud)) => self.switch_baud(baud),
                        _ => {}
                    }
                    progress = true;
                }
                Event::EnterBootloader => {
                    self.inbound.pop_front();
                    let result = self
                        .control
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .enter_bootloader();
                    match result {
                        Ok(()) => tracing::info!(
                            session = self.info.id,
                            "raw port: esptool is syncing; putting the chip into its bootloader"
                        ),
                        Err(e) => tracing::warn!(session = self.info.id, "raw port: {e}"),
                    }
                    progress = true;
                }
                Event::ComPortEnabled => {
                    self.inbound.pop_front();
                    self.notify_modem_state(true);
                    progress = true;
                }
                Event::Ignored(_) => {
                    if let Some(Event::Ignored(what)) = self.inbound.pop_front() {
                        self.ignored += 1;
                        // The first few are worth a line each; a flood is summed up at the end.
                        if self.ignored <= 5 {
                            tracing::warn!(
                                session = self.info.id,
                                peer = %self.info.peer,
                                "ignored input from the client: {what}"
                            );
                        }
                    }
                    progress = true;
                }
            }
        }
        Ok(progress)
    }

    /// Whether applying `cmd` changes how bytes are framed on the wire, so that bytes
    /// written before it must leave the UART first.
    fn changes_line_settings(&self, event: &Event) -> bool {
        let s = &self.settings;
        let cmd = match event {
            Event::SwitchBaud(b) => return *b != s.baud,
            Event::Port(cmd) => cmd,
            _ => return false,
        };
        match *cmd {
            PortCommand::SetBaudRate(b) => b != 0 && b != s.baud,
            PortCommand::SetDataSize(d) => (5..=8).contains(&d) && d != s.data_bits,
            PortCommand::SetParity(p) => parity_from_wire(p).is_some_and(|p| p != s.parity),
            PortCommand::SetStopSize(v) => matches!(v, 1 | 2) && v != s.stop_bits,
            PortCommand::SetControl(ctl::BREAK_ON) => !self.break_on,
            _ => false,
        }
    }

    /// The raw port's baud switch: like SET-BAUDRATE, without a reply.
    fn switch_baud(&mut self, baud: u32) {
        if baud == self.settings.baud {
            return;
        }
        match self.uart.set_baud(baud) {
            Ok(()) => {
                self.log_baud_change(
                    baud,
                    format!("raw port: the chip switched to {baud} baud; so does the UART"),
                );
                self.settings.baud = baud;
                crate::systemd::status(&format!("serving {} at {baud} baud", self.info.peer.ip()));
            }
            Err(e) => self.device_failed(&format!("the device refused baud rate {baud}"), e),
        }
    }

    /// Logs a baud rate change: the first few of a session at info (esptool makes two or
    /// three), then a notice, then at debug, so that a client alternating SET-BAUDRATE values
    /// in a loop cannot write a line per command into the journal. The closing line of the
    /// session still says the last rate.
    fn log_baud_change(&mut self, baud: u32, what: String) {
        self.baud_changes += 1;
        let id = self.info.id;
        if self.baud_changes <= BAUD_CHANGES_LOGGED {
            tracing::info!(session = id, baud, "{what}");
        } else if self.baud_changes == BAUD_CHANGES_LOGGED + 1 {
            tracing::info!(
                session = id,
                baud,
                "{what}; further baud rate changes of this session are logged at debug level"
            );
        } else {
            tracing::debug!(session = id, baud, "{what}");
        }
    }

    fn reply(&mut self, code: u8, value: &[u8]) {
        Engine::reply(code, value, &mut self.out);
    }

    fn device_failed(&mut self, what: &str, e: io::Error) {
        tracing::warn!(session = self.info.id, "{what}: {e}");
        if is_gone(&e) {
            self.device_error = Some(e);
        }
    }

    fn apply(&mut self, cmd: PortCommand) {
        let code = cmd.code();
        match cmd {
            PortCommand::Signature(text) => {
                if text.is_empty() {
                    let ours = self.info.signature.clone();
                    self.reply(code, ours.as_bytes());
                } else {
                    tracing::debug!(
                        session = self.info.id,
                        "client signature: {}",
                        String::from_utf8_lossy(&text)
                    );
                }
            }
            PortCommand::SetBaudRate(baud) => {
                if baud != 0 && baud != self.settings.baud {
                    match self.uart.set_baud(baud) {
                        Ok(()) => {
                            let what =
                                format!("baud rate changed from {} to {baud}", self.settings.baud);
                            self.log_baud_change(baud, what);
                            self.settings.baud = baud;
                            crate::systemd::status(&format!(
                                "serving {} at {baud} baud",
                                self.info.peer.ip()
                            ));
                        }
                        Err(e) => self.device_failed(
                            &format!(
                                "the device refused baud rate {baud}; keeping {}",
                                self.settings.baud
                            ),
                            e,
                        ),
                    }
                }
                let now = self.settings.baud.to_be_bytes();
                self.reply(code, &now);
            }
            PortCommand::SetDataSize(bits) => {
                if (5..=8).contains(&bits) && bits != self.settings.data_bits {
                    match self.uart.set_data_bits(bits) {
                        Ok(()) => self.settings.data_bits = bits,
                        Err(e) => self.device_failed("the device refused the data size", e),
                    }
                } else if bits != 0 && !(5..=8).contains(&bits) {
                    tracing::warn!(
                        session = self.info.id,
                        "client asked for {bits} data bits; only 5 to 8 exist"
                    );
                }
                let now = self.settings.data_bits;
                self.reply(code, &[now]);
            }
            PortCommand::SetParity(p) => {
                match parity_from_wire(p) {
                    Some(parity) if parity != self.settings.parity => {
                        match self.uart.set_parity(parity) {
                            Ok(()) => self.settings.parity = parity,
                            Err(e) => self.device_failed("the device refused the parity", e),
                        }
                    }
                    Some(_) => {}
                    None if p == 0 => {}
                    None => tracing::warn!(
                        session = self.info.id,
                        "client asked for parity {p} (mark/space or unknown), which Linux UARTs do not offer"
                    ),
                }
                let now = parity_to_wire(self.settings.parity);
                self.reply(code, &[now]);
            }
            PortCommand::SetStopSize(v) => {
                if matches!(v, 1 | 2) && v != self.settings.stop_bits {
                    match self.uart.set_stop_bits(v) {
                        Ok(()) => self.settings.stop_bits = v,
                        Err(e) => self.device_failed("the device refused the stop bits", e),
                    }
                } else if v == 3 {
                    tracing::warn!(
                        session = self.info.id,
                        "client asked for 1.5 stop bits, which Linux UARTs do not offer"
                    );
                }
                let now = self.settings.stop_bits;
                self.reply(code, &[now]);
            }
            PortCommand::SetControl(value) => self.set_control(value),
            PortCommand::PollLineState => self.reply(code, &[0]),
            PortCommand::PollModemState => self.notify_modem_state(true),
            PortCommand::FlowControlSuspend => self.suspended = true,
            PortCommand::FlowControlResume => self.suspended = false,
            PortCommand::SetLineStateMask(m) => self.reply(code, &[m]),
            PortCommand::SetModemStateMask(m) => {
                self.modem_mask = m;
                self.reply(code, &[m]);
            }
            PortCommand::PurgeData(which) => {
                let (input, output) = match which {
                    purge::RX => (true, false),
                    purge::TX => (false, true),
                    purge::BOTH => (true, true),
                    other => {
                        tracing::warn!(
                            session = self.info.id,
                            "client asked to purge buffer {other}; only 1 (rx), 2 (tx) and 3 (both) exist"
                        );
                        return;
                    }
                };
                if let Err(e) = self.uart.purge(input, output) {
                    self.device_failed("purging the device buffers failed", e);
                }
                if input {
                    self.pending.clear();
                }
                self.reply(code, &[which]);
            }
        }
    }

    fn set_control(&mut self, value: u8) {
        let code = rfc2217::SET_CONTROL;
        let answer = match value {
            ctl::REQ_FLOW => flow_to_wire(self.settings.flow),
            ctl::FLOW_NONE | ctl::FLOW_XONXOFF | ctl::FLOW_HARDWARE => {
                let flow = match value {
                    ctl::FLOW_XONXOFF => FlowControl::Software,
                    ctl::FLOW_HARDWARE => FlowControl::Hardware,
                    _ => FlowControl::None,
                };
                if flow != self.settings.flow {
                    match self.uart.set_flow(flow) {
                        Ok(()) => self.settings.flow = flow,
                        Err(e) => self.device_failed("the device refused the flow control", e),
                    }
                }
                flow_to_wire(self.settings.flow)
            }
            ctl::REQ_BREAK => break_to_wire(self.break_on),
            ctl::BREAK_ON | ctl::BREAK_OFF => {
                let on = value == ctl::BREAK_ON;
                if on != self.break_on {
                    match self.uart.set_break(on) {
                        Ok(()) => self.break_on = on,
                        Err(e) => self.device_failed("setting BREAK failed", e),
                    }
                }
                break_to_wire(self.break_on)
            }
            ctl::REQ_DTR => on_off(self.outputs.dtr, ctl::DTR_ON, ctl::DTR_OFF),
            ctl::REQ_RTS => on_off(self.outputs.rts, ctl::RTS_ON, ctl::RTS_OFF),
            ctl::DTR_ON | ctl::DTR_OFF | ctl::RTS_ON | ctl::RTS_OFF => {
                let mut wanted = self.outputs;
                match value {
                    ctl::DTR_ON => wanted.dtr = true,
                    ctl::DTR_OFF => wanted.dtr = false,
                    ctl::RTS_ON => wanted.rts = true,
                    _ => wanted.rts = false,
                }
                let result = self
                    .control
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .client_outputs(wanted);
                match result {
                    // The client's view is acknowledged even when nothing physical changed:
                    // what the pins do is the control policy's business.
                    Ok(()) => self.outputs = wanted,
                    Err(e) => tracing::error!(
                        session = self.info.id,
                        "driving the control lines failed: {e}"
                    ),
                }
                value
            }
            ctl::REQ_FLOW_IN | ctl::FLOW_IN_NONE => ctl::FLOW_IN_NONE,
            other => {
                tracing::warn!(
                    session = self.info.id,
                    "client asked for SET-CONTROL {other}, which this server does not support; answering with the current flow control"
                );
                if (ctl::FLOW_IN_XONXOFF..=ctl::FLOW_IN_HARDWARE).contains(&other) {
                    ctl::FLOW_IN_NONE
                } else {
                    flow_to_wire(self.settings.flow)
                }
            }
        };
        self.reply(code, &[answer]);
    }

    fn poll_modem(&mut self, cx: &mut Context<'_>) {
        let rfc2217 = matches!(&self.framing, Framing::Rfc2217(e) if e.com_port_active());
        if self.modem_supported == Some(false) || !rfc2217 {
            return;
        }
        while self.modem_timer.poll_tick(cx).is_ready() {
            self.notify_modem_state(false);
        }
    }

    /// Sends NOTIFY-MODEMSTATE when forced (a poll, the start of RFC 2217) or when a masked
    /// line changed. Devices without modem lines report all lines low, once.
    fn notify_modem_state(&mut self, force: bool) {
        let now = if self.modem_supported == Some(false) {
            0
        } else {
            match self.uart.modem_status() {
                Ok(bits) => {
                    self.modem_supported = Some(true);
                    bits
                }
                Err(_) => {
                    self.modem_supported = Some(false);
                    0
                }
            }
        };
        let changed = (now ^ self.modem_last) & 0xf0;
        if !force && changed & self.modem_mask == 0 {
            return;
        }
        // The low nibble reports which lines changed since the last notification.
        let value = (now | (changed >> 4)) & self.modem_mask;
        self.modem_last = now;
        self.reply(rfc2217::NOTIFY_MODEMSTATE, &[value]);
    }
}

fn client_error(e: io::Error) -> EndReason {
    match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => EndReason::ClientClosed,
        _ => EndReason::ClientError(e),
    }
}

/// Errors after which the device will not work again until reopened (unplugged, hung up).
fn is_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == rustix::io::Errno::IO.raw_os_error()
        || code == rustix::io::Errno::NODEV.raw_os_error()
        || code == rustix::io::Errno::NXIO.raw_os_error()
        || code == rustix::io::Errno::BADF.raw_os_error())
}

fn parity_from_wire(p: u8) -> Option<Parity> {
    match p {
        1 => Some(Parity::None),
        2 => Some(Parity::Odd),
        3 => Some(Parity::Even),
        _ => None,
    }
}

fn parity_to_wire(p: Parity) -> u8 {
    match p {
        Parity::None => 1,
        Parity::Odd => 2,
        Parity::Even => 3,
    }
}

fn flow_to_wire(f: FlowControl) -> u8 {
    match f {
        FlowControl::None => ctl::FLOW_NONE,
        FlowControl::Software => ctl::FLOW_XONXOFF,
        FlowControl::Hardware => ctl::FLOW_HARDWARE,
    }
}

fn break_to_wire(on: bool) -> u8 {
    on_off(on, ctl::BREAK_ON, ctl::BREAK_OFF)
}

fn on_off(on: bool, yes: u8, no: u8) -> u8 {
    if on { yes } else { no }
}
