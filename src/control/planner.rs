//! The ESP-aware reset engine's timing planner: reads the client's DTR/RTS stream as the intent of a local dev
//! board and carries out the timing-critical sequences on the Pi, with local timing.
//!
//! Clients (esptool, idf.py monitor, miniterm) drive DTR/RTS as if a USB dev board with the
//! two-transistor auto-program circuit were attached: EN is pulled low only when RTS is
//! asserted and DTR is not; IO0 only when DTR is asserted and RTS is not. On a local cable the
//! (DTR, RTS both asserted) step in esptool's bootloader sequence lasts microseconds and the EN
//! capacitor covers it; over a network it lasts a round trip, long enough to boot the app by
//! mistake. So the engine:
//! - holds EN low at least [`RESET_MIN`], however quickly the release arrives;
//! - after a reset, keeps EN low through the ambiguous "both asserted" step for up to
//!   [`AMBIGUOUS_GRACE`], waiting for the client to reveal whether it wants the bootloader;
//! - enters the bootloader as one local sequence: IO0 low while EN is still low, then EN
//!   released with IO0 low, IO0 held low at least [`BOOT_HOLD`] after EN rose;
//! - never resets on "both asserted" from a running chip, which is what every terminal sends
//!   on open: a monitor never resets the chip by accident.
//!
//! [`Planner`] is this pure core (time is an input); [`super::EspControl`] runs it on a tokio
//! task in front of a [`super::LineDriver`].

use super::{ModemOutputs, Straps};
pub use crate::config::AfterDisconnect;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// Shortest EN-low pulse: esptool's own sequences hold 100 ms; 10 ms more so that timer and
/// scheduling jitter can never make it shorter than that.
pub const RESET_MIN: Duration = Duration::from_millis(110);
/// How long IO0 stays low after EN rose in a bootloader entry: esptool sleeps 50 ms; 10 ms
/// more for the same reason.
pub const BOOT_HOLD: Duration = Duration::from_millis(60);
/// IO0 goes low this long before EN is released, so the strap is settled when sampled.
pub const STRAP_SETUP: Duration = Duration::from_millis(10);
/// How long "both asserted" right after a reset keeps the chip in reset while the client's
/// next command (DTR on then RTS off: the bootloader) is on its way. A round trip plus
/// pyserial's 50 ms poll fits many times over; a client that really meant "run" gets a reset
/// this much longer, which is harmless.
pub const AMBIGUOUS_GRACE: Duration = Duration::from_millis(1500);

/// EN held low, IO0 released: in reset, will boot the application.
const RESET: Straps = Straps {
    reset: true,
    boot: false,
};
/// Both held low: in reset, will enter the bootloader.
const BOTH: Straps = Straps {
    reset: true,
    boot: true,
};
/// EN released with IO0 low: the chip samples IO0 low and enters the bootloader.
const BOOTING: Straps = Straps {
    reset: false,
    boot: true,
};

/// The client's intent under the auto-program model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Intent {
    /// Neither pin pulled: run.
    Run,
    /// RTS without DTR: EN low.
    Reset,
    /// DTR without RTS: IO0 low.
    Boot,
    /// Both asserted: the circuit pulls neither pin.
    Both,
}

impl Intent {
    fn of(o: ModemOutputs) -> Intent {
        match (o.dtr, o.rts) {
            (false, false) => Intent::Run,
            (false, true) => Intent::Reset,
            (true, false) => Intent::Boot,
            (true, true) => Intent::Both,
        }
    }
}

/// Something the engine did to the chip, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetEvent {
    /// EN went low.
    ResetHeld,
    /// EN rose with IO0 high: the application boots.
    BootedApp { reset_for: Duration },
    /// EN rose with IO0 low: the ROM download mode.
    EnteredBootloader { reset_for: Duration },
}

/// The pure timing core.
#[derive(Debug)]
pub struct Planner {
    current: Straps,
    plan: VecDeque<(Instant, Straps)>,
    reset_since: Option<Instant>,
    rose_with_boot_at: Option<Instant>,
    in_download: bool,
    after_disconnect: AfterDisconnect,
    /// Steps carried out but not yet taken by [`Planner::poll`].
    fired: VecDeque<(Straps, Option<ResetEvent>)>,
}

impl Planner {
    /// `initial` is what the lines are driven to at start-up (the safe state).
    pub fn new(initial: Straps, after_disconnect: AfterDisconnect) -> Self {
        Planner {
            current: initial,
            plan: VecDeque::new(),
            reset_since: None,
            rose_with_boot_at: None,
            in_download: false,
            after_disconnect,
            fired: VecDeque::new(),
        }
    }

    /// When the next planned step is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.plan.front().map(|(t, _)| *t)
    }

    fn earliest_en_release(&self, now: Instant) -> Instant {
        match self.reset_since {
            Some(t) if self.current.reset => now.max(t + RESET_MIN),
            _ => now,
        }
    }

    fn earliest_boot_release(&self, now: Instant) -> Instant {
        match self.rose_with_boot_at {
            Some(t) if self.current.boot && !self.current.reset => now.max(t + BOOT_HOLD),
            _ => now,
        }
    }

    /// The client changed DTR/RTS: carry out what is due, then replan from the physical
    /// state. Carrying out first matters when commands arrive in a burst: each one then
    /// builds on what the previous one started.
    pub fn client(&mut self, outputs: ModemOutputs, now: Instant) {
        self.advance(now);
        let cur = self.current;
        let entering_bootloader = cur.reset && cur.boot;
        let (released, reset, both, booting) = (Straps::RELEASED, RESET, BOTH, BOOTING);
        self.plan.clear();
        match Intent::of(outputs) {
            Intent::Reset => {
                let at = self.earliest_boot_release(now);
                self.plan.push_back((at, reset));
            }
            Intent::Run | Intent::Both if entering_bootloader => {
                // The bootloader entry has begun: finish it (EN up with IO0 low, IO0 held),
                // then release. Only a new reset request cancels it.
                let rise = self.earliest_en_release(now + STRAP_SETUP);
                self.plan.push_back((rise, booting));
                self.plan.push_back((rise + BOOT_HOLD, released));
            }
            Intent::Run => {
                if cur.reset {
                    self.plan
                        .push_back((self.earliest_en_release(now), released));
                } else if cur.boot {
                    self.plan
                        .push_back((self.earliest_boot_release(now), released));
                }
            }
            Intent::Boot => {
                if cur.reset {
                    // The bootloader: IO0 low under reset, then EN up with IO0 still low.
                    self.plan.push_back((now, both));
                    let rise = self.earliest_en_release(now + STRAP_SETUP);
                    self.plan.push_back((rise, booting));
                } else if !cur.boot {
                    // IO0 low on a running chip: what the circuit does, and harmless.
                    self.plan.push_back((now, booting));
                }
            }
            Intent::Both => {
                if cur.reset {
                    // Ambiguous: the bootloader sequence passes through here. Stay in reset.
                    let give_up = self.earliest_en_release(now + AMBIGUOUS_GRACE);
                    self.plan.push_back((give_up, released));
                } else if cur.boot {
                    self.plan
                        .push_back((self.earliest_boot_release(now), released));
                }
            }
        }
    }

    /// The bootloader on request (the raw port's esptool client): a full local sequence.
    pub fn enter_bootloader(&mut self, now: Instant) {
        self.advance(now);
        self.plan.clear();
        let (reset, both, booting) = (RESET, BOTH, BOOTING);
        let (start, since) = if self.current.reset {
            (now, self.reset_since.unwrap_or(now))
        } else {
            let start = self.earliest_boot_release(now);
            self.plan.push_back((start, reset));
            (start, start)
        };
        let rise = (start + STRAP_SETUP).max(since + RESET_MIN);
        self.plan.push_back((rise - STRAP_SETUP, both));
        self.plan.push_back((rise, booting));
        self.plan.push_back((rise + BOOT_HOLD, Straps::RELEASED));
    }

    /// The client left (or the service stops): plan the way to the safe state.
    pub fn release(&mut self, now: Instant) {
        self.advance(now);
        self.plan.clear();
        let reset = RESET;
        let chip_left_in_bootloader = self.in_download || self.current.boot;
        if self.after_disconnect == AfterDisconnect::Run && chip_left_in_bootloader {
            // A chip in download mode (or on its way there) goes back to its application.
            let start = if self.current.reset {
                now
            } else {
                self.earliest_boot_release(now)
            };
            self.plan.push_back((start, reset));
            let since = if self.current.reset {
                self.reset_since.unwrap_or(start)
            } else {
                start
            };
            self.plan
                .push_back((start.max(since + RESET_MIN), Straps::RELEASED));
        } else if self.current.reset {
            self.plan
                .push_back((self.earliest_en_release(now), Straps::RELEASED));
        } else if self.current.boot {
            self.plan
                .push_back((self.earliest_boot_release(now), Straps::RELEASED));
        }
    }

    /// Takes the next step if it is due, returning what to drive and what it means.
    pub fn poll(&mut self, now: Instant) -> Option<(Straps, Option<ResetEvent>)> {
        self.advance(now);
        self.fired.pop_front()
    }

    /// Carries out every step due by `now`, in order.
    fn advance(&mut self, now: Instant) {
        while let Some(&(due, next)) = self.plan.front() {
            if due > now {
                return;
            }
            self.plan.pop_front();
            if next == self.current {
                continue;
            }
            // Steps run at their due time, which the timing rules are measured from.
            let at = due;
            let prev = self.current;
            self.current = next;
            let mut event = None;
            if next.reset && !prev.reset {
                self.reset_since = Some(at);
                event = Some(ResetEvent::ResetHeld);
            }
            if prev.reset && !next.reset {
                let reset_for = self.reset_since.map(|t| at - t).unwrap_or_default();
                if next.boot {
                    self.rose_with_boot_at = Some(at);
                    self.in_download = true;
                    event = Some(ResetEvent::EnteredBootloader { reset_for });
                } else {
                    self.in_download = false;
                    event = Some(ResetEvent::BootedApp { reset_for });
                }
            }
            self.fired.push_back((next, event));
        }
    }

    /// Whether everything planned has been carried out.
    pub fn idle(&self) -> bool {
        self.plan.is_empty() && self.fired.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn o(dtr: bool, rts: bool) -> ModemOutputs {
        ModemOutputs { dtr, rts }
    }

    /// Runs the planner through timed client steps and returns the driven straps with times
    /// relative to the start, in milliseconds.
    fn run(
        steps: &[(u64, ModemOutputs)],
        release_at: Option<u64>,
        until: u64,
    ) -> Vec<(u64, Straps)> {
        let t0 = Instant::now();
        let mut p = Planner::new(Straps::RELEASED, AfterDisconnect::Run);
        let mut out = Vec::new();
        let mut step = steps.iter().peekable();
        for ms in 0..=until {
            let now = t0 + Duration::from_millis(ms);
            while let Some((at, outputs)) = step.peek() {
                if *at != ms {
                    break;
                }
                p.client(*outputs, now);
                step.next();
            }
            if release_at == Some(ms) {
                p.release(now);
            }
            while let Some((s, _)) = p.poll(now) {
                out.push((ms, s));
            }
        }
        out
    }

    const REL: Straps = Straps::RELEASED;
    const RST: Straps = RESET;
    const BOOT: Straps = BOOTING;

    /// esptool's classic reset as it reaches the Pi with `lat` ms between commands (each
    /// SET-CONTROL waits for its acknowledgement, so every step costs a round trip).
    fn esptool_classic(lat: u64) -> Vec<(u64, ModemOutputs)> {
        let mut t = 0;
        let mut v = Vec::new();
        for (gap, out) in [
            (0, o(false, false)),
            (lat, o(false, true)),
            (100 + lat, o(true, true)),
            (lat, o(true, false)),
            (50 + lat, o(false, false)),
        ] {
            t += gap;
            v.push((t, out));
        }
        v
    }

    fn assert_bootloader_timing(trace: &[(u64, Straps)]) {
        let en_low = trace.iter().find(|(_, s)| s.reset).expect("EN went low").0;
        let rise = trace
            .iter()
            .find(|(_, s)| *s == BOOT)
            .expect("EN rose with IO0 low")
            .0;
        let io0_high = trace
            .iter()
            .find(|(t, s)| *t > rise && !s.boot)
            .expect("IO0 released")
            .0;
        assert!(
            rise - en_low >= 100,
            "EN low {} ms: {trace:?}",
            rise - en_low
        );
        assert!(
            io0_high - rise >= 50,
            "IO0 held {} ms: {trace:?}",
            io0_high - rise
        );
        // EN never rose with IO0 high between the reset and the bootloader entry.
        assert!(
            !trace
                .iter()
                .any(|(t, s)| *t > en_low && *t < rise && !s.reset),
            "{trace:?}"
        );
    }

    #[test]
    fn classic_reset_enters_the_bootloader_at_any_latency() {
        for lat in [0, 1, 20, 100, 250, 600] {
            let steps = esptool_classic(lat);
            let end = steps.last().map(|s| s.0).unwrap_or(0);
            let trace = run(&steps, None, end + 1000);
            assert_bootloader_timing(&trace);
            assert_eq!(trace.last().unwrap().1, REL, "lat {lat}: {trace:?}");
        }
    }

    #[test]
    fn compressed_commands_still_get_full_timing() {
        // All five commands arrive in one burst (a stalled link flushing at once).
        let burst: Vec<_> = esptool_classic(0)
            .into_iter()
            .map(|(_, o)| (5, o))
            .collect();
        let trace = run(&burst, None, 1000);
        assert_bootloader_timing(&trace);
    }

    #[test]
    fn terminal_open_never_resets() {
        // pyserial's open: DTR on, then RTS on; then nothing for a long time.
        let trace = run(&[(0, o(true, false)), (30, o(true, true))], None, 10_000);
        assert!(trace.iter().all(|(_, s)| !s.reset), "{trace:?}");
        assert_eq!(trace.last().map(|t| t.1).unwrap_or(REL), REL);
    }

    #[test]
    fn rts_pulse_resets_into_the_app_with_a_full_pulse() {
        let trace = run(&[(0, o(false, true)), (20, o(false, false))], None, 500);
        assert_eq!(trace, vec![(0, RST), (110, REL)]);
    }

    #[test]
    fn both_asserted_after_a_reset_times_out_into_the_app() {
        let trace = run(&[(0, o(false, true)), (150, o(true, true))], None, 3000);
        assert_eq!(trace, vec![(0, RST), (1650, REL)]);
    }

    #[test]
    fn disconnect_in_download_mode_resets_into_the_app() {
        let mut steps = esptool_classic(10);
        steps.pop(); // the client vanishes with IO0 still low
        let trace = run(&steps, Some(400), 1000);
        let last_two: Vec<_> = trace.iter().rev().take(2).map(|(_, s)| *s).collect();
        assert_eq!(last_two, vec![REL, RST], "{trace:?}");
        let (t_rst, _) = trace[trace.len() - 2];
        let (t_rel, _) = trace[trace.len() - 1];
        assert!(t_rel - t_rst >= 100);
    }

    #[test]
    fn disconnect_while_holding_reset_releases_after_the_minimum() {
        let trace = run(&[(0, o(false, true))], Some(10), 500);
        assert_eq!(trace, vec![(0, RST), (110, REL)]);
    }

    #[test]
    fn release_after_hard_reset_changes_nothing() {
        let mut steps = esptool_classic(5);
        let end = steps.last().unwrap().0;
        steps.push((end + 10, o(false, true)));
        steps.push((end + 120, o(false, false)));
        let trace = run(&steps, Some(end + 400), end + 800);
        let after: Vec<_> = trace.iter().filter(|(t, _)| *t >= end + 400).collect();
        assert!(after.is_empty(), "{after:?}");
        assert_eq!(trace.last().unwrap().1, REL);
    }

    #[test]
    fn bootloader_on_request_has_full_timing_then_runs_after_release() {
        let t0 = Instant::now();
        let mut p = Planner::new(Straps::RELEASED, AfterDisconnect::Run);
        p.enter_bootloader(t0);
        let mut trace = Vec::new();
        for ms in 0..=600u64 {
            let now = t0 + Duration::from_millis(ms);
            if ms == 400 {
                p.release(now);
            }
            while let Some((s, _)) = p.poll(now) {
                trace.push((ms, s));
            }
        }
        assert_eq!(
            trace,
            vec![
                (0, RST),
                (100, BOTH),
                (110, BOOT),
                (170, REL),
                (400, RST),
                (510, REL)
            ]
        );
    }

    #[test]
    fn both_low_precedes_the_rise() {
        let trace = run(&esptool_classic(30), None, 1000);
        let i = trace
            .iter()
            .position(|(_, s)| *s == BOTH)
            .expect("both low");
        assert_eq!(trace[i + 1].1, BOOT);
        assert!(trace[i + 1].0 - trace[i].0 >= 10);
    }
}
