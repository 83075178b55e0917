//! One board's bridge: its listeners, its connections (every one watches; one at a time
//! writes, see [`crate::seat`]), the serial device while anyone is connected, the board's
//! status, and its part of the shutdown.
//!
//! The bridge task is the only owner of the board's decisions: connections ask it for the
//! device ([`ToBoard::Claim`]) and give it back ([`ToBoard::Returned`]). While nobody writes,
//! an idle reader holds the device and hands its output to the watchers ([`Fanout`]). The
//! device is opened when the first client connects and closed when the last leaves; the
//! control lines are released each time a writer stops. On shutdown every connection is told
//! to finish (a writer hands its input to the UART and tells its client why), and the lines
//! reach their safe state before [`Bridge::run`] returns.

use crate::config::{BoardConfig, Config, ControlBackend, Network, SecondClient};
use crate::connection::BoardContext;
use crate::control::lock;
use crate::fanout::Fanout;
use crate::identify::{Ask, Identity};
use crate::log_limit::limited;
use crate::protocol::{Engine, PortKind};
use crate::seat::{Busy, Decision, Heard, Seat, SeatPolicy, WriterState};
use crate::session::{ClientView, SharedControl, StopRequest};
use crate::settings::LineSettings;
use crate::shutdown::stopping;
use crate::status::{Activity, BoardStatus, StatusBook, StatusHandle};
use crate::uart::{SerialDevice, describe_open_error};
use crate::watcher::{ClaimAnswer, Client, ToBoard};
use socket2::{SockRef, TcpKeepalive};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tracing::Instrument;

/// How long stopping connections may take before the service exits anyway.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The most connections one board serves at once (one writer, the rest watchers); more are
/// refused with the reason.
pub const MAX_CLIENTS: usize = 32;

static NEXT_CLIENT: AtomicU64 = AtomicU64::new(1);

/// The span every log line of a board is in: the journal gets its `BOARD=` field from it
/// (`journalctl -u esp-bridge BOARD=lab1`).
pub fn board_span(name: &str) -> tracing::Span {
    tracing::info_span!("board", board = %name)
}

/// A listening socket and the protocol it speaks.
pub type Listener = (TcpListener, PortKind);

/// One board, ready to serve.
pub struct Bridge {
    name: String,
    listeners: Vec<Listener>,
    control: SharedControl,
    status: StatusHandle,
    fanout: Fanout,
    /// Requests to identify the board's chip (from the control socket).
    asks: mpsc::Receiver<Ask>,
}

/// Identification requests waiting for a board's bridge; more are refused at once.
const MAX_ASKS: usize = 2;

/// How long the device stays open after the last client left: the boot log a chip prints
/// after esptool's final reset reaches the board's history (`esp-bridge log`).
const DEVICE_LINGER: Duration = Duration::from_secs(5);

/// Refusals (a newcomer told why it is not served) under way at once, each bounded in time.
const MAX_REFUSALS: usize = 8;

/// How long the control lines may take to reach their safe state at shutdown.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(3);

/// How often a board whose output goes to the journal tries to open its missing device (a
/// USB adapter unplugged, or not there yet at boot).
const REOPEN_EVERY: Duration = Duration::from_secs(1);

/// One connection, as the bridge knows it.
struct Member {
    peer: SocketAddr,
    heard: Heard,
    stop: watch::Sender<Option<StopRequest>>,
    task: tokio::task::Id,
}

/// Everything the bridge task decides about, apart from the configuration.
struct Board {
    members: HashMap<u64, Member>,
    tasks: JoinSet<u64>,
    seat: Seat,
    device: Device,
    /// The settings the device was opened with.
    opened_with: Option<LineSettings>,
    /// The last client left: the device closes then, unless a client comes first.
    close_at: Option<Instant>,
    fanout: Fanout,
    /// A takeover waiting for the old writer to hand the device back.
    takeover: Option<(u64, oneshot::Sender<ClaimAnswer>)>,
    control: SharedControl,
    status: StatusHandle,
    /// The board's output goes to the journal: its device is kept open, client or not, and
    /// opened again while it is missing.
    journal: bool,
    /// When to try opening a missing device again (`journal` boards).
    reopen_at: Option<Instant>,
    /// The device was found missing and that was logged; its return is logged too.
    missing: bool,
    /// An identification of the chip under way: it has the device.
    identifying: Option<JoinHandle<()>>,
    name: String,
}

/// An identification's end: its result, the device back, and whom to tell.
type Identified = (Result<Identity, String>, SerialDevice, Ask);

impl Bridge {
    /// Adds the board to `book` (idle, listening on `listeners`, keeping `history` bytes of
    /// its output).
    pub fn new(
        name: &str,
        device: String,
        listeners: Vec<Listener>,
        control: SharedControl,
        book: &StatusBook,
        history: usize,
    ) -> Self {
        let resets = lock(&control).resets();
        let status = book.add(BoardStatus::new(
            name,
            listening(&listeners),
            device,
            resets,
        ));
        let fanout = Fanout::new(history);
        let (ask, asks) = mpsc::channel(MAX_ASKS);
        book.add_links(name, fanout.clone(), ask);
        if let Some(chip) = crate::identify::load(name) {
            status.set_chip(chip);
        }
        Bridge {
            name: name.to_string(),
            listeners,
            control,
            status,
            fanout,
            asks,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Serves clients until `shutdown` says so; each client gets the configuration `config`
    /// holds when it arrives.
    pub async fn run(
        self,
        mut config: watch::Receiver<Config>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let Bridge {
            name,
            listeners,
            control,
            status,
            fanout,
            mut asks,
        } = self;
        let (identified_tx, mut identified) = mpsc::channel::<Identified>(1);
        let mut served = Served::of(&name, &config.borrow_and_update());
        let (accepted_tx, mut accepted) = mpsc::channel::<Accepted>(4);
        let mut acceptors = Vec::new();
        for (listener, kind) in listeners {
            let tx = accepted_tx.clone();
            acceptors.push(tokio::spawn(
                accept_loop(listener, kind, tx).in_current_span(),
            ));
        }
        drop(accepted_tx);
        let (to_board, mut from_clients) = mpsc::channel::<ToBoard>(16);
        let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
        let mut board = Board {
            members: HashMap::new(),
            tasks: JoinSet::new(),
            seat: Seat::new(served.policy()),
            device: Device::Closed,
            opened_with: None,
            close_at: None,
            fanout,
            takeover: None,
            control,
            status,
            journal: served.board.serial.journal,
            reopen_at: None,
            missing: false,
            identifying: None,
            name: name.clone(),
        };
        let journal = board.journal.then(|| {
            tokio::spawn(crate::journal_output::run(board.fanout.clone()).in_current_span())
        });
        if board.journal {
            board.keep_open(&served);
        }
        loop {
            tokio::select! {
                // A connection's messages before its end: a writer hands the device back
                // before its task ends, and that must be seen first.
                biased;
                () = stopping(&mut shutdown) => break,
                Some(message) = from_clients.recv() => match message {
                    ToBoard::Claim { id, peer, answer } => board.claim(id, peer, answer).await,
                    ToBoard::Returned { id, uart } => board.returned(id, uart).await,
                },
                Some(done) = identified.recv() => board.identified(done),
                Some(ask) = asks.recv() => {
                    let served = served.latest(&mut config);
                    board.identify(ask, &served, &identified_tx).await;
                }
                next = accepted.recv() => {
                    let Some(newcomer) = next else { break };
                    let served = served.latest(&mut config);
                    board.seat.set_policy(served.policy());
                    board.admit(&served, newcomer, &to_board, &refusals).await;
                }
                Some(joined) = board.tasks.join_next_with_id() => {
                    let id = match joined {
                        Ok((_, id)) => id,
                        Err(e) => board.member_of_task(e.id()),
                    };
                    board.left(id).await;
                }
                () = crate::timer::sleep_until(board.close_at) => {
                    board.close_at = None;
                    if board.members.is_empty() {
                        board.device.close().await;
                    }
                }
                () = crate::timer::sleep_until(board.reopen_at) => {
                    board.reopen_at = None;
                    let served = served.latest(&mut config);
                    board.keep_open(&served);
                }
                failed = board.device.failed() => {
                    limited!(error, "device failures", "serial device {} failed: {failed}", served.board.serial.device.display());
                    board.device = Device::Closed;
                    board.device_gone(&served);
                }
            }
        }
        for a in acceptors {
            a.abort();
        }
        board.stop_all(StopRequest::Shutdown);
        // Writers hand the device back while they stop: keep taking their messages.
        let all_gone = async {
            loop {
                tokio::select! {
                    joined = board.tasks.join_next() => if joined.is_none() { break },
                    Some(message) = from_clients.recv() => {
                        if let ToBoard::Returned { uart: Some(uart), .. } = message {
                            drop(uart);
                        }
                        release(&board.control);
                    }
                }
            }
        };
        if tokio::time::timeout(STOP_TIMEOUT, all_gone).await.is_err() {
            tracing::warn!("connections did not stop in time; abandoning them");
            board.tasks.abort_all();
        }
        if let Some(task) = journal {
            task.abort();
        }
        if let Some(task) = board.identifying.take() {
            // The chip may be left in its bootloader: the release below resets it into its
            // application (after_disconnect = "run").
            task.abort();
        }
        board.device.close().await;
        release(&board.control);
        // The lines reach their safe state before the process (and its line request) ends.
        let settled = lock(&board.control).settled();
        if tokio::time::timeout(SETTLE_TIMEOUT, settled).await.is_err() {
            tracing::warn!("the control lines did not reach their safe state in time");
        }
    }
}

impl Board {
    /// A new connection: it watches from now on (the device is opened for the first one).
    async fn admit(
        &mut self,
        served: &Served,
        (stream, peer, kind): Accepted,
        to_board: &mpsc::Sender<ToBoard>,
        refusals: &Arc<Semaphore>,
    ) {
        if self.members.len() >= MAX_CLIENTS {
            let why = format!(
                "this board has {MAX_CLIENTS} connections already (the most it serves); try again when one closes"
            );
            refuse(stream, peer, why, refusals);
            return;
        }
        self.close_at = None;
        if self.members.is_empty()
            && matches!(self.device, Device::Idle { .. })
            && self.opened_with != Some(served.board.serial.line_settings())
        {
            // Open with nobody connected (after the last client, or for the journal), with
            // settings a reload has changed since.
            self.device.close().await;
        }
        if let Err(why) = self.open(served) {
            refuse(stream, peer, why, refusals);
            return;
        }
        if let Err(e) = tune_socket(&stream, served.network.keepalive) {
            limited!(
                warn,
                "failed socket options",
                "could not set TCP options for {peer}: {e}"
            );
        }
        let id = NEXT_CLIENT.fetch_add(1, Ordering::Relaxed);
        let heard = Heard::new();
        let (stop, stop_rx) = watch::channel(None);
        if kind == PortKind::Console {
            limited!(info, "clients connect", peer = %peer, "console reader {peer} connected");
            let task = self.tasks.spawn(
                read_console(
                    id,
                    stream,
                    peer,
                    greeting(served),
                    self.fanout.clone(),
                    stop_rx,
                )
                .in_current_span(),
            );
            self.add_member(id, peer, heard, stop, task.id());
            return;
        }
        let client = Client {
            id,
            peer,
            kind,
            tcp: stream,
            engine: (kind == PortKind::Rfc2217).then(Engine::new),
            view: ClientView::new(served.board.serial.line_settings()),
            out: Vec::new(),
            heard: heard.clone(),
            ignored: 0,
            accepted: Instant::now(),
        };
        let context = BoardContext {
            serial: served.board.serial.clone(),
            claim_wait: served.network.claim_wait,
            control: self.control.clone(),
            status: self.status.clone(),
            fanout: self.fanout.clone(),
            to_board: to_board.clone(),
        };
        limited!(
            info,
            "clients connect",
            session = id,
            peer = %peer,
            "client {peer} connected to the {kind} port; it watches until it sends something for the device"
        );
        let task = self.tasks.spawn(
            async move {
                let mut client = client;
                client.greet();
                crate::connection::serve(client, context, stop_rx).await;
                id
            }
            .in_current_span(),
        );
        self.add_member(id, peer, heard, stop, task.id());
    }

    fn add_member(
        &mut self,
        id: u64,
        peer: SocketAddr,
        heard: Heard,
        stop: watch::Sender<Option<StopRequest>>,
        task: tokio::task::Id,
    ) {
        self.members.insert(
            id,
            Member {
                peer,
                heard,
                stop,
                task,
            },
        );
        self.show();
    }

    /// Opens the device if it is closed; the reason it cannot be, with the fix, otherwise.
    fn open(&mut self, served: &Served) -> Result<(), String> {
        if !matches!(self.device, Device::Closed) {
            return Ok(());
        }
        let path = &served.board.serial.device;
        let settings = served.board.serial.line_settings();
        match SerialDevice::open(path, &settings) {
            Ok(uart) => {
                self.device = Device::idle(uart, &self.fanout);
                self.opened_with = Some(settings);
                if std::mem::take(&mut self.missing) {
                    tracing::info!(
                        "serial device {} is back; the board's output goes to the journal again",
                        path.display()
                    );
                }
                self.show();
                Ok(())
            }
            Err(e) => {
                self.status.set(Activity::DeviceUnusable {
                    device: path.display().to_string(),
                });
                Err(describe_open_error(path, &e))
            }
        }
    }

    /// A board whose output goes to the journal: its device open, or another try planned.
    fn keep_open(&mut self, served: &Served) {
        if !self.journal {
            return;
        }
        if let Err(why) = self.open(served) {
            if !std::mem::replace(&mut self.missing, true) {
                tracing::warn!(
                    "the board's output cannot go to the journal: {why}; trying again every second"
                );
            }
            self.reopen_at = Some(Instant::now() + REOPEN_EVERY);
        }
    }

    /// The device is closed after a failure: a journal board tries it again later.
    fn reopen_later(&mut self) {
        if self.journal && self.reopen_at.is_none() {
            self.reopen_at = Some(Instant::now() + REOPEN_EVERY);
        }
    }

    /// Client `id` wants to write.
    async fn claim(&mut self, id: u64, peer: SocketAddr, answer: oneshot::Sender<ClaimAnswer>) {
        if !self.members.contains_key(&id) {
            return;
        }
        if self.identifying.is_some() {
            // Seconds at most: the claimant asks again as it sends.
            let _ = answer.send(ClaimAnswer::Busy(Busy {
                by: SocketAddr::from(([0, 0, 0, 0], 0)),
                silent_for: Duration::ZERO,
                changing_hands: true,
            }));
            return;
        }
        let writer = self
            .seat
            .writer()
            .and_then(|(w, _)| self.members.get(&w))
            .map_or(WriterState::default(), |m| WriterState {
                silent_for: m.heard.silent_for(),
                leaving: m.heard.leaving(),
            });
        let silent = writer.silent_for;
        match self.seat.claim(id, peer, Instant::now(), writer) {
            Decision::Grant => self.grant(id, answer).await,
            Decision::After { from } => {
                // Its client has closed: end its linger now rather than make the newcomer
                // wait for it.
                if let Some(m) = self.members.get(&from) {
                    m.stop.send_replace(Some(StopRequest::HandOver));
                }
                self.takeover = Some((id, answer));
            }
            Decision::TakeOver { from } => {
                let old = self.members.get(&from).map(|m| m.peer);
                limited!(
                    info,
                    "takeovers",
                    session = id,
                    "client {peer} takes the board over from {} (silent for {:.0} s)",
                    old.map_or_else(|| "a client".to_string(), |p| p.to_string()),
                    silent.as_secs_f64()
                );
                if let Some(m) = self.members.get(&from) {
                    m.stop.send_replace(Some(StopRequest::HandOver));
                }
                self.takeover = Some((id, answer));
            }
            Decision::Busy(busy) => {
                let _ = answer.send(ClaimAnswer::Busy(busy));
            }
        }
    }

    /// Gives the device to client `id`, which the seat made the writer.
    async fn grant(&mut self, id: u64, answer: oneshot::Sender<ClaimAnswer>) {
        let uart = match self.device.take().await {
            Ok(uart) => uart,
            Err(why) => {
                let _ = answer.send(ClaimAnswer::Unusable(why));
                self.seat.released(id, Instant::now());
                return;
            }
        };
        if let Some(m) = self.members.get(&id) {
            // A stale hand-over request must not stop the new session.
            m.stop.send_if_modified(|s| {
                let stale = *s == Some(StopRequest::HandOver);
                if stale {
                    *s = None;
                }
                stale
            });
        }
        match answer.send(ClaimAnswer::Granted(uart)) {
            Ok(()) => self.device = Device::Lent,
            Err(ClaimAnswer::Granted(uart)) => {
                // The claimant went away meanwhile.
                self.seat.released(id, Instant::now());
                self.device = Device::idle(uart, &self.fanout);
            }
            Err(_) => {}
        }
    }

    /// Writer `id` stopped writing.
    async fn returned(&mut self, id: u64, uart: Option<SerialDevice>) {
        release(&self.control);
        let next = self.seat.released(id, Instant::now());
        let Some(uart) = uart else {
            self.device = Device::Closed;
            self.reopen_later();
            if let Some((_, answer)) = self.takeover.take() {
                let _ = answer.send(ClaimAnswer::Unusable(
                    "the serial device failed or disappeared".into(),
                ));
            }
            self.stop_all(StopRequest::DeviceGone);
            self.show();
            return;
        };
        self.device = Device::idle(uart, &self.fanout);
        match (next, self.takeover.take()) {
            (Some(n), Some((claimant, answer))) if n == claimant => self.grant(n, answer).await,
            (_, taken) => self.takeover = taken,
        }
        self.linger_if_alone();
        self.show();
    }

    /// Connection `id` is over.
    async fn left(&mut self, id: u64) {
        self.members.remove(&id);
        self.seat.left(id);
        if self.takeover.as_ref().is_some_and(|(c, _)| *c == id) {
            self.takeover = None;
        }
        if self.seat.writer().is_some_and(|(w, _)| w == id) {
            // It ended without handing the device back (its task failed): the device is
            // lost with it, and so is a takeover waiting for it.
            let now = Instant::now();
            if let Some(next) = self.seat.released(id, now) {
                self.seat.released(next, now);
            }
            if let Some((_, answer)) = self.takeover.take() {
                let _ = answer.send(ClaimAnswer::Unusable(
                    "the serial device was lost with the previous client; connect again".into(),
                ));
            }
            self.device = Device::Closed;
            self.reopen_later();
            release(&self.control);
        }
        self.linger_if_alone();
        self.show();
    }

    /// `esp-bridge identify`: the device lent to an identification, unless a client writes.
    async fn identify(&mut self, ask: Ask, served: &Served, done: &mpsc::Sender<Identified>) {
        let refused = if self.identifying.is_some() {
            Some("an identification of this board is under way".to_string())
        } else if let Some(m) = self.seat.writer().and_then(|(w, _)| self.members.get(&w)) {
            Some(format!(
                "client {} writes to this board; try again when it is done (identifying resets the chip)",
                m.peer
            ))
        } else if self.takeover.is_some() {
            Some("the board is changing hands between clients; try again in a moment".into())
        } else {
            self.open(served).err()
        };
        if let Some(why) = refused {
            let _ = ask.send(Err(why));
            return;
        }
        let mut uart = match self.device.take().await {
            Ok(uart) => uart,
            Err(why) => {
                let _ = ask.send(Err(why));
                return;
            }
        };
        self.device = Device::Lent;
        self.close_at = None;
        let control = self.control.clone();
        let settings = served.board.serial.line_settings();
        let done = done.clone();
        tracing::info!(
            "identifying the chip (esp-bridge identify): resetting it into its bootloader"
        );
        self.identifying = Some(tokio::spawn(
            async move {
                let result = crate::identify::identify(&mut uart, &control, &settings).await;
                let _ = done.send((result, uart, ask)).await;
            }
            .in_current_span(),
        ));
    }

    /// An identification is over: the device back to the watchers, the result kept and told.
    fn identified(&mut self, (result, uart, ask): Identified) {
        self.identifying = None;
        self.device = Device::idle(uart, &self.fanout);
        self.linger_if_alone();
        match &result {
            Ok(chip) => {
                tracing::info!("chip identified: {}", chip.describe());
                self.status.set_chip(chip.clone());
                if let Err(e) = crate::identify::save(&self.name, chip) {
                    tracing::warn!("could not keep the chip's identity across restarts: {e}");
                }
            }
            Err(why) => tracing::warn!("identifying the chip failed: {why}"),
        }
        let _ = ask.send(result);
        self.show();
    }

    /// With no client left, the device closes after [`DEVICE_LINGER`] (a journal board's stays
    /// open).
    fn linger_if_alone(&mut self) {
        if self.members.is_empty() && !self.journal && !matches!(self.device, Device::Closed) {
            self.close_at = Some(Instant::now() + DEVICE_LINGER);
        }
    }

    /// The member whose task this was (a task that panicked does not say).
    fn member_of_task(&self, task: tokio::task::Id) -> u64 {
        self.members
            .iter()
            .find(|(_, m)| m.task == task)
            .map_or(0, |(id, _)| *id)
    }

    fn device_gone(&mut self, served: &Served) {
        self.status.set(Activity::DeviceUnusable {
            device: served.board.serial.device.display().to_string(),
        });
        self.stop_all(StopRequest::DeviceGone);
        self.reopen_later();
    }

    fn stop_all(&self, why: StopRequest) {
        for m in self.members.values() {
            m.stop.send_replace(Some(why));
        }
    }

    /// The board's status when nobody writes (a writer's session sets its own).
    fn show(&self) {
        if self.seat.writer().is_some() {
            return;
        }
        match self.members.len() {
            0 => self.status.set(Activity::Idle),
            watchers => self.status.set(Activity::Watched { watchers }),
        }
    }
}

/// The board's serial device, while anyone is connected.
enum Device {
    Closed,
    /// Nobody writes: the idle reader holds it and feeds the watchers.
    Idle {
        stop: Option<oneshot::Sender<()>>,
        task: JoinHandle<io::Result<SerialDevice>>,
    },
    /// A writer's session has it.
    Lent,
}

impl Device {
    fn idle(uart: SerialDevice, fanout: &Fanout) -> Device {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(idle_read(uart, fanout.clone(), stopped).in_current_span());
        Device::Idle {
            stop: Some(stop),
            task,
        }
    }

    /// The device for a writer.
    async fn take(&mut self) -> Result<SerialDevice, String> {
        match std::mem::replace(self, Device::Closed) {
            Device::Idle { stop, task } => {
                if let Some(stop) = stop {
                    let _ = stop.send(());
                }
                match task.await {
                    Ok(Ok(uart)) => Ok(uart),
                    Ok(Err(e)) => Err(format!("the serial device failed: {e}")),
                    Err(e) => Err(format!("the serial device's reader failed: {e}")),
                }
            }
            Device::Closed => Err("the serial device is not open (it failed)".into()),
            Device::Lent => {
                *self = Device::Lent;
                Err("the serial device is in use".into())
            }
        }
    }

    /// Completes when the idle reader stops on its own: the device failed.
    async fn failed(&mut self) -> io::Error {
        let Device::Idle { task, .. } = self else {
            return std::future::pending().await;
        };
        match task.await {
            Ok(Err(e)) => e,
            Ok(Ok(_)) => io::Error::other("the reader stopped"),
            Err(e) => io::Error::other(e.to_string()),
        }
    }

    /// Closes the device if it is not lent.
    async fn close(&mut self) {
        if let Device::Idle { .. } = self {
            let _ = self.take().await;
        }
        if !matches!(self, Device::Lent) {
            *self = Device::Closed;
        }
    }
}

/// Reads the device while nobody writes, for the watchers; hands it back when told.
async fn idle_read(
    mut uart: SerialDevice,
    fanout: Fanout,
    mut stop: oneshot::Receiver<()>,
) -> io::Result<SerialDevice> {
    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => return Ok(uart),
            read = uart.read(&mut buf) => match read {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "end of file")),
                Ok(n) => fanout.publish(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            },
        }
    }
}

/// What a session of this board is served with: the shared settings and the board's own, as
/// the configuration says when the client arrives.
#[derive(Clone)]
struct Served {
    network: Network,
    board: BoardConfig,
}

impl Served {
    /// How claims on this board are decided.
    fn policy(&self) -> SeatPolicy {
        SeatPolicy {
            takeover_idle: self.network.takeover_idle,
            replace_active: self.network.second_client == SecondClient::Replace,
        }
    }

    fn of(name: &str, config: &Config) -> Served {
        let board = config.board(name).cloned().unwrap_or_else(|| BoardConfig {
            name: name.to_string(),
            ..Config::default().boards.remove(0)
        });
        Served {
            network: config.network.clone(),
            board,
        }
    }

    /// The latest configuration for this board: a reload applies from the next client. A
    /// board the new file no longer has keeps what it had (its sockets go at the next
    /// `esp-bridge apply`). The control lines are the ones opened at start, so their settings
    /// stay, and so does the device of a board whose lines are that device's own DTR/RTS
    /// (data on a new device with resets on the old one would be worse than either): those
    /// change at a restart, as the reload's warning says.
    fn latest(&mut self, config: &mut watch::Receiver<Config>) -> Served {
        let config = config.borrow_and_update();
        self.network = config.network.clone();
        if let Some(board) = config.board(&self.board.name) {
            let mut board = board.clone();
            board.control = self.board.control.clone();
            if board.control.backend == ControlBackend::Modem {
                board.serial.device = self.board.serial.device.clone();
            }
            self.board = board;
        }
        self.clone()
    }
}

fn release(control: &SharedControl) {
    if let Err(e) = lock(control).release() {
        tracing::error!("could not release the control lines: {e}");
    }
}

fn listening(listeners: &[Listener]) -> Vec<String> {
    listeners
        .iter()
        .filter_map(|(l, kind)| l.local_addr().ok().map(|a| format!("{a} ({kind})")))
        .collect()
}

type Accepted = (TcpStream, SocketAddr, PortKind);

async fn accept_loop(listener: TcpListener, kind: PortKind, tx: mpsc::Sender<Accepted>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if tx.send((stream, peer, kind)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                // Out of file descriptors or a connection reset before accept: transient.
                limited!(warn, "failed accepts", "accepting a connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// TCP_NODELAY (each keystroke and each esptool frame leaves at once) and keepalive with a
/// user timeout, so a peer that vanished without a FIN frees the port.
fn tune_socket(stream: &TcpStream, keepalive: Duration) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let sock = SockRef::from(stream);
    let interval = (keepalive / 3).max(Duration::from_secs(1));
    sock.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(keepalive)
            .with_interval(interval)
            .with_retries(3),
    )?;
    // Without this, a peer that vanished while we had unacknowledged data is retried for
    // about 15 minutes instead of the keepalive budget.
    sock.set_tcp_user_timeout(Some(keepalive + interval * 3))?;
    Ok(())
}

/// The console port's first line.
fn greeting(served: &Served) -> String {
    format!(
        "[esp-bridge] board {} ({}): what it printed, then live; read-only\n",
        served.board.name,
        served.board.serial.device.display()
    )
}

/// One reader of the board's console port, until it leaves or the board stops it.
async fn read_console(
    id: u64,
    stream: TcpStream,
    peer: SocketAddr,
    greeting: String,
    output: Fanout,
    mut stop: watch::Receiver<Option<StopRequest>>,
) -> u64 {
    let stopped = async move {
        loop {
            let request = *stop.borrow_and_update();
            match request {
                Some(StopRequest::Shutdown) => return "the service stops".to_string(),
                Some(StopRequest::DeviceGone) => {
                    return "the serial device failed or disappeared; connect again when it is back"
                        .to_string();
                }
                Some(StopRequest::HandOver) | None => {}
            }
            if stop.changed().await.is_err() {
                return "the service stops".to_string();
            }
        }
    };
    crate::console::serve_reader(stream, &greeting, &output, stopped).await;
    limited!(info, "console readers leave", "console reader {peer} left");
    id
}

/// Tells a newcomer why it is not served (bounded), and says it in the log. Past
/// [`MAX_REFUSALS`] refusals under way, a newcomer is closed without the explanation (a flood,
/// not a person).
fn refuse(stream: TcpStream, peer: SocketAddr, why: String, refusals: &Arc<Semaphore>) {
    limited!(warn, "clients not served", peer = %peer, "client {peer} not served: {why}");
    let Ok(permit) = Arc::clone(refusals).try_acquire_owned() else {
        return;
    };
    tokio::spawn(
        async move {
            let mut stream = stream;
            let text = format!("esp-bridge: {why}\r\n");
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                stream.write_all(text.as_bytes()).await?;
                stream.shutdown().await
            })
            .await;
            drop(permit);
        }
        .in_current_span(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn config(backend: &str, device: &str, baud: u32) -> Config {
        Config::parse(
            &format!(
                "[serial]\ndevice = \"{device}\"\nbaud = {baud}\n[control]\nbackend = \"{backend}\"\n"
            ),
            Path::new("test.toml"),
        )
        .expect("valid")
    }

    #[test]
    fn a_reload_moves_a_gpio_board_to_its_new_device_but_not_a_modem_board() {
        for (backend, kept) in [("gpio", false), ("modem", true)] {
            let (tx, mut rx) = watch::channel(config(backend, "/dev/ttyUSB0", 115_200));
            let mut served = Served::of("default", &rx.borrow_and_update());
            tx.send_replace(config(backend, "/dev/ttyUSB1", 230_400));
            let next = served.latest(&mut rx);
            let want = if kept { "/dev/ttyUSB0" } else { "/dev/ttyUSB1" };
            assert_eq!(next.board.serial.device, PathBuf::from(want), "{backend}");
            assert_eq!(
                next.board.serial.baud.0, 230_400,
                "{backend}: the rate applies"
            );
        }
        // Control settings stay those the lines were opened with.
        let (tx, mut rx) = watch::channel(config("gpio", "/dev/ttyUSB0", 115_200));
        let mut served = Served::of("default", &rx.borrow_and_update());
        tx.send_replace(config("none", "/dev/ttyUSB0", 115_200));
        assert_eq!(
            served.latest(&mut rx).board.control.backend,
            ControlBackend::Gpio
        );
    }
}
