//! Control lines: how the client's DTR/RTS become the board's EN (reset) and IO0 (boot) pins.
//!
//! Two small traits keep the policy apart from the hardware:
//! - [`LineDriver`] drives the two strapping pins, both in one call (a GPIO line request, the
//!   UART's modem lines, a simulated chip): it knows nothing of DTR or RTS.
//! - [`Control`] receives the client's DTR/RTS changes in stream order and decides what the
//!   pins do. [`DirectControl`] maps them literally (the seed's wiring); the ESP-aware reset
//!   engine is another implementation of the same trait.

use std::future::Future;
use std::io;
use std::pin::Pin;

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
    /// A short description for logs, e.g. "gpiochip0 lines 22 (EN), 10 (IO0)".
    fn describe(&self) -> String;
}

impl LineDriver for Box<dyn LineDriver> {
    fn drive(&mut self, straps: Straps) -> io::Result<()> {
        (**self).drive(straps)
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

/// The policy between the client's DTR/RTS and the pins.
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
    /// Completes when every line change asked for so far has been carried out.
    fn settled(&self) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        Box::pin(std::future::ready(()))
    }
    /// For logs.
    fn describe(&self) -> String;
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

/// The literal mapping of the seed wiring: RTS asserted holds EN low, DTR asserted holds IO0
/// low. It reproduces what a local USB-serial cable without the auto-program transistors
/// does, including holding the chip in reset while a terminal has both lines asserted.
pub struct DirectControl<D: LineDriver> {
    driver: D,
    current: Option<Straps>,
}

impl<D: LineDriver> DirectControl<D> {
    pub fn new(driver: D) -> Self {
        DirectControl {
            driver,
            current: None,
        }
    }

    fn set(&mut self, straps: Straps) -> io::Result<()> {
        if self.current != Some(straps) {
            self.driver.drive(straps)?;
            self.current = Some(straps);
        }
        Ok(())
    }
}

impl<D: LineDriver> Control for DirectControl<D> {
    fn client_outputs(&mut self, o: ModemOutputs) -> io::Result<()> {
        self.set(Straps {
            reset: o.rts,
            boot: o.dtr,
        })
    }
    fn release(&mut self) -> io::Result<()> {
        self.set(Straps::RELEASED)
    }
    fn describe(&self) -> String {
        format!(
            "direct (RTS -> EN, DTR -> IO0) on {}",
            self.driver.describe()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Straps>>>);

    impl LineDriver for Recorder {
        fn drive(&mut self, s: Straps) -> io::Result<()> {
            self.0.lock().unwrap().push(s);
            Ok(())
        }
        fn describe(&self) -> String {
            "recorder".into()
        }
    }

    #[test]
    fn direct_maps_rts_to_reset_and_dtr_to_boot_and_skips_repeats() {
        let rec = Recorder::default();
        let mut c = DirectControl::new(rec.clone());
        c.client_outputs(ModemOutputs {
            dtr: false,
            rts: true,
        })
        .unwrap();
        c.client_outputs(ModemOutputs {
            dtr: false,
            rts: true,
        })
        .unwrap();
        c.client_outputs(ModemOutputs {
            dtr: true,
            rts: false,
        })
        .unwrap();
        c.release().unwrap();
        assert_eq!(
            *rec.0.lock().unwrap(),
            vec![
                Straps {
                    reset: true,
                    boot: false
                },
                Straps {
                    reset: false,
                    boot: true
                },
                Straps::RELEASED
            ]
        );
    }
}
