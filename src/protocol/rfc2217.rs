//! The RFC 2217 layer: COM-PORT-OPTION subnegotiations decoded into [`PortCommand`]s, and the
//! server's replies and notifications encoded back.
//!
//! Values travel exactly as RFC 2217 lays them out; replies use the client's command code plus
//! 100 and carry the value that is now in force, which for a successful request is exactly
//! the bytes the client sent (pyserial accepts a reply only if it starts with those bytes).

use super::telnet::{IAC, OPT_COM_PORT, SB, SE, escape_into};

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

/// A request from the client, decoded but not yet acted on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortCommand {
    /// The client's signature; empty asks for ours.
    Signature(Vec<u8>),
    /// 0 asks for the current rate.
    SetBaudRate(u32),
    /// 5..=8; 0 asks for the current size.
    SetDataSize(u8),
    /// 1 none, 2 odd, 3 even, 4 mark, 5 space; 0 asks.
    SetParity(u8),
    /// 1 one, 2 two, 3 one and a half; 0 asks.
    SetStopSize(u8),
    /// One of [`control`].
    SetControl(u8),
    /// The client polls for the line state.
    PollLineState,
    /// The client polls for the modem state.
    PollModemState,
    /// Stop sending serial data to the client until resumed.
    FlowControlSuspend,
    FlowControlResume,
    SetLineStateMask(u8),
    SetModemStateMask(u8),
    /// One of [`purge`].
    PurgeData(u8),
}

impl PortCommand {
    /// The client's command code, from which the reply code derives.
    pub fn code(&self) -> u8 {
        match self {
            PortCommand::Signature(_) => SIGNATURE,
            PortCommand::SetBaudRate(_) => SET_BAUDRATE,
            PortCommand::SetDataSize(_) => SET_DATASIZE,
            PortCommand::SetParity(_) => SET_PARITY,
            PortCommand::SetStopSize(_) => SET_STOPSIZE,
            PortCommand::SetControl(_) => SET_CONTROL,
            PortCommand::PollLineState => NOTIFY_LINESTATE,
            PortCommand::PollModemState => NOTIFY_MODEMSTATE,
            PortCommand::FlowControlSuspend => FLOWCONTROL_SUSPEND,
            PortCommand::FlowControlResume => FLOWCONTROL_RESUME,
            PortCommand::SetLineStateMask(_) => SET_LINESTATE_MASK,
            PortCommand::SetModemStateMask(_) => SET_MODEMSTATE_MASK,
            PortCommand::PurgeData(_) => PURGE_DATA,
        }
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
        SIGNATURE => PortCommand::Signature(arg.to_vec()),
        SET_BAUDRATE => {
            let a = fixed(4)?;
            PortCommand::SetBaudRate(u32::from_be_bytes([a[0], a[1], a[2], a[3]]))
        }
        SET_DATASIZE => PortCommand::SetDataSize(byte()?),
        SET_PARITY => PortCommand::SetParity(byte()?),
        SET_STOPSIZE => PortCommand::SetStopSize(byte()?),
        SET_CONTROL => PortCommand::SetControl(byte()?),
        // Polls carry no value in practice; RFC 2217 clients sometimes send a zero byte.
        NOTIFY_LINESTATE => PortCommand::PollLineState,
        NOTIFY_MODEMSTATE => PortCommand::PollModemState,
        FLOWCONTROL_SUSPEND => PortCommand::FlowControlSuspend,
        FLOWCONTROL_RESUME => PortCommand::FlowControlResume,
        SET_LINESTATE_MASK => PortCommand::SetLineStateMask(byte()?),
        SET_MODEMSTATE_MASK => PortCommand::SetModemStateMask(byte()?),
        PURGE_DATA => PortCommand::PurgeData(byte()?),
        other => return Err(Malformed::UnknownCommand(other)),
    })
}

/// Appends `IAC SB COM-PORT-OPTION <code+100> <value, escaped> IAC SE` to `out`.
pub fn encode_server(code: u8, value: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&[IAC, SB, OPT_COM_PORT, code + SERVER_OFFSET]);
    escape_into(value, out);
    out.extend_from_slice(&[IAC, SE]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_command() {
        let cases: Vec<(Vec<u8>, PortCommand)> = vec![
            (vec![0], PortCommand::Signature(vec![])),
            (
                b"\x00esptool".to_vec(),
                PortCommand::Signature(b"esptool".to_vec()),
            ),
            (
                vec![1, 0, 0x01, 0xc2, 0x00],
                PortCommand::SetBaudRate(115_200),
            ),
            (
                vec![1, 0xff, 0xff, 0xff, 0xff],
                PortCommand::SetBaudRate(u32::MAX),
            ),
            (vec![1, 0, 0, 0, 0], PortCommand::SetBaudRate(0)),
            (vec![2, 8], PortCommand::SetDataSize(8)),
            (vec![3, 3], PortCommand::SetParity(3)),
            (vec![4, 2], PortCommand::SetStopSize(2)),
            (vec![5, 8], PortCommand::SetControl(8)),
            (vec![6], PortCommand::PollLineState),
            (vec![7], PortCommand::PollModemState),
            (vec![7, 0], PortCommand::PollModemState),
            (vec![8], PortCommand::FlowControlSuspend),
            (vec![9], PortCommand::FlowControlResume),
            (vec![10, 0xff], PortCommand::SetLineStateMask(0xff)),
            (vec![11, 0xf0], PortCommand::SetModemStateMask(0xf0)),
            (vec![12, 3], PortCommand::PurgeData(3)),
        ];
        for (bytes, want) in cases {
            assert_eq!(parse(&bytes), Ok(want.clone()), "{bytes:?}");
            assert_eq!(want.code(), bytes[0]);
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
        encode_server(SET_BAUDRATE, &[0, 0, 0xff, 0xff], &mut out);
        assert_eq!(
            out,
            [IAC, SB, 44, 101, 0, 0, 0xff, 0xff, 0xff, 0xff, IAC, SE]
        );
    }
}
