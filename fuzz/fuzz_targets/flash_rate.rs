//! The raw port with a flash rate: esptool's session, the bridge's own exchange with the
//! flasher stub (rate change, probe, the recovery with its reset, SYNC and second upload) and
//! deadlines passing, in random interleavings.
//!
//! The input is a script of steps: a header byte (top two bits: 0 = from the client, 1 or 2 =
//! from the device, 3 = time passes, (low 6 bits) x 20 ms; low 6 bits otherwise: length)
//! followed by that many bytes. Properties, beyond "does not panic": every event is
//! well-formed, and what the bridge holds of the client's bytes stays within what the
//! session lets it read (it stops reading while holding).
#![no_main]

use esp_bridge::protocol::Event;
use esp_bridge::protocol::esp_raw::EspRaw;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|script: &[u8]| {
    let mut raw = EspRaw::new(115_200, Some(921_600), true);
    let mut now = std::time::Instant::now();
    let (mut to_client, mut events) = (Vec::new(), Vec::new());
    let mut rest = script;
    while let Some((&header, tail)) = rest.split_first() {
        let n = usize::from(header & 0x3f).min(tail.len());
        let (bytes, tail) = tail.split_at(n);
        rest = tail;
        match header >> 6 {
            // The session reads the client only while nothing is held.
            0 if !raw.holding() => raw.from_client(bytes, &mut to_client, &mut events),
            0 => {}
            1 | 2 => raw.from_device(bytes, now, &mut to_client, &mut events),
            _ => {
                now += std::time::Duration::from_millis(u64::from(header & 0x3f) * 20);
                if raw.deadline().is_some_and(|d| d <= now) {
                    raw.on_deadline(now, &mut to_client, &mut events);
                }
            }
        }
    }
    for e in &events {
        match e {
            Event::SwitchBaud(b) => assert!(*b > 0),
            Event::Data(d) => assert!(!d.is_empty()),
            Event::Settle(d) => assert!(d.as_millis() <= 1000),
            _ => {}
        }
    }
});
