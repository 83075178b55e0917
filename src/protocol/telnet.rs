//! The telnet layer: splits a byte stream into data, option negotiation and subnegotiations,
//! and keeps the option state so that only real state changes are answered.
//!
//! No I/O happens here: [`TelnetParser::feed`] takes bytes and appends [`TelnetEvent`]s; the
//! negotiation state machine ([`Options`]) takes a received verb and returns the verb to send
//! back, if any.

/// Interpret As Command: starts every telnet command; doubled it stands for a data byte 0xFF.
/// How long a client may take to answer the server's option offers, and how long it may stay
/// inside one subnegotiation, before it is taken for something that does not speak telnet (or
/// a slowloris) and closed.
pub const NEGOTIATION_TIME: std::time::Duration = std::time::Duration::from_secs(5);

pub const IAC: u8 = 255;
pub const DONT: u8 = 254;
pub const DO: u8 = 253;
pub const WONT: u8 = 252;
pub const WILL: u8 = 251;
/// Subnegotiation begin.
pub const SB: u8 = 250;
/// Subnegotiation end.
pub const SE: u8 = 240;
/// No operation.
pub const NOP: u8 = 241;
/// `IAC NOP`: a command every telnet client ignores.
pub const NOP_COMMAND: [u8; 2] = [IAC, NOP];

pub const OPT_BINARY: u8 = 0;
pub const OPT_ECHO: u8 = 1;
pub const OPT_SGA: u8 = 3;
/// RFC 2217 COM-PORT-OPTION.
pub const OPT_COM_PORT: u8 = 44;

/// Longest subnegotiation value kept. RFC 2217 values are at most a few bytes (a signature
/// may be a line of text); anything longer is a broken or hostile client, and bounding it
/// keeps memory bounded whatever the client sends.
pub const MAX_SUBNEGOTIATION: usize = 256;

/// One thing found in the client's byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TelnetEvent {
    /// Payload bytes, already unescaped (IAC IAC became one 0xFF).
    Data(Vec<u8>),
    /// DO, DONT, WILL or WONT for an option.
    Negotiate { verb: u8, option: u8 },
    /// A complete `IAC SB option ... IAC SE`, value unescaped.
    Subnegotiation { option: u8, value: Vec<u8> },
    /// A subnegotiation longer than [`MAX_SUBNEGOTIATION`]; its bytes were discarded.
    OversizedSubnegotiation { option: u8, length: usize },
    /// Any other two-byte command (NOP, AYT, GA, ...), or a stray SE.
    Command(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Data,
    Iac,
    Verb(u8),
    SbOption,
    SbValue,
    SbIac,
}

/// Incremental telnet parser: survives any split of the stream across reads.
#[derive(Debug)]
pub struct TelnetParser {
    state: State,
    sb_option: u8,
    sb_value: Vec<u8>,
    sb_length: usize,
}

impl Default for TelnetParser {
    fn default() -> Self {
        Self::new()
    }
}

impl TelnetParser {
    pub fn new() -> Self {
        TelnetParser {
            state: State::Data,
            sb_option: 0,
            sb_value: Vec::new(),
            sb_length: 0,
        }
    }

    /// Parses `input` and appends what it finds to `events`. Consecutive data bytes are
    /// coalesced into one [`TelnetEvent::Data`], so a bulk transfer costs one event per read.
    pub fn feed(&mut self, input: &[u8], events: &mut Vec<TelnetEvent>) {
        let mut data: Vec<u8> = Vec::new();
        let mut rest = input;
        while !rest.is_empty() {
            if self.state == State::Data {
                // Fast path: copy the run of plain data up to the next IAC in one go.
                let run = rest.iter().position(|&b| b == IAC).unwrap_or(rest.len());
                if data.is_empty() {
                    data.reserve(run);
                }
                data.extend_from_slice(&rest[..run]);
                rest = &rest[run..];
                if let Some((_, tail)) = rest.split_first() {
                    self.state = State::Iac;
                    rest = tail;
                }
                continue;
            }
            let byte = rest[0];
            rest = &rest[1..];
            self.step(byte, &mut data, events);
        }
        flush_data(&mut data, events);
    }

    fn step(&mut self, byte: u8, data: &mut Vec<u8>, events: &mut Vec<TelnetEvent>) {
        self.state = match self.state {
            State::Data => unreachable_data_state(byte, data),
            State::Iac => match byte {
                IAC => {
                    data.push(IAC);
                    State::Data
                }
                DO | DONT | WILL | WONT => State::Verb(byte),
                SB => State::SbOption,
                other => {
                    flush_data(data, events);
                    events.push(TelnetEvent::Command(other));
                    State::Data
                }
            },
            State::Verb(verb) => {
                flush_data(data, events);
                events.push(TelnetEvent::Negotiate { verb, option: byte });
                State::Data
            }
            State::SbOption => {
                self.sb_option = byte;
                self.sb_value.clear();
                self.sb_length = 0;
                State::SbValue
            }
            State::SbValue => {
                if byte == IAC {
                    State::SbIac
                } else {
                    self.push_sb(byte);
                    State::SbValue
                }
            }
            State::SbIac => match byte {
                IAC => {
                    self.push_sb(IAC);
                    State::SbValue
                }
                SE => {
                    flush_data(data, events);
                    events.push(self.finish_sb());
                    State::Data
                }
                // RFC 855: IAC followed by anything else inside SB is a protocol violation.
                // Treat it as the end of the subnegotiation (the client forgot IAC SE) and
                // reprocess the byte as a command, which is how most telnet stacks recover.
                other => {
                    flush_data(data, events);
                    events.push(self.finish_sb());
                    self.state = State::Iac;
                    self.step(other, data, events);
                    return;
                }
            },
        };
    }

    fn push_sb(&mut self, byte: u8) {
        self.sb_length = self.sb_length.saturating_add(1);
        if self.sb_value.len() < MAX_SUBNEGOTIATION {
            self.sb_value.push(byte);
        }
    }

    fn finish_sb(&mut self) -> TelnetEvent {
        if self.sb_length > MAX_SUBNEGOTIATION {
            TelnetEvent::OversizedSubnegotiation {
                option: self.sb_option,
                length: self.sb_length,
            }
        } else {
            TelnetEvent::Subnegotiation {
                option: self.sb_option,
                value: std::mem::take(&mut self.sb_value),
            }
        }
    }

    /// Whether the parser is in the middle of a subnegotiation (for diagnostics: a client
    /// that stays here for long is stuck or hostile).
    pub fn in_subnegotiation(&self) -> bool {
        matches!(self.state, State::SbOption | State::SbValue | State::SbIac)
    }
}

/// `feed` handles the data state itself; reaching `step` in it would be a parser bug, and
/// the safe reaction is to keep the byte as data rather than to panic.
fn unreachable_data_state(byte: u8, data: &mut Vec<u8>) -> State {
    if byte == IAC {
        State::Iac
    } else {
        data.push(byte);
        State::Data
    }
}

fn flush_data(data: &mut Vec<u8>, events: &mut Vec<TelnetEvent>) {
    if !data.is_empty() {
        events.push(TelnetEvent::Data(std::mem::take(data)));
    }
}

/// Appends `data` to `out` with every 0xFF doubled, as telnet requires for payload and for
/// subnegotiation values alike.
pub fn escape_into(data: &[u8], out: &mut Vec<u8>) {
    let mut rest = data;
    out.reserve(data.len());
    while let Some(pos) = rest.iter().position(|&b| b == IAC) {
        out.extend_from_slice(&rest[..=pos]);
        out.push(IAC);
        rest = &rest[pos + 1..];
    }
    out.extend_from_slice(rest);
}

/// Which side of an option a verb is about: WILL/WONT speak of the sender's side, DO/DONT of
/// the receiver's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OptionState {
    /// The option is enabled on our side (we WILL).
    local: bool,
    /// The option is enabled on the client's side (they WILL).
    remote: bool,
}

/// The server's option table: which options it accepts on each side, and their state.
///
/// Options we initiate (see [`Options::greeting`]) start as enabled-pending: a confirming
/// answer then changes nothing and is not answered, which is what prevents the negotiation
/// loops RFC 854 warns about.
#[derive(Debug, Clone)]
pub struct Options {
    binary: OptionState,
    sga: OptionState,
    com_port: OptionState,
    echo: OptionState,
}

impl Default for Options {
    fn default() -> Self {
        Self::new()
    }
}

impl Options {
    pub fn new() -> Self {
        let off = OptionState {
            local: false,
            remote: false,
        };
        Options {
            binary: off,
            sga: off,
            com_port: off,
            echo: off,
        }
    }

    /// What the server sends on connect: it offers COM-PORT-OPTION on both sides (so pyserial's
    /// open completes on its first poll instead of waiting for its own request to be answered),
    /// and an 8-bit clean BINARY channel so that generic telnet clients do not mangle CR.
    pub fn greeting(&mut self) -> Vec<u8> {
        self.com_port = OptionState {
            local: true,
            remote: true,
        };
        self.binary = OptionState {
            local: true,
            remote: true,
        };
        self.sga.local = true;
        vec![
            IAC,
            DO,
            OPT_COM_PORT,
            IAC,
            WILL,
            OPT_COM_PORT,
            IAC,
            WILL,
            OPT_BINARY,
            IAC,
            DO,
            OPT_BINARY,
            IAC,
            WILL,
            OPT_SGA,
        ]
    }

    fn slot(&mut self, option: u8) -> Option<&mut OptionState> {
        match option {
            OPT_BINARY => Some(&mut self.binary),
            OPT_SGA => Some(&mut self.sga),
            OPT_COM_PORT => Some(&mut self.com_port),
            OPT_ECHO => Some(&mut self.echo),
            _ => None,
        }
    }

    /// Whether an option may be enabled on each side. The server never echoes (it is a data
    /// pipe), so it refuses to WILL ECHO; a client echoing would corrupt the serial stream,
    /// so it refuses DO ECHO too.
    fn acceptable(option: u8) -> bool {
        matches!(option, OPT_BINARY | OPT_SGA | OPT_COM_PORT)
    }

    /// Handles a received verb and returns the verb to answer with, or `None` when the
    /// request confirms the current state (no answer, no loop).
    pub fn negotiate(&mut self, verb: u8, option: u8) -> Option<[u8; 3]> {
        let (local, want) = match verb {
            DO => (true, true),
            DONT => (true, false),
            WILL => (false, true),
            WONT => (false, false),
            _ => return None,
        };
        let accept = Self::acceptable(option);
        let Some(slot) = self.slot(option) else {
            // Unknown option: refuse requests to enable it; a refusal needs no answer.
            return want.then_some([IAC, if local { WONT } else { DONT }, option]);
        };
        let current = if local { slot.local } else { slot.remote };
        let new = want && accept;
        if new == current {
            // Either a confirmation of our own request or a repeat: answering would loop.
            return if want && !accept && !current {
                // Refusal of an option we keep off is still owed once per request.
                Some([IAC, if local { WONT } else { DONT }, option])
            } else {
                None
            };
        }
        if local {
            slot.local = new;
        } else {
            slot.remote = new;
        }
        let answer = match (local, new) {
            (true, true) => WILL,
            (true, false) => WONT,
            (false, true) => DO,
            (false, false) => DONT,
        };
        Some([IAC, answer, option])
    }

    /// RFC 2217 is in force once the client agreed to it on either side (pyserial asks both;
    /// other clients ask only one).
    pub fn com_port_active(&self) -> bool {
        self.com_port.local || self.com_port.remote
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(chunks: &[&[u8]]) -> Vec<TelnetEvent> {
        let mut p = TelnetParser::new();
        let mut ev = Vec::new();
        for c in chunks {
            p.feed(c, &mut ev);
        }
        // Coalesce adjacent data events so that split and whole inputs compare equal.
        let mut out: Vec<TelnetEvent> = Vec::new();
        for e in ev {
            match (out.last_mut(), e) {
                (Some(TelnetEvent::Data(a)), TelnetEvent::Data(b)) => a.extend(b),
                (_, e) => out.push(e),
            }
        }
        out
    }

    #[test]
    fn data_passes_through_and_iac_iac_unescapes() {
        let ev = parse_all(&[b"ab\xff\xffcd"]);
        assert_eq!(ev, vec![TelnetEvent::Data(b"ab\xffcd".to_vec())]);
    }

    #[test]
    fn every_split_point_gives_the_same_events() {
        let stream: Vec<u8> = [
            &b"x\xff\xff"[..],
            &[IAC, WILL, OPT_COM_PORT],
            b"hello",
            &[IAC, SB, OPT_COM_PORT, 1, 0, 0, 0xff, 0xff, 0x10, IAC, SE],
            &[IAC, 241],
            b"\xff\xff\r\n",
        ]
        .concat();
        let whole = parse_all(&[&stream]);
        assert_eq!(
            whole,
            vec![
                TelnetEvent::Data(b"x\xff".to_vec()),
                TelnetEvent::Negotiate {
                    verb: WILL,
                    option: OPT_COM_PORT
                },
                TelnetEvent::Data(b"hello".to_vec()),
                TelnetEvent::Subnegotiation {
                    option: OPT_COM_PORT,
                    value: vec![1, 0, 0, 0xff, 0x10]
                },
                TelnetEvent::Command(241),
                TelnetEvent::Data(b"\xff\r\n".to_vec()),
            ]
        );
        for i in 0..=stream.len() {
            for j in i..=stream.len() {
                let got = parse_all(&[&stream[..i], &stream[i..j], &stream[j..]]);
                assert_eq!(got, whole, "split at {i},{j}");
            }
        }
        let bytewise: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(parse_all(&bytewise), whole);
    }

    #[test]
    fn oversized_subnegotiation_is_bounded_and_reported() {
        let mut stream = vec![IAC, SB, OPT_COM_PORT];
        stream.extend(std::iter::repeat_n(b'a', 1_000_000));
        stream.extend([IAC, SE]);
        stream.extend(b"after");
        let mut p = TelnetParser::new();
        let mut ev = Vec::new();
        for c in stream.chunks(4096) {
            p.feed(c, &mut ev);
            assert!(p.sb_value.capacity() <= 4 * MAX_SUBNEGOTIATION);
        }
        assert_eq!(
            ev,
            vec![
                TelnetEvent::OversizedSubnegotiation {
                    option: OPT_COM_PORT,
                    length: 1_000_000
                },
                TelnetEvent::Data(b"after".to_vec())
            ]
        );
    }

    #[test]
    fn unterminated_subnegotiation_recovers_on_next_command() {
        let ev = parse_all(&[&[IAC, SB, OPT_COM_PORT, 5, 8, IAC, WILL, OPT_SGA], b"z"]);
        assert_eq!(
            ev,
            vec![
                TelnetEvent::Subnegotiation {
                    option: OPT_COM_PORT,
                    value: vec![5, 8]
                },
                TelnetEvent::Negotiate {
                    verb: WILL,
                    option: OPT_SGA
                },
                TelnetEvent::Data(b"z".to_vec())
            ]
        );
    }

    #[test]
    fn escape_doubles_every_iac() {
        let mut out = Vec::new();
        escape_into(b"\xffa\xff\xffb", &mut out);
        assert_eq!(out, b"\xff\xffa\xff\xff\xff\xffb");
        let mut p = TelnetParser::new();
        let mut ev = Vec::new();
        p.feed(&out, &mut ev);
        assert_eq!(ev, vec![TelnetEvent::Data(b"\xffa\xff\xffb".to_vec())]);
    }

    #[test]
    fn all_byte_values_round_trip() {
        let all: Vec<u8> = (0..=255u8).collect();
        let mut out = Vec::new();
        escape_into(&all, &mut out);
        assert_eq!(out.len(), 257);
        assert_eq!(parse_all(&[&out]), vec![TelnetEvent::Data(all)]);
    }

    #[test]
    fn greeting_then_pyserial_requests_are_not_answered_twice() {
        let mut o = Options::new();
        let g = o.greeting();
        assert!(g.windows(3).any(|w| w == [IAC, DO, OPT_COM_PORT]));
        assert!(o.com_port_active());
        // pyserial's open: DO ECHO, WILL SGA, DO SGA, DO COM-PORT, WILL COM-PORT.
        assert_eq!(o.negotiate(DO, OPT_ECHO), Some([IAC, WONT, OPT_ECHO]));
        assert_eq!(o.negotiate(WILL, OPT_SGA), Some([IAC, DO, OPT_SGA]));
        assert_eq!(
            o.negotiate(DO, OPT_SGA),
            None,
            "we offered WILL SGA already"
        );
        assert_eq!(o.negotiate(DO, OPT_COM_PORT), None);
        assert_eq!(o.negotiate(WILL, OPT_COM_PORT), None);
        // Its answers to our BINARY offer are confirmations too.
        assert_eq!(o.negotiate(WILL, OPT_BINARY), None);
        assert_eq!(o.negotiate(DO, OPT_BINARY), None);
        // Repeats are never answered.
        assert_eq!(o.negotiate(WILL, OPT_SGA), None);
    }

    #[test]
    fn state_changes_are_answered_once() {
        let mut o = Options::new();
        assert_eq!(
            o.negotiate(WILL, OPT_COM_PORT),
            Some([IAC, DO, OPT_COM_PORT])
        );
        assert_eq!(o.negotiate(WILL, OPT_COM_PORT), None);
        assert_eq!(
            o.negotiate(WONT, OPT_COM_PORT),
            Some([IAC, DONT, OPT_COM_PORT])
        );
        assert_eq!(o.negotiate(WONT, OPT_COM_PORT), None);
        assert!(!o.com_port_active());
        assert_eq!(o.negotiate(DONT, OPT_SGA), None, "already off");
    }

    #[test]
    fn unknown_options_are_refused_and_refusals_not_answered() {
        let mut o = Options::new();
        assert_eq!(o.negotiate(DO, 24), Some([IAC, WONT, 24]));
        assert_eq!(o.negotiate(WILL, 31), Some([IAC, DONT, 31]));
        assert_eq!(o.negotiate(WONT, 24), None);
        assert_eq!(o.negotiate(DONT, 31), None);
    }
}
