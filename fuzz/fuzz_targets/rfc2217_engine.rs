//! Random client bytes, in random chunkings, through the RFC 2217 engine exactly as the
//! session drives it (greeting first, then `receive` per TCP read).
//!
//! Properties, beyond "does not panic":
//! - split invariance: any chunking gives the same events and the same answers as one read;
//! - round trip: the data events, escaped again, are exactly the data bytes of the input as a
//!   simple byte-at-a-time reference model of RFC 854 finds them;
//! - bounded output: answers and events grow at most proportionally to the input, and a
//!   subnegotiation value is never kept beyond MAX_SUBNEGOTIATION.
#![no_main]

use esp_bridge::protocol::telnet::{self, DO, DONT, IAC, MAX_SUBNEGOTIATION, SB, SE, WILL, WONT};
use esp_bridge::protocol::{Engine, Event, PortCommand};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let whole = run(input, &[input.len()]);
    // The chunking comes from the input itself, so that it is reproducible from a crash file
    // and the seeds stay plain client streams.
    let chunked = run(input, &chunk_sizes(input));
    assert_eq!(
        coalesce(&whole.0),
        coalesce(&chunked.0),
        "events depend on the chunking"
    );
    assert_eq!(whole.1, chunked.1, "answers depend on the chunking");
    if input.len() <= 1024 {
        let bytewise = run(input, &vec![1; input.len()]);
        assert_eq!(
            coalesce(&whole.0),
            coalesce(&bytewise.0),
            "events differ byte by byte"
        );
        assert_eq!(whole.1, bytewise.1, "answers differ byte by byte");
    }

    let (events, answers) = whole;
    let data = Event::data_of(&events);
    let mut escaped = Vec::new();
    Engine::encode_data(&data, &mut escaped);
    assert_eq!(escaped, reference_data(input), "data does not round-trip");

    // The device's direction: what the engine escapes, a telnet peer reads back unchanged.
    let mut peer = Engine::new();
    let (mut back, mut ignored) = (Vec::new(), Vec::new());
    peer.receive(&escaped, &mut back, &mut ignored);
    assert_eq!(
        coalesce(&back),
        if data.is_empty() {
            vec![]
        } else {
            vec![Event::Data(data.clone())]
        }
    );

    // Bounded: every answer is 3 bytes for a 3-byte request; events carry no more than their
    // input plus a short message each.
    assert!(
        answers.len() <= input.len(),
        "{} answer bytes for {} input bytes",
        answers.len(),
        input.len()
    );
    assert!(data.len() <= input.len());
    assert!(
        events.len() <= input.len() + 1,
        "{} events for {} bytes",
        events.len(),
        input.len()
    );
    let mut carried = 0usize;
    for e in &events {
        carried += match e {
            Event::Data(d) => d.len(),
            Event::Port(PortCommand::Signature(Some(s))) => {
                assert!(
                    s.len() < MAX_SUBNEGOTIATION,
                    "signature of {} bytes kept",
                    s.len()
                );
                s.len()
            }
            Event::Ignored(text) => {
                assert!(text.len() <= 200, "{text}");
                text.len()
            }
            Event::EnterBootloader | Event::SwitchBaud(_) => panic!("raw-port event from telnet"),
            _ => 0,
        };
    }
    assert!(carried <= 64 * input.len() + 64);
});

/// Feeds `input` to a fresh engine in chunks of the given sizes.
fn run(input: &[u8], sizes: &[usize]) -> (Vec<Event>, Vec<u8>) {
    let mut engine = Engine::new();
    let _greeting = engine.greeting();
    let (mut events, mut answers) = (Vec::new(), Vec::new());
    let mut rest = input;
    for &n in sizes {
        let (chunk, tail) = rest.split_at(n.min(rest.len()));
        engine.receive(chunk, &mut events, &mut answers);
        rest = tail;
    }
    engine.receive(rest, &mut events, &mut answers);
    (events, answers)
}

/// Chunk sizes from a PRNG seeded by the input (FNV-1a, then xorshift): mostly small reads,
/// sometimes large ones, as TCP delivers them.
fn chunk_sizes(input: &[u8]) -> Vec<usize> {
    let mut seed = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }) | 1;
    let mut sizes = Vec::new();
    let mut left = input.len();
    while left > 0 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let n = if seed % 8 == 0 {
            (seed >> 8) as usize % 4096
        } else {
            (seed >> 8) as usize % 8
        };
        let n = n.clamp(1, left);
        sizes.push(n);
        left -= n;
    }
    sizes
}

/// Joins adjacent data events: how data is split into events depends on the reads.
fn coalesce(events: &[Event]) -> Vec<Event> {
    let mut out: Vec<Event> = Vec::new();
    for e in events {
        match (out.last_mut(), e) {
            (Some(Event::Data(a)), Event::Data(b)) => a.extend_from_slice(b),
            (_, e) => out.push(e.clone()),
        }
    }
    out
}

/// An independent, byte-at-a-time reading of the stream (RFC 854, with the engine's recovery
/// rule: IAC followed by anything but IAC or SE inside a subnegotiation ends it and is read as
/// a command). Returns the data bytes as they stood in the input, IAC IAC kept doubled.
fn reference_data(input: &[u8]) -> Vec<u8> {
    #[derive(Clone, Copy)]
    enum S {
        Data,
        Iac,
        Verb,
        SbOption,
        SbValue,
        SbIac,
    }
    fn after_iac(b: u8, out: &mut Vec<u8>) -> S {
        match b {
            IAC => {
                out.extend_from_slice(&[IAC, IAC]);
                S::Data
            }
            DO | DONT | WILL | WONT => S::Verb,
            SB => S::SbOption,
            _ => S::Data,
        }
    }
    let mut out = Vec::new();
    let mut s = S::Data;
    for &b in input {
        s = match s {
            S::Data if b == IAC => S::Iac,
            S::Data => {
                out.push(b);
                S::Data
            }
            S::Iac => after_iac(b, &mut out),
            S::Verb => S::Data,
            S::SbOption => S::SbValue,
            S::SbValue if b == IAC => S::SbIac,
            S::SbValue => S::SbValue,
            S::SbIac if b == IAC => S::SbValue,
            S::SbIac if b == SE => S::Data,
            S::SbIac => after_iac(b, &mut out),
        };
    }
    out
}

// The reference model must agree with the constants the engine uses.
const _: () = assert!(telnet::IAC == 255 && telnet::SE == 240);
