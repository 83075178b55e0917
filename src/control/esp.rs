//! The ESP-aware reset engine: the [`Planner`] on its own tokio task in front of a
//! [`LineDriver`], so that the timing-critical sequences run on the Pi's clock, not the
//! network's. The session hands it the client's DTR/RTS changes without waiting.

use super::planner::{Planner, ResetEvent};
use super::{Control, LineDriver, ModemOutputs, Straps};
use crate::config::AfterDisconnect;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

enum Input {
    Client(ModemOutputs),
    Bootloader,
    Release,
}

/// The engine in front of a line driver, running on its own task.
pub struct EspControl {
    tx: mpsc::UnboundedSender<Input>,
    idle: watch::Receiver<bool>,
    description: String,
}

impl EspControl {
    /// Starts the engine task. The driver must already hold the lines at the released
    /// (safe) levels. Must be called inside a tokio runtime.
    pub fn start(mut driver: Box<dyn LineDriver>, after: AfterDisconnect) -> Self {
        let description = format!(
            "esp (reset and bootloader sequences timed locally) on {}",
            driver.describe()
        );
        let (tx, mut rx) = mpsc::unbounded_channel::<Input>();
        let (idle_tx, idle) = watch::channel(true);
        tokio::spawn(async move {
            let mut planner = Planner::new(Straps::RELEASED, after);
            loop {
                let deadline = planner.next_deadline();
                let input = tokio::select! {
                    msg = rx.recv() => match msg {
                        Some(m) => Some(m),
                        None => break,
                    },
                    () = crate::timer::sleep_until(deadline) => None,
                };
                let now = Instant::now();
                match input {
                    Some(Input::Client(o)) => planner.client(o, now),
                    Some(Input::Release) => planner.release(now),
                    Some(Input::Bootloader) => planner.enter_bootloader(now),
                    None => {}
                }
                while let Some((straps, event)) = planner.poll(Instant::now()) {
                    if let Err(e) = driver.drive(straps) {
                        tracing::error!("driving EN/IO0 on {} failed: {e}", driver.describe());
                    }
                    log_event(event);
                }
                let _ = idle_tx.send(planner.idle());
            }
        });
        EspControl {
            tx,
            idle,
            description,
        }
    }
}

fn log_event(event: Option<ResetEvent>) {
    match event {
        Some(ResetEvent::EnteredBootloader { reset_for }) => tracing::info!(
            reset_ms = reset_for.as_millis() as u64,
            "reset: chip entered the bootloader (EN low {} ms, IO0 held low)",
            reset_for.as_millis()
        ),
        Some(ResetEvent::BootedApp { reset_for }) => tracing::info!(
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
        let _ = self.idle.borrow_and_update();
        self.tx
            .send(Input::Client(outputs))
            .map_err(|_| io::Error::other("the reset engine has stopped"))
    }
    fn release(&mut self) -> io::Result<()> {
        self.tx
            .send(Input::Release)
            .map_err(|_| io::Error::other("the reset engine has stopped"))
    }
    fn enter_bootloader(&mut self) -> io::Result<()> {
        self.tx
            .send(Input::Bootloader)
            .map_err(|_| io::Error::other("the reset engine has stopped"))
    }
    fn settled(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let mut idle = self.idle.clone();
        Box::pin(async move {
            // The engine reports idle after every input it handled; wait for it to say so
            // after the last one, or for it to stop.
            tokio::time::sleep(Duration::from_millis(5)).await;
            let _ = idle.wait_for(|i| *i).await;
        })
    }
    fn describe(&self) -> String {
        self.description.clone()
    }
}
