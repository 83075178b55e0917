//! A board's output in the journal (`journal = true` in its `[serial]`): every line it prints
//! becomes one journal entry in the board's span, so `journalctl -u esp-bridge BOARD=lab1
//! --since 03:00` answers "what did it print at 3 am". Entries carry `SERIAL_OUTPUT=true`,
//! which tells them from the service's own lines about the board.
//!
//! Bounded like everything a board can make the service log: at most [`LINES_PER_WINDOW`]
//! lines per [`WINDOW`] (a board printing in a tight loop, or binary data, would otherwise
//! fill the SD card and push the service's own lines out of journald's rate limit); past
//! that the lines are counted, and one entry says how many were left out.

use crate::fanout::Fanout;
use crate::history::Lines;
use crate::log_limit::limited;
use std::future::poll_fn;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// The window the line budget is counted in.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Lines let through per window: 100 a second on average, far above what an application's
/// log prints, below journald's default limit for a service (10000 per 30 s).
pub const LINES_PER_WINDOW: u32 = 1000;

/// The most output turned into lines at once.
const TAKE: usize = 16 * 1024;

/// The line budget; pure, the time comes in.
#[derive(Debug, Default)]
struct Budget {
    started: Option<Instant>,
    passed: u32,
    left_out: u64,
}

impl Budget {
    /// Whether a line may be logged at `now`; when a window with lines left out is over, the
    /// count of them comes first.
    fn allow(&mut self, now: Instant) -> (bool, Option<u64>) {
        let mut said = None;
        if self
            .started
            .is_none_or(|s| now.saturating_duration_since(s) >= WINDOW)
        {
            said = (self.left_out > 0).then_some(self.left_out);
            *self = Budget {
                started: Some(now),
                ..Budget::default()
            };
        }
        if self.passed < LINES_PER_WINDOW {
            self.passed += 1;
            (true, said)
        } else {
            self.left_out = self.left_out.saturating_add(1);
            (false, said)
        }
    }
}

/// Logs the board's output, line by line, until the task is dropped (the bridge owns it).
/// Runs in the board's span, which gives the entries their `BOARD=` field.
pub async fn run(output: Fanout) {
    let sub = output.subscribe();
    let mut lines = Lines::default();
    let mut budget = Budget::default();
    let mut chunk = Vec::new();
    loop {
        let taken = poll_fn(|cx| sub.poll_take(cx, &mut chunk, TAKE)).await;
        if taken.lost > 0 {
            limited!(
                warn,
                "board output not logged",
                "{} bytes of the board's output were not logged: the journal did not keep up",
                taken.lost
            );
        }
        let now = Instant::now();
        lines.feed_each(&chunk, SystemTime::now(), |_, text| {
            let (allowed, left_out) = budget.allow(now);
            if let Some(n) = left_out {
                tracing::warn!(
                    "{n} lines of the board's output were left out of the journal (at most {LINES_PER_WINDOW} per {} s); `esp-bridge log` shows the most recent",
                    WINDOW.as_secs()
                );
            }
            if allowed {
                tracing::info!(serial_output = true, "{text}");
            }
        });
        chunk.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_lets_a_window_s_lines_through_then_counts_and_says_the_rest_once() {
        let t0 = Instant::now();
        let mut b = Budget::default();
        for _ in 0..LINES_PER_WINDOW {
            assert_eq!(b.allow(t0), (true, None));
        }
        for i in 0..500 {
            assert_eq!(
                b.allow(t0 + Duration::from_millis(i)),
                (false, None),
                "line {i}"
            );
        }
        assert_eq!(b.allow(t0 + WINDOW), (true, Some(500)));
        assert_eq!(b.allow(t0 + WINDOW), (true, None), "said once");
        // A quiet window says nothing.
        assert_eq!(b.allow(t0 + WINDOW * 3), (true, None));
    }
}
