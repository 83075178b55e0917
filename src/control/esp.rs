//! The ESP-aware reset engine: the [`Planner`] in front of a [`LineDriver`], so that the
//! timing-critical sequences run on the Pi's clock, not the network's. The client's DTR/RTS
//! changes are planned at once, under a lock, and what is due is driven there and then; a
//! small task wakes for the steps planned later. Nothing queues up in between, however fast
//! a client toggles.

use super::planner::{Planner, ResetEvent};
use super::{Control, LineDriver, ModemOutputs, ResetKind, ResetLog, Straps};
use crate::config::AfterDisconnect;
use crate::log_limit::limited;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use tokio::sync::Notify;
use tokio::time::Instant;

/// The planner and the lines it drives.
struct Engine {
    planner: Planner,
    driver: Box<dyn LineDriver>,
    /// A release was planned and the lines have not rested since.
    releasing: bool,
    resets: ResetLog,
}

impl Engine {
    /// Drives every step due by now; once a release is carried out, lets the lines rest.
    fn run_due(&mut self) {
        while let Some((straps, event)) = self.planner.poll(Instant::now()) {
            if let Err(e) = self.driver.drive(straps) {
                limited!(
                    error,
                    "failed line changes",
                    "driving EN/IO0 on {} failed: {e}",
                    self.driver.describe()
                );
            }
            log_event(event, &self.resets);
        }
        if self.releasing && self.planner.idle() {
            self.releasing = false;
            self.driver.rest();
        }
    }
}

/// The engine, shared by the control handle and its timer task.
pub struct EspControl {
    engine: Arc<Mutex<Engine>>,
    /// Wakes the timer task: the plan changed.
    replanned: Arc<Notify>,
    description: String,
    resets: ResetLog,
}

fn lock(engine: &Mutex<Engine>) -> MutexGuard<'_, Engine> {
    engine
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl EspControl {
    /// Starts the engine's timer task. The driver must already hold the lines at the
    /// released (safe) levels. Must be called inside a tokio runtime.
    pub fn start(driver: Box<dyn LineDriver>, after: AfterDisconnect) -> Self {
        let description = format!(
            "esp (reset and bootloader sequences timed locally) on {}",
            driver.describe()
        );
        let resets = ResetLog::default();
        let engine = Arc::new(Mutex::new(Engine {
            planner: Planner::new(Straps::RELEASED, after),
            driver,
            releasing: false,
            resets: resets.clone(),
        }));
        let replanned = Arc::new(Notify::new());
        // In the span of the board it is created for: its reset lines carry BOARD=.
        tokio::spawn(tracing::Instrument::in_current_span(timer_task(
            Arc::downgrade(&engine),
            Arc::clone(&replanned),
        )));
        EspControl {
            engine,
            replanned,
            description,
            resets,
        }
    }

    /// Plans with `plan`, drives what is due, and wakes the timer for the rest.
    fn replan(&self, plan: impl FnOnce(&mut Planner, Instant)) {
        let mut e = lock(&self.engine);
        plan(&mut e.planner, Instant::now());
        e.run_due();
        drop(e);
        self.replanned.notify_one();
    }
}

impl Drop for EspControl {
    fn drop(&mut self) {
        // The timer task notices the engine is gone.
        self.replanned.notify_one();
    }
}

/// Sleeps until the next planned step (or a new plan), then drives what is due; ends when
/// the control handle is dropped.
async fn timer_task(engine: Weak<Mutex<Engine>>, replanned: Arc<Notify>) {
    loop {
        let deadline = match engine.upgrade() {
            Some(e) => {
                let mut e = lock(&e);
                e.run_due();
                e.planner.next_deadline()
            }
            None => return,
        };
        tokio::select! {
            () = replanned.notified() => {}
            () = crate::timer::sleep_until(deadline) => {}
        }
    }
}

fn log_event(event: Option<ResetEvent>, resets: &ResetLog) {
    match event {
        Some(ResetEvent::EnteredBootloader { .. }) => resets.record(ResetKind::Bootloader),
        Some(ResetEvent::BootedApp { .. }) => resets.record(ResetKind::Application),
        _ => {}
    }
    match event {
        Some(ResetEvent::EnteredBootloader { reset_for }) => limited!(
            info,
            "resets",
            reset_ms = reset_for.as_millis() as u64,
            "reset: chip entered the bootloader (EN low {} ms, IO0 held low)",
            reset_for.as_millis()
        ),
        Some(ResetEvent::BootedApp { reset_for }) => limited!(
            info,
            "resets",
            reset_ms = reset_for.as_millis() as u64,
            "reset: chip runs its application (EN low {} ms)",
            reset_for.as_millis()
        ),
        Some(ResetEvent::ResetHeld) => tracing::debug!("reset: EN held low"),
        None => {}
    }
}

impl Control for EspControl {
    fn client_outputs(&mut self, outputs: ModemOutputs) -> io::Result<()> {
        self.replan(|p, now| p.client(outputs, now));
        lock(&self.engine).releasing = false;
        Ok(())
    }
    fn release(&mut self) -> io::Result<()> {
        lock(&self.engine).releasing = true;
        self.replan(|p, now| p.release(now));
        Ok(())
    }
    fn can_reset(&self) -> bool {
        true
    }
    fn enter_bootloader(&mut self) -> io::Result<()> {
        lock(&self.engine).releasing = false;
        self.replan(|p, now| p.enter_bootloader(now));
        Ok(())
    }
    fn settled(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let engine = Arc::clone(&self.engine);
        Box::pin(async move {
            loop {
                let next = {
                    let mut e = lock(&engine);
                    e.run_due();
                    if e.planner.idle() {
                        return;
                    }
                    e.planner.next_deadline()
                };
                crate::timer::sleep_until(next).await;
            }
        })
    }
    fn describe(&self) -> String {
        self.description.clone()
    }
    fn resets(&self) -> Option<ResetLog> {
        Some(self.resets.clone())
    }
}
