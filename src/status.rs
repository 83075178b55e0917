//! What each board is doing, kept in one place: sessions and bridges write it, the supervisor
//! reads it for systemd's one-line status, and nobody below the supervisor talks to systemd.

use crate::control::{ResetKind, ResetLog};
use crate::fanout::Fanout;
use crate::identify::{Ask, Identity};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// A board's activity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Activity {
    /// Waiting for a client.
    Idle,
    /// Clients watch the board's output; nobody writes.
    Watched { watchers: usize },
    /// A client writes, on the port of this kind ("RFC 2217", "ESP raw").
    Serving {
        peer: SocketAddr,
        port: &'static str,
        baud: u32,
    },
    /// The last client could not be served: the device is missing or unusable.
    DeviceUnusable { device: String },
}

/// One board's entry.
#[derive(Debug, Clone)]
pub struct BoardStatus {
    /// The board's name (`[[board]] name`; "default" for a file with one board).
    pub name: String,
    /// Where clients connect, for the idle line ("127.0.0.1:2217 (RFC 2217)").
    pub listening: Vec<String>,
    /// The serial device as configured.
    pub device: String,
    pub activity: Activity,
    /// When `activity` began.
    pub since: Instant,
    /// The board's reset engine's record; `None` where resets are not planned here (no
    /// control lines, or `mode = "direct"`).
    pub resets: Option<ResetLog>,
    /// Its chip, once identified (`esp-bridge identify`; kept across restarts).
    pub chip: Option<Identity>,
}

impl BoardStatus {
    /// A board that has just started: idle.
    pub fn new(
        name: &str,
        listening: Vec<String>,
        device: String,
        resets: Option<ResetLog>,
    ) -> Self {
        BoardStatus {
            name: name.to_string(),
            listening,
            device,
            activity: Activity::Idle,
            since: Instant::now(),
            resets,
            chip: None,
        }
    }

    /// `esp-bridge status`'s lines for this board: the one-line summary after the name, then
    /// how long that has been so, the device and the last reset, indented.
    pub fn report(&self, now: Instant) -> String {
        let mut out = format!("{}\t{}", self.name, self.line());
        let _ = write!(
            out,
            " (for {})",
            ago(now.saturating_duration_since(self.since))
        );
        if let Activity::Serving { port, .. } = &self.activity {
            let _ = write!(out, " on the {port} port");
        }
        out.push('\n');
        let present = if Path::new(&self.device).exists() {
            "present"
        } else {
            "missing"
        };
        let _ = writeln!(out, "\tdevice {}: {present}", self.device);
        let reset = match self.resets.as_ref().map(ResetLog::last) {
            None => "not tracked (no control lines, or mode = \"direct\")".to_string(),
            Some(None) => "none since the service started".to_string(),
            Some(Some((at, kind))) => {
                let what = match kind {
                    ResetKind::Bootloader => "into the bootloader",
                    ResetKind::Application => "into the application",
                };
                format!("{what}, {} ago", ago(now.saturating_duration_since(at)))
            }
        };
        let _ = writeln!(out, "\tlast reset: {reset}");
        if let Some(chip) = &self.chip {
            let when = std::time::UNIX_EPOCH + Duration::from_secs(chip.at);
            let _ = writeln!(
                out,
                "\tchip: {} (identified {} UTC)",
                chip.describe(),
                &crate::history::utc(when)[..16]
            );
        }
        out
    }

    /// The one-line summary systemd shows (`systemctl status`).
    pub fn line(&self) -> String {
        match &self.activity {
            Activity::Idle => format!(
                "idle: waiting for a client on {}",
                self.listening.join(", ")
            ),
            Activity::Watched { watchers } => {
                format!("watched by {watchers} client(s); nobody writes")
            }
            Activity::Serving { peer, baud, .. } => {
                format!("serving {peer} at {baud} baud")
            }
            Activity::DeviceUnusable { device } => {
                format!("device missing or unusable: {device}")
            }
        }
    }
}

/// Every board's status, where its output can be read (`esp-bridge log`) and where to ask
/// for its chip's identity; cheap to clone, shared by the writers.
#[derive(Clone)]
pub struct StatusBook {
    boards: Arc<watch::Sender<Vec<BoardStatus>>>,
    links: Arc<Mutex<BTreeMap<String, BoardLinks>>>,
}

/// What the control socket reaches of one board.
#[derive(Clone)]
struct BoardLinks {
    output: Fanout,
    identify: mpsc::Sender<Ask>,
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
            links: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    /// Makes a board's output readable, and its chip identifiable, by name.
    pub fn add_links(&self, name: &str, output: Fanout, identify: mpsc::Sender<Ask>) {
        self.links
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string(), BoardLinks { output, identify });
    }

    fn links(&self, name: Option<&str>) -> Result<BoardLinks, String> {
        let links = self.links.lock().unwrap_or_else(PoisonError::into_inner);
        let names = || links.keys().cloned().collect::<Vec<_>>().join(", ");
        match name {
            Some(n) => links
                .get(n)
                .cloned()
                .ok_or_else(|| format!("no board named {n:?}; the boards are: {}", names())),
            None if links.len() == 1 => links
                .values()
                .next()
                .cloned()
                .ok_or_else(|| "no boards".to_string()),
            None => Err(format!("name the board: {}", names())),
        }
    }

    /// A board's output, by name; with no name, the only board's.
    pub fn output(&self, name: Option<&str>) -> Result<Fanout, String> {
        self.links(name).map(|l| l.output)
    }

    /// Where to ask for a board's identification, by name; with no name, the only board's.
    pub fn identify(&self, name: Option<&str>) -> Result<mpsc::Sender<Ask>, String> {
        self.links(name).map(|l| l.identify)
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

    /// Per board a line `NAME<TAB>what it is doing (for how long)` and indented details: the
    /// answer to `esp-bridge status`.
    pub fn report(&self) -> String {
        let now = Instant::now();
        self.boards.borrow().iter().map(|b| b.report(now)).collect()
    }
}

/// The one-line summary of `boards`, each named where there are several.
pub fn summary(boards: &[BoardStatus]) -> String {
    match boards {
        [one] => one.line(),
        _ => boards
            .iter()
            .map(|b| format!("{}: {}", b.name, b.line()))
            .collect::<Vec<_>>()
            .join("; "),
    }
}

/// "3 s", "4 min 5 s", "2 h 10 min", "3 d 4 h".
fn ago(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        3600..86400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86400, s % 86400 / 3600),
    }
}

/// One board's writer.
#[derive(Clone)]
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
                    b.since = Instant::now();
                    true
                }
                _ => false,
            });
    }

    /// The board's chip, as identified.
    pub fn set_chip(&self, chip: Identity) {
        self.book.boards.send_modify(|boards| {
            if let Some(b) = boards.get_mut(self.index) {
                b.chip = Some(chip);
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn board(name: &str, resets: Option<ResetLog>) -> BoardStatus {
        BoardStatus::new(
            name,
            vec!["0.0.0.0:2217 (RFC 2217)".into()],
            "/nonexistent/tty".into(),
            resets,
        )
    }

    #[test]
    fn the_systemd_line_names_the_boards_only_when_there_are_several() {
        let one = [board("default", None)];
        assert_eq!(
            summary(&one),
            "idle: waiting for a client on 0.0.0.0:2217 (RFC 2217)"
        );
        let mut two = [board("lab1", None), board("lab2", None)];
        two[1].activity = Activity::Serving {
            peer: "10.0.0.5:50000".parse().expect("address"),
            port: "ESP raw",
            baud: 921_600,
        };
        assert_eq!(
            summary(&two),
            "lab1: idle: waiting for a client on 0.0.0.0:2217 (RFC 2217); lab2: serving 10.0.0.5:50000 at 921600 baud"
        );
    }

    #[test]
    fn the_report_says_for_how_long_the_device_and_the_last_reset() {
        let resets = ResetLog::default();
        let mut b = board("lab1", Some(resets.clone()));
        let start = b.since;
        b.activity = Activity::Serving {
            peer: "10.0.0.5:50000".parse().expect("address"),
            port: "ESP raw",
            baud: 921_600,
        };
        let text = b.report(start + Duration::from_secs(125));
        assert_eq!(
            text,
            "lab1\tserving 10.0.0.5:50000 at 921600 baud (for 2 min 5 s) on the ESP raw port\n\
             \tdevice /nonexistent/tty: missing\n\
             \tlast reset: none since the service started\n"
        );
        resets.record(ResetKind::Bootloader);
        let (at, _) = resets.last().expect("recorded");
        let text = b.report(at + Duration::from_secs(3 * 3600 + 60));
        assert!(
            text.ends_with("\tlast reset: into the bootloader, 3 h 1 min ago\n"),
            "{text}"
        );
        assert!(
            board("x", None)
                .report(Instant::now())
                .contains("not tracked")
        );
    }
}
