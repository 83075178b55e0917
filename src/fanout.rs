//! A board's device output, handed to every watcher.
//!
//! Whoever reads the device (the writer's session, or the board's idle reader when nobody
//! writes) publishes each chunk here once. Each watcher has a bounded buffer of its own:
//! publishing never waits, so a watcher that does not keep up only loses output (counted, and
//! told to it), never slows the writer or the device. The board's history
//! ([`crate::history`]) is kept here too, fed by the same publish.

use crate::history::History;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::SystemTime;

/// The most device output held for one watcher that is not reading.
pub const WATCHER_BUFFER: usize = 32 * 1024;

#[derive(Default)]
struct Sink {
    id: u64,
    buf: VecDeque<u8>,
    /// Bytes dropped since the watcher last took its output.
    lost: u64,
    waker: Option<Waker>,
}

struct Inner {
    sinks: Vec<Sink>,
    next_id: u64,
    history: History,
}

/// One board's output fan-out; cheap to clone.
#[derive(Clone)]
pub struct Fanout {
    inner: Arc<Mutex<Inner>>,
}

/// What [`Subscription::poll_take`] handed over.
#[derive(Debug, PartialEq, Eq)]
pub struct Taken {
    /// Output that was dropped before the bytes taken now, because the buffer was full.
    pub lost: u64,
}

impl Fanout {
    /// A fan-out that keeps `history` bytes of the board's output.
    pub fn new(history: usize) -> Self {
        Fanout {
            inner: Arc::new(Mutex::new(Inner {
                sinks: Vec::new(),
                next_id: 0,
                history: History::new(history),
            })),
        }
    }

    /// The kept output, as stamped lines.
    pub fn history(&self) -> String {
        self.lock().history.render()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands `bytes` to every watcher, as much as its buffer takes.
    pub fn publish(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut inner = self.lock();
        inner.history.push(bytes, SystemTime::now());
        for sink in &mut inner.sinks {
            let room = WATCHER_BUFFER.saturating_sub(sink.buf.len());
            let take = room.min(bytes.len());
            sink.buf.extend(&bytes[..take]);
            let dropped = u64::try_from(bytes.len() - take).unwrap_or(u64::MAX);
            sink.lost = sink.lost.saturating_add(dropped);
            if let Some(w) = sink.waker.take() {
                w.wake();
            }
        }
    }

    /// A new watcher: it gets what is published from now on.
    pub fn subscribe(&self) -> Subscription {
        let mut inner = self.lock();
        Self::add_sink(&mut inner, self)
    }

    /// The kept output as stamped lines, and a new watcher that gets what is published after
    /// it: nothing missed or told twice between the two.
    pub fn subscribe_after_history(&self) -> (String, Subscription) {
        let mut inner = self.lock();
        let history = inner.history.render();
        (history, Self::add_sink(&mut inner, self))
    }

    fn add_sink(inner: &mut Inner, fanout: &Fanout) -> Subscription {
        let id = inner.next_id;
        inner.next_id = inner.next_id.wrapping_add(1);
        inner.sinks.push(Sink {
            id,
            ..Sink::default()
        });
        Subscription {
            fanout: fanout.clone(),
            id,
        }
    }

    /// How many watchers there are.
    #[cfg(test)]
    pub fn watchers(&self) -> usize {
        self.lock().sinks.len()
    }
}

/// One watcher's place in a [`Fanout`]; leaves it when dropped.
pub struct Subscription {
    fanout: Fanout,
    id: u64,
}

impl Subscription {
    /// Moves up to `max` bytes of output into `out`; pending while there is none.
    pub fn poll_take(&self, cx: &mut Context<'_>, out: &mut Vec<u8>, max: usize) -> Poll<Taken> {
        let mut inner = self.fanout.lock();
        let Some(sink) = inner.sinks.iter_mut().find(|s| s.id == self.id) else {
            return Poll::Pending;
        };
        if sink.buf.is_empty() && sink.lost == 0 {
            sink.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = sink.buf.len().min(max);
        out.extend(sink.buf.drain(..n));
        if sink.buf.is_empty() && sink.buf.capacity() > 4096 {
            // A burst is over: give the memory back rather than keep each watcher's peak.
            sink.buf.shrink_to(4096);
        }
        Poll::Ready(Taken {
            lost: std::mem::take(&mut sink.lost),
        })
    }

    /// Drops what is waiting (a watcher's PURGE of its receive buffer).
    pub fn clear(&self) {
        let mut inner = self.fanout.lock();
        if let Some(sink) = inner.sinks.iter_mut().find(|s| s.id == self.id) {
            sink.buf.clear();
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut inner = self.fanout.lock();
        inner.sinks.retain(|s| s.id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    fn take(s: &Subscription, max: usize) -> Option<(Vec<u8>, u64)> {
        let mut cx = Context::from_waker(Waker::noop());
        let mut out = Vec::new();
        match s.poll_take(&mut cx, &mut out, max) {
            Poll::Ready(t) => Some((out, t.lost)),
            Poll::Pending => None,
        }
    }

    #[test]
    fn every_watcher_gets_every_byte_in_order() {
        let f = Fanout::new(0);
        let (a, b) = (f.subscribe(), f.subscribe());
        f.publish(b"boot: ");
        f.publish(b"hello\r\n");
        for s in [&a, &b] {
            assert_eq!(take(s, 1 << 20), Some((b"boot: hello\r\n".to_vec(), 0)));
            assert_eq!(take(s, 1 << 20), None);
        }
        assert_eq!(f.watchers(), 2);
        drop(a);
        assert_eq!(f.watchers(), 1);
    }

    #[test]
    fn a_watcher_that_does_not_read_loses_output_counted_and_bounded() {
        let f = Fanout::new(0);
        let (slow, fast) = (f.subscribe(), f.subscribe());
        let chunk = vec![7u8; 1000];
        let mut got = 0;
        for _ in 0..100 {
            f.publish(&chunk);
            got += take(&fast, usize::MAX).map_or(0, |(d, lost)| {
                assert_eq!(lost, 0);
                d.len()
            });
        }
        assert_eq!(got, 100_000, "the reading watcher lost nothing");
        let (data, lost) = take(&slow, usize::MAX).expect("output");
        assert_eq!(data.len(), WATCHER_BUFFER);
        assert_eq!(lost, 100_000 - WATCHER_BUFFER as u64);
        assert_eq!(take(&slow, usize::MAX), None, "the loss is told once");
    }

    #[test]
    fn the_history_keeps_what_was_published_while_nobody_watched() {
        let f = Fanout::new(4096);
        f.publish(b"I (120) boot: Loaded app\r\n");
        let s = f.subscribe();
        f.publish(b"tick\r\n");
        let text = f.history();
        assert!(text.contains(" I (120) boot: Loaded app\n"), "{text}");
        assert!(text.ends_with(" tick\n"), "{text}");
        assert_eq!(take(&s, 100), Some((b"tick\r\n".to_vec(), 0)));
        let (kept, late) = f.subscribe_after_history();
        assert!(kept.ends_with(" tick\n"), "{kept}");
        assert_eq!(
            take(&late, 100),
            None,
            "what the history told is not told again"
        );
        f.publish(b"next\r\n");
        assert_eq!(take(&late, 100), Some((b"next\r\n".to_vec(), 0)));
    }

    #[test]
    fn a_late_watcher_gets_only_what_follows() {
        let f = Fanout::new(0);
        f.publish(b"before");
        let s = f.subscribe();
        assert_eq!(take(&s, 10), None);
        f.publish(b"after it came");
        assert_eq!(take(&s, 5), Some((b"after".to_vec(), 0)));
        s.clear();
        assert_eq!(take(&s, 100), None);
    }
}
