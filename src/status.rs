//! What each board is doing, kept in one place: sessions and bridges write it, the supervisor
//! reads it for systemd's one-line status, and nobody below the supervisor talks to systemd.

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::sync::watch;

/// A board's activity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Activity {
    /// Waiting for a client.
    Idle,
    /// A client is served.
    Serving { peer: SocketAddr, baud: u32 },
    /// The last client could not be served: the device is missing or unusable.
    DeviceUnusable { device: String },
}

/// One board's entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoardStatus {
    /// The board's name (`[[board]] name`; "default" for a file with one board).
    pub name: String,
    /// Where clients connect, for the idle line ("127.0.0.1:2217 (RFC 2217)").
    pub listening: Vec<String>,
    pub activity: Activity,
}

impl BoardStatus {
    /// The one-line summary systemd shows (`systemctl status`).
    pub fn line(&self) -> String {
        match &self.activity {
            Activity::Idle => format!(
                "idle: waiting for a client on {}",
                self.listening.join(", ")
            ),
            Activity::Serving { peer, baud } => {
                format!("serving {} at {baud} baud", peer.ip())
            }
            Activity::DeviceUnusable { device } => {
                format!("device missing or unusable: {device}")
            }
        }
    }
}

/// Every board's status; cheap to clone, shared by the writers.
#[derive(Debug, Clone)]
pub struct StatusBook {
    boards: Arc<watch::Sender<Vec<BoardStatus>>>,
}

impl Default for StatusBook {
    fn default() -> Self {
        Self::new()
    }
}

impl StatusBook {
    pub fn new() -> Self {
        StatusBook {
            boards: Arc::new(watch::Sender::new(Vec::new())),
        }
    }

    /// Adds a board and returns the handle its bridge and sessions write through.
    pub fn add(&self, status: BoardStatus) -> StatusHandle {
        let mut index = 0;
        self.boards.send_modify(|boards| {
            index = boards.len();
            boards.push(status);
        });
        StatusHandle {
            book: self.clone(),
            index,
        }
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<Vec<BoardStatus>> {
        self.boards.subscribe()
    }

    /// The one-line summary of all boards.
    pub fn line(&self) -> String {
        summary(&self.boards.borrow())
    }

    /// A line per board, `NAME<TAB>what it is doing`: the answer to `esp-bridge status`.
    pub fn report(&self) -> String {
        self.boards
            .borrow()
            .iter()
            .map(|b| format!("{}\t{}\n", b.name, b.line()))
            .collect()
    }
}

/// The one-line summary of `boards`.
pub fn summary(boards: &[BoardStatus]) -> String {
    boards
        .iter()
        .map(BoardStatus::line)
        .collect::<Vec<_>>()
        .join("; ")
}

/// One board's writer.
#[derive(Debug, Clone)]
pub struct StatusHandle {
    book: StatusBook,
    index: usize,
}

impl StatusHandle {
    /// Sets the board's activity; receivers are woken only when it changed.
    pub fn set(&self, activity: Activity) {
        self.book
            .boards
            .send_if_modified(|boards| match boards.get_mut(self.index) {
                Some(b) if b.activity != activity => {
                    b.activity = activity;
                    true
                }
                _ => false,
            });
    }

    /// The served client's baud rate changed.
    pub fn set_baud(&self, new: u32) {
        self.book.boards.send_if_modified(|boards| {
            match boards.get_mut(self.index).map(|b| &mut b.activity) {
                Some(Activity::Serving { baud, .. }) if *baud != new => {
                    *baud = new;
                    true
                }
                _ => false,
            }
        });
    }
}
