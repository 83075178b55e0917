//! `[control] mode = "direct"`: the client's DTR/RTS applied literally, at the moment each
//! command arrives, as any serial server does. Over strap lines ([`DirectControl`], the seed's
//! wiring: RTS asserted holds EN low, DTR asserted holds IO0 low) or straight to a UART's
//! modem lines ([`DirectModem`]).

use super::modem::ModemPort;
use super::{Control, LineDriver, ModemOutputs, Straps};
use std::io;

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
        let released = self.set(Straps::RELEASED);
        self.driver.rest();
        // A resting driver may have let go of its device: drive afresh next time.
        self.current = None;
        released
    }
    fn describe(&self) -> String {
        format!(
            "direct (RTS -> EN, DTR -> IO0) on {}",
            self.driver.describe()
        )
    }
}

/// `[control] mode = "direct"` on the modem backend: the client's DTR/RTS go to the port's
/// DTR/RTS unchanged, like any serial server.
pub struct DirectModem<P: ModemPort> {
    port: P,
    last: Option<ModemOutputs>,
}

impl<P: ModemPort> DirectModem<P> {
    pub fn new(port: P) -> Self {
        DirectModem { port, last: None }
    }
}

impl<P: ModemPort> Control for DirectModem<P> {
    fn client_outputs(&mut self, o: ModemOutputs) -> io::Result<()> {
        if self.last != Some(o) {
            self.port.set_dtr_rts(o.dtr, o.rts)?;
            self.last = Some(o);
        }
        Ok(())
    }
    fn release(&mut self) -> io::Result<()> {
        let released = self.client_outputs(ModemOutputs::default());
        self.port.rest();
        self.last = None;
        released
    }
    fn describe(&self) -> String {
        format!("direct DTR/RTS on {}", self.port.describe())
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
