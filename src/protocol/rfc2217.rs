//! The RFC 2217 layer: COM-PORT-OPTION subnegotiations decoded into [`PortCommand`]s, and the
//! server's replies and notifications encoded back.
//!
//! Values travel exactly as RFC 2217 lays them out; no wire number leaves this file: requests
//! are decoded into typed [`PortCommand`]s, and [`Reply`] encodes the typed answer with the
//! client's command code plus 100 and the value now in force, which for a successful request
//! is exactly the bytes the client sent (pyserial accepts a reply only if it starts with them).

use super::telnet::{IAC, OPT_COM_PORT, SB, SE, escape_into};
use crate::settings::{FlowControl, Parity, StopBits};

pub const SIGNATURE: u8 = 0;
pub const SET_BAUDRATE: u8 = 1;
pub const SET_DATASIZE: u8 = 2;
pub const SET_PARITY: u8 = 3;
pub const SET_STOPSIZE: u8 = 4;
pub const SET_CONTROL: u8 = 5;
pub const NOTIFY_LINESTATE: u8 = 6;
pub const NOTIFY_MODEMSTATE: u8 = 7;
pub const FLOWCONTROL_SUSPEND: u8 = 8;
pub const FLOWCONTROL_RESUME: u8 = 9;
pub const SET_LINESTATE_MASK: u8 = 10;
pub const SET_MODEMSTATE_MASK: u8 = 11;
pub const PURGE_DATA: u8 = 12;

/// Server replies and notifications use the client's code plus this.
pub const SERVER_OFFSET: u8 = 100;

/// SET-CONTROL values (RFC 2217 section "SET-CONTROL").
pub mod control {
    pub const REQ_FLOW: u8 = 0;
    pub const FLOW_NONE: u8 = 1;
    pub const FLOW_XONXOFF: u8 = 2;
    pub const FLOW_HARDWARE: u8 = 3;
    pub const REQ_BREAK: u8 = 4;
    pub const BREAK_ON: u8 = 5;
    pub const BREAK_OFF: u8 = 6;
    pub const REQ_DTR: u8 = 7;
    pub const DTR_ON: u8 = 8;
    pub const DTR_OFF: u8 = 9;
    pub const REQ_RTS: u8 = 10;
    pub const RTS_ON: u8 = 11;
    pub const RTS_OFF: u8 = 12;
    pub const REQ_FLOW_IN: u8 = 13;
    pub const FLOW_IN_NONE: u8 = 14;
    pub const FLOW_IN_XONXOFF: u8 = 15;
    pub const FLOW_IN_HARDWARE: u8 = 16;
    pub const FLOW_DCD: u8 = 17;
    pub const FLOW_DTR: u8 = 18;
    pub const FLOW_DSR: u8 = 19;
}

/// PURGE-DATA values.
pub mod purge {
    /// The access server's receive buffer: data from the device not yet sent to the client.
    pub const RX: u8 = 1;
    /// The access server's transmit buffer: data from the client not yet sent to the device.
    pub const TX: u8 = 2;
    pub const BOTH: u8 = 3;
}

/// NOTIFY-MODEMSTATE bits.
pub mod modem {
    pub const CD: u8 = 128;
    pub const RI: u8 = 64;
    pub const DSR: u8 = 32;
    pub const CTS: u8 = 16;
}

/// What a client asks of one line setting: its current value, a new value, or a value this
/// server cannot apply (RFC 2217's mark parity or 1.5 stop bits, 9 data bits), kept raw for
/// the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<T> {
    Query,
    Set(T),
    Unsupported(u8),
}

/// SET-CONTROL, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlRequest {
    QueryFlow,
    SetFlow(FlowControl),
    QueryBreak,
    Break(bool),
    QueryDtr,
    Dtr(bool),
    QueryRts,
    Rts(bool),
    QueryInboundFlow,
    /// Inbound flow control is not separate from outbound on Linux: only "none" is offered;
    /// the raw value the client sent is kept for the log.
    SetInboundFlow(u8),
    /// 17..19 (DCD, DTR and DSR flow control) and values RFC 2217 does not define.
    Unsupported(u8),
}

/// PURGE-DATA: which of the server's buffers to discard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purge {
    /// The access server's receive buffer: data from the device not yet sent to the client.
    Rx,
    /// The access server's transmit buffer: data from the client not yet sent to the device.
    Tx,
    Both,
}

impl Purge {
    pub fn rx(self) -> bool {
        matches!(self, Purge::Rx | Purge::Both)
    }
    pub fn tx(self) -> bool {
        matches!(self, Purge::Tx | Purge::Both)
    }
}

/// A request from the client, decoded into typed values but not yet acted on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortCommand {
    /// The client's signature; `None` asks for ours.
    Signature(Option<Vec<u8>>),
    BaudRate(Request<u32>),
    /// 5 to 8 data bits.
    DataSize(Request<u8>),
    Parity(Request<Parity>),
    StopSize(Request<StopBits>),
    Control(ControlRequest),
    /// The client polls for the line state.
    PollLineState,
    /// The client polls for the modem state.
    PollModemState,
    /// Stop sending serial data to the client until resumed.
    FlowControlSuspend,
    FlowControlResume,
    LineStateMask(u8),
    ModemStateMask(u8),
    /// `Err` holds a value RFC 2217 does not define; such a request gets no reply.
    Purge(Result<Purge, u8>),
}

/// What the server sends back: the value now in force for the command the client sent, or a
/// notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Signature(Vec<u8>),
    BaudRate(u32),
    DataSize(u8),
    Parity(Parity),
    StopSize(StopBits),
    Flow(FlowControl),
    Break(bool),
    Dtr(bool),
    Rts(bool),
    /// Inbound flow control: always "none" here.
    InboundFlowNone,
    LineState(u8),
    /// NOTIFY-MODEMSTATE, also sent unasked when a watched line changes.
    ModemState(u8),
    LineStateMask(u8),
    ModemStateMask(u8),
    Purged(Purge),
}

impl Reply {
    /// Appends `IAC SB COM-PORT-OPTION <code+100> <value, escaped> IAC SE` to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let on_off = |on: bool, yes: u8, no: u8| if on { yes } else { no };
        let byte = |code: u8, value: u8, out: &mut Vec<u8>| encode_server(code, &[value], out);
        match self {
            Reply::Signature(text) => encode_server(SIGNATURE, text, out),
            Reply::BaudRate(b) => encode_server(SET_BAUDRATE, &b.to_be_bytes(), out),
            Reply::DataSize(d) => byte(SET_DATASIZE, *d, out),
            Reply::Parity(p) => byte(SET_PARITY, parity_to_wire(*p), out),
            Reply::StopSize(s) => byte(SET_STOPSIZE, stop_to_wire(*s), out),
            Reply::Flow(f) => byte(SET_CONTROL, flow_to_wire(*f), out),
            Reply::Break(on) => byte(
                SET_CONTROL,
                on_off(*on, control::BREAK_ON, control::BREAK_OFF),
                out,
            ),
            Reply::Dtr(on) => byte(
                SET_CONTROL,
                on_off(*on, control::DTR_ON, control::DTR_OFF),
                out,
            ),
            Reply::Rts(on) => byte(
                SET_CONTROL,
                on_off(*on, control::RTS_ON, control::RTS_OFF),
                out,
            ),
            Reply::InboundFlowNone => byte(SET_CONTROL, control::FLOW_IN_NONE, out),
            Reply::LineState(v) => byte(NOTIFY_LINESTATE, *v, out),
            Reply::ModemState(v) => byte(NOTIFY_MODEMSTATE, *v, out),
            Reply::LineStateMask(m) => byte(SET_LINESTATE_MASK, *m, out),
            Reply::ModemStateMask(m) => byte(SET_MODEMSTATE_MASK, *m, out),
            Reply::Purged(p) => byte(PURGE_DATA, purge_to_wire(*p), out),
        }
    }
}

fn parity_to_wire(p: Parity) -> u8 {
    match p {
        Parity::None => 1,
        Parity::Odd => 2,
        Parity::Even => 3,
    }
}

fn stop_to_wire(s: StopBits) -> u8 {
    match s {
        StopBits::One => 1,
        StopBits::Two => 2,
    }
}

fn flow_to_wire(f: FlowControl) -> u8 {
    match f {
        FlowControl::None => control::FLOW_NONE,
        FlowControl::Software => control::FLOW_XONXOFF,
        FlowControl::Hardware => control::FLOW_HARDWARE,
    }
}

fn purge_to_wire(p: Purge) -> u8 {
    match p {
        Purge::Rx => purge::RX,
        Purge::Tx => purge::TX,
        Purge::Both => purge::BOTH,
    }
}

fn decode_control(v: u8) -> ControlRequest {
    use control::*;
    match v {
        REQ_FLOW => ControlRequest::QueryFlow,
        FLOW_NONE => ControlRequest::SetFlow(FlowControl::None),
        FLOW_XONXOFF => ControlRequest::SetFlow(FlowControl::Software),
        FLOW_HARDWARE => ControlRequest::SetFlow(FlowControl::Hardware),
        REQ_BREAK => ControlRequest::QueryBreak,
        BREAK_ON => ControlRequest::Break(true),
        BREAK_OFF => ControlRequest::Break(false),
        REQ_DTR => ControlRequest::QueryDtr,
        DTR_ON => ControlRequest::Dtr(true),
        DTR_OFF => ControlRequest::Dtr(false),
        REQ_RTS => ControlRequest::QueryRts,
        RTS_ON => ControlRequest::Rts(true),
        RTS_OFF => ControlRequest::Rts(false),
        REQ_FLOW_IN => ControlRequest::QueryInboundFlow,
        FLOW_IN_NONE..=FLOW_IN_HARDWARE => ControlRequest::SetInboundFlow(v),
        other => ControlRequest::Unsupported(other),
    }
}

/// Why a COM-PORT-OPTION subnegotiation could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Malformed {
    /// `IAC SB 44 IAC SE` with no command byte.
    Empty,
    /// A command code RFC 2217 does not define (server codes 100+ included: a client must
    /// not send them).
    UnknownCommand(u8),
    /// The value has the wrong length for the command.
    BadLength {
        command: u8,
        expected: usize,
        got: usize,
    },
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Malformed::Empty => write!(f, "empty COM-PORT-OPTION subnegotiation"),
            Malformed::UnknownCommand(c) => write!(f, "unknown COM-PORT-OPTION command {c}"),
            Malformed::BadLength {
                command,
                expected,
                got,
            } => write!(
                f,
                "COM-PORT-OPTION command {command} needs a {expected}-byte value, got {got} bytes"
            ),
        }
    }
}

/// Decodes the value of a COM-PORT-OPTION subnegotiation (the bytes after option 44).
pub fn parse(value: &[u8]) -> Result<PortCommand, Malformed> {
    let (&command, arg) = value.split_first().ok_or(Malformed::Empty)?;
    let fixed = |n: usize| -> Result<&[u8], Malformed> {
        if arg.len() == n {
            Ok(arg)
        } else {
            Err(Malformed::BadLength {
                command,
                expected: n,
                got: arg.len(),
            })
        }
    };
    let byte = || fixed(1).map(|a| a[0]);
    Ok(match command {
        SIGNATURE if arg.is_empty() => PortCommand::Signature(None),
        SIGNATURE => PortCommand::Signature(Some(arg.to_vec())),
        SET_BAUDRATE => {
            let a = fixed(4)?;
            PortCommand::BaudRate(match u32::from_be_bytes([a[0], a[1], a[2], a[3]]) {
                0 => Request::Query,
                baud => Request::Set(baud),
            })
        }
        SET_DATASIZE => PortCommand::DataSize(match byte()? {
            0 => Request::Query,
            bits @ 5..=8 => Request::Set(bits),
            other => Request::Unsupported(other),
        }),
        SET_PARITY => PortCommand::Parity(match byte()? {
            0 => Request::Query,
            1 => Request::Set(Parity::None),
            2 => Request::Set(Parity::Odd),
            3 => Request::Set(Parity::Even),
            other => Request::Unsupported(other),
        }),
        SET_STOPSIZE => PortCommand::StopSize(match byte()? {
            0 => Request::Query,
            1 => Request::Set(StopBits::One),
            2 => Request::Set(StopBits::Two),
            other => Request::Unsupported(other),
        }),
        SET_CONTROL => PortCommand::Control(decode_control(byte()?)),
        // Polls carry no value in practice; RFC 2217 clients sometimes send a zero byte.
        NOTIFY_LINESTATE => PortCommand::PollLineState,
        NOTIFY_MODEMSTATE => PortCommand::PollModemState,
        FLOWCONTROL_SUSPEND => PortCommand::FlowControlSuspend,
        FLOWCONTROL_RESUME => PortCommand::FlowControlResume,
        SET_LINESTATE_MASK => PortCommand::LineStateMask(byte()?),
        SET_MODEMSTATE_MASK => PortCommand::ModemStateMask(byte()?),
        PURGE_DATA => PortCommand::Purge(match byte()? {
            purge::RX => Ok(Purge::Rx),
            purge::TX => Ok(Purge::Tx),
            purge::BOTH => Ok(Purge::Both),
            other => Err(other),
        }),
        other => return Err(Malformed::UnknownCommand(other)),
    })
}

/// Appends `IAC SB COM-PORT-OPTION <code+100> <value, escaped> IAC SE` to `out`.
fn encode_server(code: u8, value: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&[IAC, SB, OPT_COM_PORT, code + SERVER_OFFSET]);
    escape_into(value, out);
    out.extend_from_slice(&[IAC, SE]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_command_into_typed_values() {
        use ControlRequest as C;
        let cases: Vec<(Vec<u8>, PortCommand)> = vec![
            (vec![0], PortCommand::Signature(None)),
            (
                b"\x00esptool".to_vec(),
                PortCommand::Signature(Some(b"esptool".to_vec())),
            ),
            (
                vec![1, 0, 0x01, 0xc2, 0x00],
                PortCommand::BaudRate(Request::Set(115_200)),
            ),
            (
                vec![1, 0xff, 0xff, 0xff, 0xff],
                PortCommand::BaudRate(Request::Set(u32::MAX)),
            ),
            (vec![1, 0, 0, 0, 0], PortCommand::BaudRate(Request::Query)),
            (vec![2, 8], PortCommand::DataSize(Request::Set(8))),
            (vec![2, 5], PortCommand::DataSize(Request::Set(5))),
            (vec![2, 0], PortCommand::DataSize(Request::Query)),
            (vec![2, 9], PortCommand::DataSize(Request::Unsupported(9))),
            (vec![2, 4], PortCommand::DataSize(Request::Unsupported(4))),
            (vec![3, 0], PortCommand::Parity(Request::Query)),
            (vec![3, 1], PortCommand::Parity(Request::Set(Parity::None))),
            (vec![3, 2], PortCommand::Parity(Request::Set(Parity::Odd))),
            (vec![3, 3], PortCommand::Parity(Request::Set(Parity::Even))),
            (vec![3, 4], PortCommand::Parity(Request::Unsupported(4))),
            (vec![4, 0], PortCommand::StopSize(Request::Query)),
            (
                vec![4, 1],
                PortCommand::StopSize(Request::Set(StopBits::One)),
            ),
            (
                vec![4, 2],
                PortCommand::StopSize(Request::Set(StopBits::Two)),
            ),
            (vec![4, 3], PortCommand::StopSize(Request::Unsupported(3))),
            (vec![5, 0], PortCommand::Control(C::QueryFlow)),
            (
                vec![5, 1],
                PortCommand::Control(C::SetFlow(FlowControl::None)),
            ),
            (
                vec![5, 2],
                PortCommand::Control(C::SetFlow(FlowControl::Software)),
            ),
            (
                vec![5, 3],
                PortCommand::Control(C::SetFlow(FlowControl::Hardware)),
            ),
            (vec![5, 4], PortCommand::Control(C::QueryBreak)),
            (vec![5, 5], PortCommand::Control(C::Break(true))),
            (vec![5, 6], PortCommand::Control(C::Break(false))),
            (vec![5, 7], PortCommand::Control(C::QueryDtr)),
            (vec![5, 8], PortCommand::Control(C::Dtr(true))),
            (vec![5, 9], PortCommand::Control(C::Dtr(false))),
            (vec![5, 10], PortCommand::Control(C::QueryRts)),
            (vec![5, 11], PortCommand::Control(C::Rts(true))),
            (vec![5, 12], PortCommand::Control(C::Rts(false))),
            (vec![5, 13], PortCommand::Control(C::QueryInboundFlow)),
            (vec![5, 14], PortCommand::Control(C::SetInboundFlow(14))),
            (vec![5, 16], PortCommand::Control(C::SetInboundFlow(16))),
            (vec![5, 17], PortCommand::Control(C::Unsupported(17))),
            (vec![5, 200], PortCommand::Control(C::Unsupported(200))),
            (vec![6], PortCommand::PollLineState),
            (vec![7], PortCommand::PollModemState),
            (vec![7, 0], PortCommand::PollModemState),
            (vec![8], PortCommand::FlowControlSuspend),
            (vec![9], PortCommand::FlowControlResume),
            (vec![10, 0xff], PortCommand::LineStateMask(0xff)),
            (vec![11, 0xf0], PortCommand::ModemStateMask(0xf0)),
            (vec![12, 1], PortCommand::Purge(Ok(Purge::Rx))),
            (vec![12, 2], PortCommand::Purge(Ok(Purge::Tx))),
            (vec![12, 3], PortCommand::Purge(Ok(Purge::Both))),
            (vec![12, 7], PortCommand::Purge(Err(7))),
        ];
        for (bytes, want) in cases {
            assert_eq!(parse(&bytes), Ok(want.clone()), "{bytes:?}");
        }
    }

    #[test]
    fn replies_carry_the_request_code_plus_100_and_the_wire_value() {
        let cases: Vec<(Reply, Vec<u8>)> = vec![
            (Reply::Signature(b"eb".to_vec()), vec![100, b'e', b'b']),
            (Reply::BaudRate(921_600), vec![101, 0, 0x0e, 0x10, 0]),
            (Reply::DataSize(7), vec![102, 7]),
            (Reply::Parity(Parity::Even), vec![103, 3]),
            (Reply::StopSize(StopBits::Two), vec![104, 2]),
            (Reply::Flow(FlowControl::Hardware), vec![105, 3]),
            (Reply::Flow(FlowControl::None), vec![105, 1]),
            (Reply::Break(true), vec![105, 5]),
            (Reply::Break(false), vec![105, 6]),
            (Reply::Dtr(true), vec![105, 8]),
            (Reply::Dtr(false), vec![105, 9]),
            (Reply::Rts(true), vec![105, 11]),
            (Reply::Rts(false), vec![105, 12]),
            (Reply::InboundFlowNone, vec![105, 14]),
            (Reply::LineState(0), vec![106, 0]),
            (Reply::ModemState(0x30), vec![107, 0x30]),
            (Reply::LineStateMask(0x7f), vec![110, 0x7f]),
            (Reply::ModemStateMask(0xf0), vec![111, 0xf0]),
            (Reply::Purged(Purge::Both), vec![112, 3]),
        ];
        for (reply, value) in cases {
            let mut out = Vec::new();
            reply.encode(&mut out);
            let mut want = vec![IAC, SB, 44];
            want.extend_from_slice(&value);
            want.extend_from_slice(&[IAC, SE]);
            assert_eq!(out, want, "{reply:?}");
        }
    }

    #[test]
    fn rejects_malformed_values() {
        assert_eq!(parse(&[]), Err(Malformed::Empty));
        assert_eq!(parse(&[13]), Err(Malformed::UnknownCommand(13)));
        assert_eq!(
            parse(&[101, 0, 0, 0, 1]),
            Err(Malformed::UnknownCommand(101))
        );
        assert_eq!(
            parse(&[1, 0, 1]),
            Err(Malformed::BadLength {
                command: 1,
                expected: 4,
                got: 2
            })
        );
        assert_eq!(
            parse(&[5]),
            Err(Malformed::BadLength {
                command: 5,
                expected: 1,
                got: 0
            })
        );
        assert!(parse(&[2, 8, 8]).is_err());
        assert!(Malformed::UnknownCommand(13).to_string().contains("13"));
    }

    #[test]
    fn server_replies_escape_iac_in_values() {
        let mut out = Vec::new();
        Reply::BaudRate(0xffff).encode(&mut out);
        assert_eq!(
            out,
            [IAC, SB, 44, 101, 0, 0, 0xff, 0xff, 0xff, 0xff, IAC, SE]
        );
    }
}
