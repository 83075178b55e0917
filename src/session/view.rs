//! A client's own view of the port while it only watches: what it set is what it is told
//! (pyserial checks each reply against what it asked for), and which of its requests would
//! reach the chip, making it claim the board.

use crate::protocol::{ControlRequest, Event, PortCommand, Reply, Request};
use crate::settings::{LineSettings, baud_in_range};

/// A watching client's view of the port: what it set, which is what it is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientView {
    pub settings: LineSettings,
    pub dtr: bool,
    pub rts: bool,
    pub break_on: bool,
}

impl ClientView {
    pub fn new(settings: LineSettings) -> Self {
        ClientView {
            settings,
            dtr: false,
            rts: false,
            break_on: false,
        }
    }

    /// Whether `event` would reach the chip: data, a reset (RTS asserted without DTR, what
    /// the auto-program circuit turns into EN low), or a BREAK. What every terminal sends on
    /// open (DTR and RTS asserted, its rate, a purge) claims nothing.
    pub fn claims(&self, event: &Event) -> bool {
        match event {
            Event::Data(d) => !d.is_empty(),
            Event::Port(PortCommand::Control(c)) => match c {
                ControlRequest::Rts(true) => !self.dtr,
                ControlRequest::Dtr(false) => self.rts,
                ControlRequest::Break(on) => *on,
                _ => false,
            },
            _ => false,
        }
    }

    /// The answer a watcher gets: its own setting, as if applied.
    pub fn answer(&mut self, cmd: &PortCommand, signature: &str) -> Option<Reply> {
        fn set<T: Copy>(field: &mut T, r: &Request<T>, ok: impl Fn(T) -> bool) -> T {
            if let Request::Set(v) = r
                && ok(*v)
            {
                *field = *v;
            }
            *field
        }
        let s = &mut self.settings;
        Some(match cmd {
            PortCommand::Signature(None) => Reply::Signature(signature.as_bytes().to_vec()),
            PortCommand::Signature(Some(_)) => return None,
            PortCommand::BaudRate(r) => Reply::BaudRate(set(&mut s.baud, r, baud_in_range)),
            PortCommand::DataSize(r) => {
                Reply::DataSize(set(&mut s.data_bits, r, |v| (5..=8).contains(&v)))
            }
            PortCommand::Parity(r) => Reply::Parity(set(&mut s.parity, r, |_| true)),
            PortCommand::StopSize(r) => Reply::StopSize(set(&mut s.stop_bits, r, |_| true)),
            PortCommand::Control(c) => match *c {
                ControlRequest::SetFlow(f) => {
                    s.flow = f;
                    Reply::Flow(f)
                }
                ControlRequest::QueryFlow | ControlRequest::Unsupported(_) => Reply::Flow(s.flow),
                ControlRequest::QueryBreak => Reply::Break(self.break_on),
                ControlRequest::Break(on) => {
                    self.break_on = on;
                    Reply::Break(on)
                }
                ControlRequest::QueryDtr => Reply::Dtr(self.dtr),
                ControlRequest::Dtr(on) => {
                    self.dtr = on;
                    Reply::Dtr(on)
                }
                ControlRequest::QueryRts => Reply::Rts(self.rts),
                ControlRequest::Rts(on) => {
                    self.rts = on;
                    Reply::Rts(on)
                }
                ControlRequest::QueryInboundFlow | ControlRequest::SetInboundFlow(_) => {
                    Reply::InboundFlowNone
                }
            },
            PortCommand::PollLineState => Reply::LineState(0),
            PortCommand::PollModemState => Reply::ModemState(0),
            PortCommand::FlowControlSuspend | PortCommand::FlowControlResume => return None,
            PortCommand::LineStateMask(m) => Reply::LineStateMask(*m),
            PortCommand::ModemStateMask(m) => Reply::ModemStateMask(*m),
            PortCommand::Purge(Ok(which)) => Reply::Purged(*which),
            PortCommand::Purge(Err(_)) => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Purge;

    fn view() -> ClientView {
        ClientView::new(LineSettings {
            baud: 115_200,
            data_bits: 8,
            parity: crate::settings::Parity::None,
            stop_bits: crate::settings::StopBits::One,
            flow: crate::settings::FlowControl::None,
        })
    }

    fn control(c: ControlRequest) -> Event {
        Event::Port(PortCommand::Control(c))
    }

    #[test]
    fn what_a_terminal_sends_on_open_claims_nothing() {
        let mut v = view();
        // pyserial's open: its rate, DTR then RTS asserted, purges.
        for cmd in [
            PortCommand::BaudRate(Request::Set(115_200)),
            PortCommand::Control(ControlRequest::Dtr(true)),
            PortCommand::Control(ControlRequest::Rts(true)),
            PortCommand::Purge(Ok(Purge::Both)),
        ] {
            assert!(!v.claims(&Event::Port(cmd.clone())), "{cmd:?}");
            v.answer(&cmd, "sig");
        }
        // idf.py monitor opens with both released.
        let mut v = view();
        for on in [false, false] {
            assert!(!v.claims(&control(ControlRequest::Dtr(on))));
            v.answer(&PortCommand::Control(ControlRequest::Dtr(on)), "");
            assert!(!v.claims(&control(ControlRequest::Rts(on))));
        }
        assert!(!v.claims(&Event::Data(Vec::new())));
    }

    #[test]
    fn data_a_reset_or_a_break_claims() {
        let v = view();
        assert!(v.claims(&Event::Data(b"x".to_vec())));
        // esptool's reset: DTR off, RTS on (EN low).
        assert!(v.claims(&control(ControlRequest::Rts(true))));
        assert!(v.claims(&control(ControlRequest::Break(true))));
        // From both asserted, DTR off leaves RTS alone: a reset too.
        let mut v = view();
        v.answer(&PortCommand::Control(ControlRequest::Dtr(true)), "");
        v.answer(&PortCommand::Control(ControlRequest::Rts(true)), "");
        assert!(v.claims(&control(ControlRequest::Dtr(false))));
    }

    #[test]
    fn a_watcher_is_answered_with_what_it_asked_for() {
        let mut v = view();
        let baud = PortCommand::BaudRate(Request::Set(74_880));
        assert_eq!(v.answer(&baud, ""), Some(Reply::BaudRate(74_880)));
        assert_eq!(
            v.answer(&PortCommand::BaudRate(Request::Query), ""),
            Some(Reply::BaudRate(74_880))
        );
        assert_eq!(
            v.answer(&PortCommand::DataSize(Request::Set(9)), ""),
            Some(Reply::DataSize(8)),
            "an impossible size is not taken"
        );
        assert_eq!(
            v.answer(&PortCommand::Signature(None), "esp-bridge"),
            Some(Reply::Signature(b"esp-bridge".to_vec()))
        );
        assert_eq!(v.settings.baud, 74_880);
    }
}
