//! A connection while it watches: it gets the board's output live, and nothing it sends reaches
//! the device. Its RFC 2217 requests are answered from a view of the port of its own (pyserial
//! checks each reply against what it asked for), so pyserial, miniterm and idf.py's monitor open
//! as watchers. The first thing it sends that would reach the chip (data, a reset through
//! RTS, a BREAK) is a claim; once the board grants it, the connection writes (see
//! [`crate::connection`]).
//!
//! Bounded like everything a peer drives: output waits in the board's per-watcher buffer
//! ([`crate::fanout`]); a telnet client must have negotiated within [`NEGOTIATION_TIME`] and may
//! not sit inside a subnegotiation longer than that; a claim the board cannot grant is retried
//! as the client goes on, for `claim_wait_secs`, after which the client is told who holds the
//! board and is closed.

use crate::fanout::{Fanout, Subscription};
use crate::log_limit::limited;
use crate::protocol::PortKind;
use crate::protocol::telnet::NEGOTIATION_TIME;
use crate::protocol::{Engine, Event, PortCommand, Reply, Request};
use crate::seat::{Busy, Heard};
use crate::session::{Claim, ClientView, EndReason, StopRequest, note_ignored};
use crate::settings::{BAUD_MAX, BAUD_MIN, baud_in_range};
use crate::uart::SerialDevice;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// The most of a watcher's output moved into its send buffer at once.
const OUT_CHUNK: usize = 8 * 1024;
/// Above this much waiting to be sent to the client (answers it does not read), the client is
/// not read.
const OUT_MAX: usize = 64 * 1024;
/// A claim the board refused is asked again at most this often.
const CLAIM_RETRY: Duration = Duration::from_millis(100);
/// How long a claim may wait for the board's answer (a takeover waits for the old writer to
/// hand over, which is bounded by its session's stop).
const CLAIM_ANSWER: Duration = Duration::from_secs(8);

/// What a connection sends its board.
pub enum ToBoard {
    /// Client `id` wants to write.
    Claim {
        id: u64,
        peer: SocketAddr,
        answer: oneshot::Sender<ClaimAnswer>,
    },
    /// Client `id` stopped writing; here is the device back (`None`: it failed).
    Returned { id: u64, uart: Option<SerialDevice> },
}

/// The board's answer to a claim.
pub enum ClaimAnswer {
    /// Write: the device is the claimant's until it hands it back.
    Granted(SerialDevice),
    /// Someone else writes.
    Busy(Busy),
    /// The device cannot be used; the text says why.
    Unusable(String),
}

/// One connection to a board and what it keeps across watching and writing.
pub struct Client {
    pub id: u64,
    pub peer: SocketAddr,
    pub kind: PortKind,
    pub tcp: TcpStream,
    /// RFC 2217's telnet state (`None` on the raw port).
    pub engine: Option<Engine>,
    pub view: ClientView,
    /// Bytes for the client not yet sent.
    pub out: Vec<u8>,
    pub heard: Heard,
    /// Malformed requests the client sent while watching.
    pub ignored: u64,
    /// When the connection was accepted (its telnet negotiation is due by then plus
    /// [`NEGOTIATION_TIME`]).
    pub accepted: Instant,
}

/// How watching ended.
pub enum Watched {
    /// The client claimed the board and got it.
    Writes { uart: SerialDevice, input: Claim },
    /// The connection is over.
    Gone(EndReason),
}

/// What a watch needs of its board.
pub struct BoardLink<'a> {
    pub to_board: &'a mpsc::Sender<ToBoard>,
    pub fanout: &'a Fanout,
    pub claim_wait: Duration,
    pub signature: &'a str,
}

/// A claim the board could not grant yet.
struct Waiting {
    since: Instant,
    busy: Busy,
    last_try: Instant,
}

impl Client {
    /// Watches until the client claims the board and gets it, leaves, or is stopped.
    pub async fn watch(
        &mut self,
        board: BoardLink<'_>,
        stop: &mut watch::Receiver<Option<StopRequest>>,
    ) -> Watched {
        let sub = board.fanout.subscribe();
        let mut read_buf = vec![0u8; 4096];
        let mut chunk = Vec::new();
        let mut events = Vec::new();
        let mut suspended = false;
        let mut subnegotiation_since: Option<Instant> = None;
        let mut waiting: Option<Waiting> = None;
        let negotiation_due = self.accepted + NEGOTIATION_TIME;
        loop {
            let negotiated = self.engine.as_ref().is_none_or(Engine::negotiated);
            let deadline = [
                (!negotiated).then_some(negotiation_due),
                subnegotiation_since.map(|t| t + NEGOTIATION_TIME),
                waiting.as_ref().map(|w| w.since + board.claim_wait),
            ]
            .into_iter()
            .flatten()
            .min();
            let (mut rd, mut wr) = self.tcp.split();
            tokio::select! {
                changed = stop.changed() => {
                    let request = if changed.is_err() { Some(StopRequest::Shutdown) } else { *stop.borrow_and_update() };
                    // A hand-over is for a writer; this one already watches.
                    if let Some(r @ (StopRequest::Shutdown | StopRequest::DeviceGone)) = request {
                        return Watched::Gone(self.close(EndReason::Stopped(r)).await);
                    }
                }
                taken = poll_fn(|cx| sub.poll_take(cx, &mut chunk, OUT_CHUNK)), if self.out.len() < OUT_CHUNK && !suspended => {
                    if taken.lost > 0 {
                        self.notice(&format!("[esp-bridge] {} bytes of output lost here: this connection did not keep up", taken.lost));
                    }
                    self.encode(&chunk);
                    chunk.clear();
                }
                written = wr.write(&self.out), if !self.out.is_empty() => match written {
                    Ok(0) => return Watched::Gone(EndReason::ClientClosed),
                    Ok(n) => { self.out.drain(..n); }
                    Err(e) => return Watched::Gone(crate::session::client_error(e)),
                },
                // A client that sends requests and does not read the answers is not read
                // further until it does: what waits for it stays bounded.
                read = rd.read(&mut read_buf), if self.out.len() <= OUT_MAX => {
                    let n = match read {
                        Ok(0) => return Watched::Gone(EndReason::ClientClosed),
                        Ok(n) => n,
                        Err(e) => return Watched::Gone(crate::session::client_error(e)),
                    };
                    self.heard.now();
                    let claimed = match &mut self.engine {
                        None => Some(Claim::Bytes(read_buf[..n].to_vec())),
                        Some(engine) => {
                            engine.receive(&read_buf[..n], &mut events, &mut self.out);
                            subnegotiation_since = engine.subnegotiation_since(subnegotiation_since, Instant::now);
                            self.answer(&mut events, &mut suspended, &sub, board.signature)
                        }
                    };
                    let Some(claim) = claimed else { continue };
                    let Some(uart) = self.claim(&board, &mut waiting).await else { continue };
                    // What the board sent before the claim still reaches the client.
                    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                    while sub.poll_take(&mut cx, &mut chunk, usize::MAX).is_ready() {
                        if chunk.is_empty() { break; }
                        self.encode(&chunk);
                        chunk.clear();
                    }
                    return Watched::Writes { uart, input: claim };
                }
                () = crate::timer::sleep_until(deadline) => {
                    let now = Instant::now();
                    if !negotiated && now >= negotiation_due {
                        return Watched::Gone(self.close(EndReason::Aborted(format!(
                            "client did not answer the telnet negotiation within {} s: not an RFC 2217 client (use the raw port for plain TCP)",
                            NEGOTIATION_TIME.as_secs()
                        ))).await);
                    }
                    if subnegotiation_since.is_some_and(|t| now >= t + NEGOTIATION_TIME) {
                        return Watched::Gone(self.close(EndReason::TelnetStalled).await);
                    }
                    if let Some(w) = &waiting && now >= w.since + board.claim_wait {
                        let why = format!(
                            "the board is being written by {} (it last sent something {:.0} s ago); this client waited {} s to write and gave up. Try again when it is done",
                            w.busy.by,
                            w.busy.silent_for.as_secs_f64(),
                            board.claim_wait.as_secs()
                        );
                        limited!(warn, "claims refused", peer = %self.peer, "client {} could not write: {why}", self.peer);
                        return Watched::Gone(self.close(EndReason::Aborted(why)).await);
                    }
                }
            }
        }
    }

    /// Answers what a watcher may do itself; returns the input from the first claim on.
    fn answer(
        &mut self,
        events: &mut Vec<Event>,
        suspended: &mut bool,
        sub: &Subscription,
        signature: &str,
    ) -> Option<Claim> {
        let mut drained = events.drain(..);
        while let Some(event) = drained.next() {
            if self.view.claims(&event) {
                let mut rest = vec![event];
                rest.extend(drained);
                return Some(Claim::Events(rest));
            }
            let reply = match &event {
                Event::Port(PortCommand::FlowControlSuspend) => {
                    *suspended = true;
                    None
                }
                Event::Port(PortCommand::FlowControlResume) => {
                    *suspended = false;
                    None
                }
                Event::Port(cmd) => {
                    if let PortCommand::Purge(Ok(which)) = cmd
                        && which.rx()
                    {
                        sub.clear();
                    }
                    if let PortCommand::BaudRate(Request::Set(baud)) = cmd
                        && !baud_in_range(*baud)
                    {
                        limited!(
                            warn,
                            "baud rates out of range",
                            session = self.id,
                            "client asked for {baud} baud, outside {BAUD_MIN} to {BAUD_MAX}: it stays at {}",
                            self.view.settings.baud
                        );
                    }
                    self.view.answer(cmd, signature)
                }
                Event::Ignored(what) => {
                    note_ignored(&mut self.ignored, self.id, self.peer, what);
                    None
                }
                Event::ComPortEnabled => Some(Reply::ModemState(0)),
                _ => None,
            };
            if let Some(r) = reply {
                Engine::reply(&r, &mut self.out);
            }
        }
        None
    }

    /// Asks the board for the device; `None` while someone else writes (the claim waits, and
    /// the input that made it is dropped: esptool and terminals send again). While the board
    /// changes hands (its writer finishing, a takeover under way) the claim is asked again
    /// every [`CLAIM_RETRY`] with the input kept and the client not read, so a client that
    /// connects as the last one closes loses nothing.
    async fn claim(
        &mut self,
        board: &BoardLink<'_>,
        waiting: &mut Option<Waiting>,
    ) -> Option<SerialDevice> {
        loop {
            let now = Instant::now();
            if waiting
                .as_ref()
                .is_some_and(|w| now < w.last_try + CLAIM_RETRY)
            {
                return None;
            }
            let (answer, reply) = oneshot::channel();
            let asked = board
                .to_board
                .send(ToBoard::Claim {
                    id: self.id,
                    peer: self.peer,
                    answer,
                })
                .await;
            let answer = match asked {
                Ok(()) => tokio::time::timeout(CLAIM_ANSWER, reply).await,
                Err(_) => return None,
            };
            let busy = match answer {
                Ok(Ok(ClaimAnswer::Granted(uart))) => {
                    *waiting = None;
                    return Some(uart);
                }
                Ok(Ok(ClaimAnswer::Busy(busy))) => busy,
                Ok(Ok(ClaimAnswer::Unusable(why))) => {
                    self.notice(&format!("[esp-bridge] {why}"));
                    return None;
                }
                // The board is going away, or the takeover did not finish in time.
                Ok(Err(_)) | Err(_) => return None,
            };
            let first = waiting.is_none();
            let since = waiting.as_ref().map_or(now, |w| w.since);
            *waiting = Some(Waiting {
                since,
                busy,
                last_try: now,
            });
            if first && !busy.changing_hands {
                limited!(
                    info,
                    "claims waiting",
                    peer = %self.peer,
                    "client {} wants to write; {} writes (it last sent something {:.0} s ago): waiting up to {} s",
                    self.peer,
                    busy.by,
                    busy.silent_for.as_secs_f64(),
                    board.claim_wait.as_secs()
                );
            }
            if !busy.changing_hands || now >= since + board.claim_wait {
                return None;
            }
            tokio::time::sleep(CLAIM_RETRY).await;
        }
    }

    /// What the server says first: its telnet offers, on the RFC 2217 port.
    pub fn greet(&mut self) {
        if let Some(engine) = &mut self.engine {
            let greeting = engine.greeting();
            self.out.extend_from_slice(&greeting);
        }
    }

    /// Appends device output for the client, escaped for telnet where it speaks it.
    fn encode(&mut self, data: &[u8]) {
        match self.engine {
            Some(_) => Engine::encode_data(data, &mut self.out),
            None => self.out.extend_from_slice(data),
        }
    }

    /// A line from the bridge in the client's stream.
    pub fn notice(&mut self, text: &str) {
        self.encode(format!("\r\n{text}\r\n").as_bytes());
    }

    /// Tells the client why the connection ends (bounded), and returns that reason.
    async fn close(&mut self, reason: EndReason) -> EndReason {
        let text = match &reason {
            EndReason::Stopped(StopRequest::Shutdown) => {
                "[esp-bridge] service is shutting down; closing.".to_string()
            }
            EndReason::Stopped(StopRequest::DeviceGone) => {
                "[esp-bridge] the serial device failed or disappeared; closing. Reconnect when it is back.".to_string()
            }
            other => format!("[esp-bridge] {other}; closing."),
        };
        self.notice(&text);
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            self.tcp.write_all(&self.out).await?;
            self.out.clear();
            self.tcp.shutdown().await
        })
        .await;
        reason
    }
}
