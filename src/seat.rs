//! Who writes to a board. Every connection watches; one at a time writes. A client claims the
//! board when it first sends something that would reach the chip (data, or a reset); the
//! claim is granted when nobody writes, or when the writer has been silent for
//! `takeover_idle_secs` (with `second_client = "replace"`: whatever the writer does). A writer
//! keeps the board through its first [`PROTECTED`] seconds, and takeovers are spaced at least
//! [`TAKEOVER_SPACING`] apart, so two clients cannot take it from each other in a loop.
//!
//! Pure policy: time comes in, decisions go out; the bridge carries them out.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::time::Instant;

/// When a client last sent anything, and whether it is on its way out; shared by its
/// connection (which notes both) and the bridge (which asks how long a writer has been silent,
/// and whether a claimant only has to wait for it to finish).
#[derive(Debug, Clone, Default)]
pub struct Heard(Arc<HeardInner>);

#[derive(Debug, Default)]
struct HeardInner {
    last: AtomicU64,
    leaving: AtomicBool,
}

/// The clock [`Heard`] counts from, in milliseconds.
fn epoch() -> std::time::Instant {
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

fn millis_since_epoch() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl Heard {
    /// A client heard from now.
    pub fn new() -> Self {
        let heard = Heard::default();
        heard.now();
        heard
    }

    /// The client just sent something.
    pub fn now(&self) {
        self.0.last.store(millis_since_epoch(), Ordering::Relaxed);
    }

    /// How long the client has sent nothing.
    pub fn silent_for(&self) -> Duration {
        let last = self.0.last.load(Ordering::Relaxed);
        Duration::from_millis(millis_since_epoch().saturating_sub(last))
    }

    /// Whether the client has closed (its session is handing over its last bytes).
    pub fn leaving(&self) -> bool {
        self.0.leaving.load(Ordering::Relaxed)
    }

    pub fn set_leaving(&self, leaving: bool) {
        self.0.leaving.store(leaving, Ordering::Relaxed);
    }
}

/// How long a new writer cannot lose the board, however quiet it is.
pub const PROTECTED: Duration = Duration::from_secs(5);
/// The shortest time between two takeovers of one board.
pub const TAKEOVER_SPACING: Duration = Duration::from_secs(1);

/// How claims are decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeatPolicy {
    /// A writer silent this long may be replaced by a claimant.
    pub takeover_idle: Duration,
    /// Claimants take over even from an active writer (`second_client = "replace"`).
    pub replace_active: bool,
}

#[derive(Debug, Clone, Copy)]
struct Holder {
    id: u64,
    peer: SocketAddr,
    since: Instant,
}

/// What a claim gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The claimant writes from now on.
    Grant,
    /// The writer `from` is to become a watcher; the claimant writes once it has.
    TakeOver { from: u64 },
    /// The writer `from` is finishing (its client closed): the claimant writes once it has.
    After { from: u64 },
    /// Someone else writes; try again later.
    Busy(Busy),
}

/// The writer's client as a claim finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriterState {
    pub silent_for: Duration,
    /// Its client closed; its session is finishing.
    pub leaving: bool,
}

/// Who holds the board, for the claimant's message and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy {
    pub by: SocketAddr,
    /// How long the writer has been silent.
    pub silent_for: Duration,
    /// The board is changing hands (a writer finishing, a takeover): worth asking again in a
    /// moment rather than giving up the input that claimed it.
    pub changing_hands: bool,
}

/// One board's seat.
#[derive(Debug)]
pub struct Seat {
    policy: SeatPolicy,
    writer: Option<Holder>,
    /// A takeover under way: the claimant waits for the old writer to hand over.
    next: Option<Holder>,
    last_takeover: Option<Instant>,
}

impl Seat {
    pub fn new(policy: SeatPolicy) -> Self {
        Seat {
            policy,
            writer: None,
            next: None,
            last_takeover: None,
        }
    }

    /// A reload changed the policy: it applies from the next claim.
    pub fn set_policy(&mut self, policy: SeatPolicy) {
        self.policy = policy;
    }

    /// The writer now, if any.
    pub fn writer(&self) -> Option<(u64, SocketAddr)> {
        self.writer.map(|h| (h.id, h.peer))
    }

    /// Client `id` claims the board. `writer` is how the current writer's client is: how long
    /// it has sent nothing, and whether it has closed.
    pub fn claim(
        &mut self,
        id: u64,
        peer: SocketAddr,
        now: Instant,
        writer: WriterState,
    ) -> Decision {
        let writer_silent_for = writer.silent_for;
        let claimant = Holder {
            id,
            peer,
            since: now,
        };
        let Some(holder) = self.writer else {
            self.writer = Some(claimant);
            return Decision::Grant;
        };
        if holder.id == id {
            return Decision::Grant;
        }
        let busy = |changing_hands| {
            Decision::Busy(Busy {
                by: holder.peer,
                silent_for: writer_silent_for,
                changing_hands,
            })
        };
        if self.next.is_some() {
            return busy(true);
        }
        if writer.leaving {
            // What `idf.py flash monitor` and CI scripts do: connect again as the last
            // client closes. Not a takeover: nobody loses the board.
            self.next = Some(claimant);
            return Decision::After { from: holder.id };
        }
        let quiet = writer_silent_for >= self.policy.takeover_idle || self.policy.replace_active;
        let settled = now.saturating_duration_since(holder.since) >= PROTECTED;
        let spaced = self
            .last_takeover
            .is_none_or(|t| now.saturating_duration_since(t) >= TAKEOVER_SPACING);
        if quiet && settled && spaced {
            self.next = Some(claimant);
            self.last_takeover = Some(now);
            return Decision::TakeOver { from: holder.id };
        }
        busy(false)
    }

    /// The writer `id` stopped writing (it left, or handed over). Returns the client that
    /// writes next, if a takeover was waiting for this.
    pub fn released(&mut self, id: u64, now: Instant) -> Option<u64> {
        if self.writer.is_some_and(|w| w.id == id) {
            self.writer = self.next.take().map(|h| Holder { since: now, ..h });
            return self.writer.map(|h| h.id);
        }
        None
    }

    /// Client `id` left; if it was waiting to take over, the takeover is off (the old writer
    /// becomes a watcher all the same, and the board is free).
    pub fn left(&mut self, id: u64) {
        if self.next.is_some_and(|h| h.id == id) {
            self.next = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], n))
    }

    fn seat(replace_active: bool) -> Seat {
        Seat::new(SeatPolicy {
            takeover_idle: Duration::from_secs(30),
            replace_active,
        })
    }

    const QUIET: WriterState = WriterState {
        silent_for: Duration::from_secs(60),
        leaving: false,
    };
    const TALKING: WriterState = WriterState {
        silent_for: Duration::ZERO,
        leaving: false,
    };

    #[test]
    fn the_first_claim_is_granted_and_a_second_waits_while_the_writer_is_active() {
        let t = Instant::now();
        let mut s = seat(false);
        assert_eq!(s.claim(1, peer(1), t, TALKING), Decision::Grant);
        assert_eq!(
            s.claim(1, peer(1), t, TALKING),
            Decision::Grant,
            "its own again"
        );
        let later = t + Duration::from_secs(100);
        assert_eq!(
            s.claim(2, peer(2), later, TALKING),
            Decision::Busy(Busy {
                by: peer(1),
                silent_for: Duration::ZERO,
                changing_hands: false,
            })
        );
        assert_eq!(s.released(1, later), None);
        assert_eq!(s.claim(2, peer(2), later, TALKING), Decision::Grant);
        assert_eq!(s.writer(), Some((2, peer(2))));
    }

    #[test]
    fn a_silent_writer_is_taken_over_once_protected_time_is_past() {
        let t = Instant::now();
        let mut s = seat(false);
        s.claim(1, peer(1), t, TALKING);
        assert!(
            matches!(
                s.claim(2, peer(2), t + Duration::from_secs(1), QUIET),
                Decision::Busy(_)
            ),
            "a new writer keeps the board through its first seconds"
        );
        let later = t + PROTECTED;
        assert_eq!(
            s.claim(2, peer(2), later, QUIET),
            Decision::TakeOver { from: 1 }
        );
        assert!(
            matches!(
                s.claim(3, peer(3), later, QUIET),
                Decision::Busy(Busy {
                    changing_hands: true,
                    ..
                })
            ),
            "one takeover at a time"
        );
        assert_eq!(s.released(1, later), Some(2));
        assert_eq!(s.writer(), Some((2, peer(2))));
    }

    #[test]
    fn two_clients_taking_the_board_from_each_other_are_slowed_to_the_spacing() {
        let t = Instant::now();
        let mut s = seat(true);
        s.claim(1, peer(1), t, TALKING);
        let mut now = t;
        let mut takeovers = 0;
        let mut holder = 1;
        // Each tries every millisecond for 20 s.
        for _ in 0..20_000 {
            now += Duration::from_millis(1);
            let other = 3 - holder;
            if let Decision::TakeOver { from } = s.claim(other, peer(other as u16), now, TALKING) {
                assert_eq!(s.released(from, now), Some(other));
                holder = other;
                takeovers += 1;
            }
        }
        // Each new writer is protected for PROTECTED: 20 s hold at most 4 takeovers.
        assert!((1..=4).contains(&takeovers), "{takeovers} takeovers");
    }

    #[test]
    fn a_claim_while_the_writer_is_leaving_gets_the_board_when_it_is_gone() {
        let t = Instant::now();
        let mut s = seat(false);
        s.claim(1, peer(1), t, TALKING);
        let leaving = WriterState {
            leaving: true,
            ..TALKING
        };
        // Even within the writer's protected time: it is going anyway.
        assert_eq!(s.claim(2, peer(2), t, leaving), Decision::After { from: 1 });
        assert_eq!(s.released(1, t), Some(2));
    }

    #[test]
    fn a_claimant_that_leaves_during_the_takeover_leaves_the_board_free() {
        let t = Instant::now() + PROTECTED;
        let mut s = seat(false);
        s.claim(1, peer(1), t - PROTECTED, TALKING);
        assert_eq!(
            s.claim(2, peer(2), t, QUIET),
            Decision::TakeOver { from: 1 }
        );
        s.left(2);
        assert_eq!(s.released(1, t), None);
        assert_eq!(s.writer(), None);
    }
}
