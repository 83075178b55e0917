//! Control lines: how the client's DTR/RTS become the board's EN (reset) and IO0 (boot) pins.
//!
//! Two small traits keep the policy apart from the hardware:
//! - [`LineDriver`] drives the two strapping pins, both in one call: it knows nothing of DTR or
//!   RTS. The drivers: two GPIO lines ([`gpio`]), the UART's own DTR/RTS through a dev board's
//!   auto-program circuit ([`modem`]), and the demo's virtual chip.
//! - [`Control`] receives the client's DTR/RTS changes in stream order and decides what the
//!   pins do: the ESP-aware reset engine ([`esp`], its timing in [`planner`]), the literal
//!   mapping ([`direct`]), or nothing ([`NoControl`]).
//!
//! [`from_config`] builds what `[control]` asks for.

mod direct;
mod esp;
mod gpio;
mod modem;
mod planner;

pub use direct::{DirectControl, DirectModem};
pub use esp::EspControl;
pub use gpio::GpioLines;
pub use modem::{ModemLines, ModemPort, TtyModem};

use crate::config::{ControlBackend, ControlConfig, ControlMode};
use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

/// The two ESP strapping inputs as the bridge wants them driven. `true` = asserted: the pin
/// is pulled low (EN low holds the chip in reset; IO0 low selects download mode at reset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Straps {
    pub reset: bool,
    pub boot: bool,
}

impl Straps {
    /// Both released: the chip runs its application.
    pub const RELEASED: Straps = Straps {
        reset: false,
        boot: false,
    };
}

/// Hardware that can drive EN and IO0.
pub trait LineDriver: Send {
    /// Drives both pins at once.
    fn drive(&mut self, straps: Straps) -> io::Result<()>;
    /// The lines are released and nothing is pending: let go of the device until the next
    /// [`LineDriver::drive`] (the modem lines close their tty; GPIO lines stay requested).
    fn rest(&mut self) {}
    /// A short description for logs, e.g. "gpiochip0 lines 22 (EN), 10 (IO0)".
    fn describe(&self) -> String;
}

impl LineDriver for Box<dyn LineDriver> {
    fn drive(&mut self, straps: Straps) -> io::Result<()> {
        (**self).drive(straps)
    }
    fn rest(&mut self) {
        (**self).rest()
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}

/// The client's view of its modem-control outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModemOutputs {
    pub dtr: bool,
    pub rts: bool,
}

/// Where a reset left the chip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetKind {
    /// EN rose with IO0 low: the ROM's download mode.
    Bootloader,
    /// EN rose with IO0 high: the application.
    Application,
}

/// A board's last reset: written by its reset engine, read for `esp-bridge status`.
#[derive(Debug, Clone, Default)]
pub struct ResetLog(Arc<Mutex<Option<(Instant, ResetKind)>>>);

impl ResetLog {
    pub fn record(&self, kind: ResetKind) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some((Instant::now(), kind));
    }

    pub fn last(&self) -> Option<(Instant, ResetKind)> {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The policy between the client's DTR/RTS and the pins.
/// The control lines, shared between the bridge (which releases them when a writer stops
/// and at shutdown), the session being served and an identification.
pub type SharedControl = std::sync::Arc<std::sync::Mutex<Box<dyn Control>>>;

/// The control lines, for one call; a holder that panicked leaves them usable (their state is
/// the engine's own, kept consistent under the lock).
pub fn lock(control: &SharedControl) -> std::sync::MutexGuard<'_, Box<dyn Control>> {
    control
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub trait Control: Send {
    /// The client changed DTR or RTS (called for every SET-CONTROL, in stream order, with
    /// both values as they now stand). Must not block: it is called from the session.
    fn client_outputs(&mut self, outputs: ModemOutputs) -> io::Result<()>;
    /// The client is gone (or the service stops): put the pins in their safe state. The way
    /// there may take a timed sequence; [`Control::settled`] tells when it is done.
    fn release(&mut self) -> io::Result<()>;
    /// Puts the chip into its ROM bootloader with a locally timed sequence (the raw port
    /// does this for esptool, which cannot reset over a plain socket).
    fn enter_bootloader(&mut self) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this control setup cannot reset the chip: use [control] mode = \"esp\" with backend \"gpio\" or \"modem\", or put the chip into download mode by hand",
        ))
    }
    /// Whether [`Control::enter_bootloader`] works here.
    fn can_reset(&self) -> bool {
        false
    }
    /// Completes when every line change asked for so far has been carried out.
    fn settled(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(std::future::ready(()))
    }
    /// For logs.
    fn describe(&self) -> String;
    /// The record of the resets this control plans, where it plans them.
    fn resets(&self) -> Option<ResetLog> {
        None
    }
}

/// No lines at all: DTR/RTS requests are acknowledged and otherwise ignored.
#[derive(Debug, Default)]
pub struct NoControl;

impl Control for NoControl {
    fn client_outputs(&mut self, _: ModemOutputs) -> io::Result<()> {
        Ok(())
    }
    fn release(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "none (DTR/RTS acknowledged, no lines driven)".into()
    }
}

/// The control lines `[control]` asks for, on `device` for the modem backend. Must run inside
/// the runtime (the reset engine is a task).
pub fn from_config(c: &ControlConfig, device: &Path) -> Result<Box<dyn Control>, String> {
    let driver: Box<dyn LineDriver> = match c.backend {
        ControlBackend::None => return Ok(Box::new(NoControl)),
        ControlBackend::Gpio => Box::new(GpioLines::open(&c.gpio)?),
        ControlBackend::Modem => {
            let port = TtyModem::new(device);
            if c.mode == ControlMode::Direct {
                return Ok(Box::new(DirectModem::new(port)));
            }
            Box::new(ModemLines::new(port))
        }
    };
    Ok(policy_over(driver, c))
}

/// The policy of `[control] mode` over a line driver.
pub fn policy_over(driver: Box<dyn LineDriver>, c: &ControlConfig) -> Box<dyn Control> {
    match c.mode {
        ControlMode::Esp => Box::new(EspControl::start(driver, c.after_disconnect)),
        ControlMode::Direct => Box::new(DirectControl::new(driver)),
    }
}
