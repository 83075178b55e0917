//! Rate limits for the log lines a network peer can trigger (a refused connection, an invalid
//! request, a takeover, a reset). Each kind of line may come [`BURST`] times per [`WINDOW`];
//! past that it is only counted, and when the window is over one line says how many were
//! left out ("... and 99999 more like it in 10 s"). So a flood can neither fill the journal
//! (and wear the SD card) nor push the lines that matter out of journald's own rate limit.
//!
//! Use [`limited!`] at the call site; the supervisor calls [`flush`] every
//! second so that the count of a flood that stopped is still said.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines of one kind let through per window.
pub const BURST: u32 = 10;
/// The window after which a kind may log again, and its count of left-out lines is said.
pub const WINDOW: Duration = Duration::from_secs(10);

/// One kind of line: a call site of [`limited!`].
pub struct Site {
    what: &'static str,
    state: Mutex<Window>,
}

#[derive(Default)]
struct Window {
    started: Option<Instant>,
    passed: u32,
    left_out: u64,
    registered: bool,
}

/// The sites that have logged, for [`flush`].
static SITES: Mutex<Vec<&'static Site>> = Mutex::new(Vec::new());

impl Site {
    /// `what` names the kind of line in the summary ("refused connections").
    pub const fn new(what: &'static str) -> Site {
        Site {
            what,
            state: Mutex::new(Window {
                started: None,
                passed: 0,
                left_out: 0,
                registered: false,
            }),
        }
    }

    /// Whether a line of this kind may be logged now.
    pub fn allow(&'static self) -> bool {
        let now = Instant::now();
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !w.registered {
            w.registered = true;
            SITES.lock().unwrap_or_else(|e| e.into_inner()).push(self);
        }
        self.roll(&mut w, now);
        if w.started.is_none() {
            w.started = Some(now);
        }
        if w.passed < BURST {
            w.passed += 1;
            true
        } else {
            w.left_out = w.left_out.saturating_add(1);
            false
        }
    }

    /// Ends the window if it is over, saying how many lines it left out.
    fn roll(&self, w: &mut Window, now: Instant) {
        let Some(started) = w.started else { return };
        let elapsed = now.saturating_duration_since(started);
        if elapsed < WINDOW {
            return;
        }
        if w.left_out > 0 {
            tracing::warn!(
                "... and {} more {} like it in {} s (at most {BURST} logged per {} s)",
                w.left_out,
                self.what,
                elapsed.as_secs(),
                WINDOW.as_secs()
            );
        }
        *w = Window {
            registered: true,
            ..Window::default()
        };
    }
}

/// Says the counts of windows that are over (the supervisor calls it every second).
pub fn flush() {
    let now = Instant::now();
    let sites: Vec<&'static Site> = SITES.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for site in sites {
        let mut w = site.state.lock().unwrap_or_else(|e| e.into_inner());
        site.roll(&mut w, now);
    }
}

/// Logs at `level` (a tracing macro name: `warn`, `info`, ...) unless lines of this call site
/// are over their rate: `limited!(warn, "refused connections", "refused client {peer}")`.
macro_rules! limited {
    ($level:ident, $what:expr, $($arg:tt)+) => {{
        static SITE: $crate::log_limit::Site = $crate::log_limit::Site::new($what);
        if SITE.allow() {
            tracing::$level!($($arg)+);
        }
    }};
}
pub(crate) use limited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_lines_are_counted_until_the_window_ends() {
        static SITE: Site = Site::new("test lines");
        let passed = (0..1000).filter(|_| SITE.allow()).count();
        assert_eq!(passed, BURST as usize);
        let w = SITE.state.lock().unwrap();
        assert_eq!(w.left_out, 1000 - u64::from(BURST));
    }

    #[test]
    fn a_new_window_lets_a_burst_through_again_and_clears_the_count() {
        static SITE: Site = Site::new("other test lines");
        for _ in 0..50 {
            SITE.allow();
        }
        {
            let mut w = SITE.state.lock().unwrap();
            w.started = Some(Instant::now() - WINDOW - Duration::from_millis(1));
        }
        flush();
        assert_eq!(SITE.state.lock().unwrap().left_out, 0);
        assert!(SITE.allow());
    }
}
