//! Random interleavings of client and device bytes through the ESP-aware raw port's watcher.
//!
//! The input is a script of steps: a header byte (top bit: 0 = from the client, 1 = from the
//! device; low 7 bits: length) followed by that many bytes. Properties, beyond "does not
//! panic": bytes pass unchanged both ways (the concatenated Data events are the client's bytes,
//! what goes to the client is the device's bytes), held back only while the opening is
//! undecided; EnterBootloader comes once, first, exactly when the client opened with esptool's
//! SYNC; a baud switch only ever asks for a real rate. (With a flash rate, see the
//! `flash_rate` target.)
#![no_main]

use esp_bridge::protocol::Event;
use esp_bridge::protocol::esp_raw::EspRaw;
use libfuzzer_sys::fuzz_target;

/// How esptool's SYNC request starts: END, request, SYNC, length 36 (little-endian).
const SYNC_START: [u8; 5] = [0xC0, 0x00, 0x08, 36, 0];

fuzz_target!(|script: &[u8]| {
    let mut raw = EspRaw::new(115_200, None, false);
    let (mut from_client, mut from_device) = (Vec::new(), Vec::new());
    let (mut client_events, mut device_events) = (Vec::new(), Vec::new());
    let mut to_client = Vec::new();
    let mut rest = script;
    while let Some((&header, tail)) = rest.split_first() {
        let n = usize::from(header & 0x7f).min(tail.len());
        let (bytes, tail) = tail.split_at(n);
        rest = tail;
        if header & 0x80 == 0 {
            from_client.extend_from_slice(bytes);
            let before = client_events.len();
            raw.from_client(bytes, &mut Vec::new(), &mut client_events);
            let added = client_events.len() - before;
            assert!(added <= 3, "{added} events for one read");
        } else {
            from_device.extend_from_slice(bytes);
            let before = to_client.len();
            raw.from_device(bytes, std::time::Instant::now(), &mut to_client, &mut device_events);
            assert_eq!(
                &to_client[before..],
                bytes,
                "device bytes changed on the way"
            );
        }
    }
    assert_eq!(to_client, from_device);

    let data = Event::data_of(&client_events);
    let esptool = from_client.len() >= SYNC_START.len() && from_client[..5] == SYNC_START;
    let undecided = from_client.len() < SYNC_START.len() && SYNC_START.starts_with(&from_client);
    if undecided {
        // Fewer bytes than SYNC's start, all matching it: held until the next read tells.
        assert!(data.is_empty(), "undecided opening passed on");
    } else {
        assert_eq!(data, from_client, "client bytes changed on the way");
    }
    let entries = client_events
        .iter()
        .filter(|e| **e == Event::EnterBootloader)
        .count();
    assert_eq!(
        entries,
        usize::from(esptool),
        "EnterBootloader for {:?}",
        &from_client[..from_client.len().min(8)]
    );
    if esptool {
        assert_eq!(
            client_events[0],
            Event::EnterBootloader,
            "the reset goes before the bytes"
        );
    }
    for e in &client_events {
        assert!(
            matches!(e, Event::Data(d) if !d.is_empty()) || *e == Event::EnterBootloader,
            "{e:?}"
        );
    }
    for e in &device_events {
        assert!(matches!(e, Event::SwitchBaud(b) if *b > 0), "{e:?}");
    }
});
