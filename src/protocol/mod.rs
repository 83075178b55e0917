//! The protocol engine: everything the server says and understands on the wire, with no I/O.
//!
//! Bytes from the client go in through [`Engine::receive`]; out come [`Event`]s in stream order
//! (serial data and port commands, which the session applies in that order) plus the telnet
//! negotiation answers, which the engine writes itself. The session asks the engine to encode
//! its replies ([`Engine::reply`]) and the device's data ([`Engine::encode_data`]).

pub mod esp_raw;
pub mod flash_rate;
pub mod rfc2217;
pub mod telnet;

pub use rfc2217::{ControlRequest, PortCommand, Purge, Reply, Request};

use telnet::{Options, TelnetEvent, TelnetParser};

/// Which protocol a listening port speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortKind {
    /// Telnet + RFC 2217 (`rfc2217://`).
    Rfc2217,
    /// The ESP-aware raw port (`socket://`).
    EspRaw,
    /// The read-only console: the board's kept output as stamped lines, then its live
    /// output; nothing the client sends is read as a protocol.
    Console,
}

impl PortKind {
    /// What the port is called in the log and the status.
    pub fn label(self) -> &'static str {
        match self {
            PortKind::Rfc2217 => "RFC 2217",
            PortKind::EspRaw => "ESP raw",
            PortKind::Console => "console",
        }
    }
}

impl std::fmt::Display for PortKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// Something in the client's stream the session must act on, in the order received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Bytes for the serial device.
    Data(Vec<u8>),
    /// A COM-PORT-OPTION request.
    Port(PortCommand),
    /// The client has just agreed to RFC 2217: time for the first NOTIFY-MODEMSTATE.
    ComPortEnabled,
    /// Input that was not understood; it was skipped. The text says what it was.
    Ignored(String),
    /// Raw port: the client is esptool; put the chip into its bootloader.
    EnterBootloader,
    /// Raw port: the chip acknowledged CHANGE_BAUDRATE; switch the UART (no reply).
    SwitchBaud(u32),
    /// Raw port: wait this long before anything after it goes to the device (the chip is
    /// changing its rate, or booting).
    Settle(std::time::Duration),
    /// Raw port: worth one line in the log (why the flash rate is what it is).
    Notice(String),
    /// Raw port: the session cannot go on; the text says why and what to change.
    Abort(String),
}

impl Event {
    /// The bytes for the device in `events`, in order (what a session would write).
    pub fn data_of(events: &[Event]) -> Vec<u8> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Data(d) => Some(d.as_slice()),
                _ => None,
            })
            .flatten()
            .copied()
            .collect()
    }
}

/// Telnet + RFC 2217 protocol state for one connection.
#[derive(Debug, Default)]
pub struct Engine {
    parser: TelnetParser,
    options: Options,
    scratch: Vec<TelnetEvent>,
    com_port_announced: bool,
    /// The client has answered the server's offers (or sent telnet commands of its own).
    answered: bool,
}

impl Engine {
    pub fn new() -> Self {
        Self::default()
    }

    /// The bytes to send when a client connects.
    pub fn greeting(&mut self) -> Vec<u8> {
        self.options.greeting()
    }

    /// Parses bytes from the client. Events are appended to `events`; negotiation answers
    /// are appended to `to_client`.
    pub fn receive(&mut self, input: &[u8], events: &mut Vec<Event>, to_client: &mut Vec<u8>) {
        self.parser.feed(input, &mut self.scratch);
        for event in self.scratch.drain(..) {
            match event {
                TelnetEvent::Data(data) => events.push(Event::Data(data)),
                TelnetEvent::Negotiate { verb, option } => {
                    self.answered = true;
                    if let Some(answer) = self.options.negotiate(verb, option) {
                        to_client.extend_from_slice(&answer);
                    }
                    // Our greeting offered COM-PORT-OPTION; it is agreed once the client
                    // says so on either side (pyserial says both, others one).
                    if !self.com_port_announced
                        && option == telnet::OPT_COM_PORT
                        && matches!(verb, telnet::WILL | telnet::DO)
                        && self.options.com_port_active()
                    {
                        self.com_port_announced = true;
                        events.push(Event::ComPortEnabled);
                    }
                }
                TelnetEvent::Subnegotiation { option, value } => {
                    self.answered = true;
                    if option != telnet::OPT_COM_PORT {
                        events.push(Event::Ignored(format!(
                            "subnegotiation for telnet option {option}, which was not agreed"
                        )));
                    } else {
                        // pyserial may take our offer as the answer to its own request and
                        // never confirm it; its first COM-PORT command is agreement enough.
                        if !self.com_port_announced {
                            self.com_port_announced = true;
                            events.push(Event::ComPortEnabled);
                        }
                        match rfc2217::parse(&value) {
                            Ok(cmd) => events.push(Event::Port(cmd)),
                            Err(e) => events.push(Event::Ignored(e.to_string())),
                        }
                    }
                }
                TelnetEvent::OversizedSubnegotiation { option, length } => {
                    events.push(Event::Ignored(format!(
                        "subnegotiation for option {option} of {length} bytes (limit {})",
                        telnet::MAX_SUBNEGOTIATION
                    )))
                }
                // NOP, GA, AYT and friends carry nothing for a serial port.
                TelnetEvent::Command(_) => {}
            }
        }
    }

    /// Whether RFC 2217 was agreed; until then modem-state notifications are not sent.
    pub fn com_port_active(&self) -> bool {
        self.com_port_announced
    }

    /// Appends serial data for the client, escaped.
    pub fn encode_data(data: &[u8], to_client: &mut Vec<u8>) {
        telnet::escape_into(data, to_client);
    }

    /// Appends the server's answer (or notification) for the client.
    pub fn reply(reply: &Reply, to_client: &mut Vec<u8>) {
        reply.encode(to_client);
    }

    /// Whether a subnegotiation is open (a client stuck in one is logged on disconnect).
    pub fn in_subnegotiation(&self) -> bool {
        self.parser.in_subnegotiation()
    }

    /// When the open subnegotiation began: `since` if it was already open, `now()` if it has
    /// just begun, `None` when none is open. (The caller keeps the time; the codec has none.)
    pub fn subnegotiation_since<T>(&self, since: Option<T>, now: impl FnOnce() -> T) -> Option<T> {
        if self.in_subnegotiation() {
            Some(since.unwrap_or_else(now))
        } else {
            None
        }
    }

    /// Whether the client speaks telnet: it has answered the server's offers (or sent
    /// negotiation of its own).
    pub fn negotiated(&self) -> bool {
        self.answered
    }
}

#[cfg(test)]
mod tests {
    use super::telnet::*;
    use super::*;

    #[test]
    fn pyserial_open_sequence() {
        let mut e = Engine::new();
        let greeting = e.greeting();
        assert!(!greeting.is_empty());
        let mut ev = Vec::new();
        let mut out = Vec::new();
        let open = [
            IAC,
            DO,
            OPT_ECHO,
            IAC,
            WILL,
            OPT_SGA,
            IAC,
            DO,
            OPT_SGA,
            IAC,
            DO,
            OPT_COM_PORT,
            IAC,
            WILL,
            OPT_COM_PORT,
        ];
        e.receive(&open, &mut ev, &mut out);
        assert_eq!(out, [IAC, WONT, OPT_ECHO, IAC, DO, OPT_SGA]);
        assert_eq!(ev, vec![Event::ComPortEnabled]);
        ev.clear();
        out.clear();
        // The same again changes nothing and announces nothing; only the refusal of ECHO
        // is repeated, as every request for a refused option gets one.
        e.receive(&open, &mut ev, &mut out);
        assert!(ev.is_empty());
        assert_eq!(out, [IAC, WONT, OPT_ECHO]);
    }

    #[test]
    fn data_and_commands_keep_stream_order() {
        let mut e = Engine::new();
        e.greeting();
        let mut ev = Vec::new();
        let mut out = Vec::new();
        let mut input = b"abc".to_vec();
        input.extend([IAC, SB, OPT_COM_PORT, 1, 0, 0x0e, 0x10, 0x00, IAC, SE]);
        input.extend(b"def");
        e.receive(&input, &mut ev, &mut out);
        assert_eq!(
            ev,
            vec![
                Event::Data(b"abc".to_vec()),
                Event::ComPortEnabled,
                Event::Port(PortCommand::BaudRate(Request::Set(921_600))),
                Event::Data(b"def".to_vec()),
            ]
        );
    }

    #[test]
    fn a_com_port_command_counts_as_agreement() {
        let mut e = Engine::new();
        e.greeting();
        let mut ev = Vec::new();
        let mut out = Vec::new();
        e.receive(
            &[IAC, SB, OPT_COM_PORT, 1, 0, 0, 0x25, 0x80, IAC, SE],
            &mut ev,
            &mut out,
        );
        assert_eq!(
            ev,
            vec![
                Event::ComPortEnabled,
                Event::Port(PortCommand::BaudRate(Request::Set(9600)))
            ]
        );
        assert!(e.com_port_active());
    }

    #[test]
    fn malformed_input_is_reported_not_fatal() {
        let mut e = Engine::new();
        let mut ev = Vec::new();
        let mut out = Vec::new();
        e.receive(
            &[
                IAC,
                SB,
                OPT_COM_PORT,
                1,
                0,
                IAC,
                SE,
                IAC,
                SB,
                24,
                1,
                IAC,
                SE,
                b'k',
            ],
            &mut ev,
            &mut out,
        );
        assert_eq!(ev[0], Event::ComPortEnabled);
        assert!(matches!(&ev[1], Event::Ignored(s) if s.contains("4-byte")));
        assert!(matches!(&ev[2], Event::Ignored(s) if s.contains("option 24")));
        assert_eq!(ev[3], Event::Data(b"k".to_vec()));
    }
}
