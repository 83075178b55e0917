//! What happens on the wire between two UARTs: how long bytes take (8N1, ten
//! bit times each), what a receiver set to the wrong rate makes of them, and
//! what is left of them after wiring too slow for their rate.
//!
//! The garbling is a bit-level model rather than random noise: the sender's
//! line is rebuilt from its start, data and stop bits, and a receiver at its
//! own rate looks for falling edges and samples mid-bit, the way a UART does.
//! So a host at 921600 reading a chip at 115200 sees bursts of mostly zero
//! bytes, and a host at 115200 reading a faster chip sees fewer, merged bytes,
//! much like the garbage a real board prints at the wrong rate.
//!
//! A wire that cannot carry a rate (a level shifter, an opto-isolator, long
//! or loaded wiring: `--max-baud`) is modelled as a line that cannot follow
//! pulses shorter than one bit at its limit: such pulses are swallowed, the
//! line keeps its level until the sender holds a new one long enough. Above
//! the limit every single-bit pulse disappears, so whatever the receiver's
//! rate, what it decodes is garbage.

use std::time::Duration;

/// Bits per byte on the wire: start, eight data bits, stop.
pub const BITS_PER_BYTE: u64 = 10;

/// How long `n` bytes occupy the line at `baud`.
pub fn wire_time(n: usize, baud: u32) -> Duration {
    let baud = u64::from(baud.max(1));
    Duration::from_nanos((n as u64).saturating_mul(BITS_PER_BYTE * 1_000_000_000) / baud)
}

/// The bytes a receiver at `rx_baud` decodes from `bytes` sent back to back
/// at `tx_baud`. With equal rates this is the identity.
///
/// A rate of 0 is a UART whose divider no rate matches (`crate::NO_BAUD`):
/// it runs at about 1 baud and never agrees with the other side, so a host
/// reading it sees a few zero bytes, and a chip at 0 hears nothing.
pub fn garble(bytes: &[u8], tx_baud: u32, rx_baud: u32) -> Vec<u8> {
    match (tx_baud, rx_baud) {
        (0, 0) => Vec::new(),
        (tx, rx) if tx == rx => bytes.to_vec(),
        (tx, rx) => decode(&Line::new(bytes, tx), rx),
    }
}

/// Like [`garble`], with the line passing through wiring that cannot carry
/// pulses shorter than a bit at `max_baud` (see the module doc). Only
/// meaningful when `tx_baud > max_baud`; at or below it the wire is
/// transparent and this is [`garble`].
pub fn through_slow_wire(bytes: &[u8], tx_baud: u32, rx_baud: u32, max_baud: u32) -> Vec<u8> {
    if tx_baud <= max_baud {
        return garble(bytes, tx_baud, rx_baud);
    }
    let mut line = Line::new(bytes, tx_baud);
    line.swallow_pulses_shorter_than(1.0 / f64::from(max_baud.max(1)));
    decode(&line, rx_baud)
}

/// A line's level over time: high (idle) before the first transition, then
/// the level of the last transition at or before any moment.
struct Line {
    /// (time in seconds, level from then on), in time order, alternating.
    transitions: Vec<(f64, bool)>,
}

impl Line {
    /// `bytes` sent back to back at `baud`, 8N1, from time 0.
    fn new(bytes: &[u8], baud: u32) -> Line {
        let bit = 1.0 / f64::from(baud.max(1));
        let mut transitions = Vec::new();
        let mut level = true;
        for (i, &byte) in bytes.iter().enumerate() {
            for k in 0..10 {
                let b = match k {
                    0 => false,
                    9 => true,
                    k => (byte >> (k - 1)) & 1 == 1,
                };
                if b != level {
                    level = b;
                    transitions.push(((i * 10 + k) as f64 * bit, b));
                }
            }
        }
        Line { transitions }
    }

    fn level_at(&self, t: f64) -> bool {
        let n = self.transitions.partition_point(|&(at, _)| at <= t);
        n == 0 || self.transitions[n - 1].1
    }

    /// The first falling edge at or after `t`.
    fn falling_edge_from(&self, t: f64) -> Option<f64> {
        let n = self.transitions.partition_point(|&(at, _)| at < t);
        self.transitions[n..]
            .iter()
            .find(|&&(_, level)| !level)
            .map(|&(at, _)| at)
    }

    /// The line follows the sender only once it has held a level for `min`
    /// seconds (and then that much late); shorter pulses leave no trace.
    fn swallow_pulses_shorter_than(&mut self, min: f64) {
        // A pulse of exactly `min` passes, whatever the rounding.
        let min_held = min * (1.0 - 1e-9);
        let mut out: Vec<(f64, bool)> = Vec::new();
        let mut level = true;
        for (i, &(at, to)) in self.transitions.iter().enumerate() {
            // The idle line after the last transition is held forever.
            let until = self.transitions.get(i + 1).map_or(f64::INFINITY, |t| t.0);
            if to != level && until - at >= min_held {
                level = to;
                out.push((at + min, to));
            }
        }
        self.transitions = out;
    }
}

/// What a UART at `rx_baud` decodes from `line`: it waits for a falling
/// edge, checks the start bit mid-bit, samples eight data bits, and is
/// ready again after the stop bit's middle.
fn decode(line: &Line, rx_baud: u32) -> Vec<u8> {
    let rx_bit = 1.0 / f64::from(rx_baud.max(1));
    let mut out = Vec::new();
    // The receiver is ready to see a start bit from time `t` on.
    let mut t = 0.0f64;
    while let Some(edge) = line.falling_edge_from(t) {
        let mid = edge + rx_bit / 2.0;
        if line.level_at(mid) {
            // A glitch shorter than half a bit: not a start bit.
            t = mid;
            continue;
        }
        let mut v = 0u8;
        for k in 0..8 {
            if line.level_at(mid + f64::from(k + 1) * rx_bit) {
                v |= 1 << k;
            }
        }
        // With INPCK off, Linux delivers a byte with a framing error as is.
        out.push(v);
        t = mid + 9.0 * rx_bit;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_rate_is_transparent() {
        let b = [0x00, 0xC0, 0x55, 0xFF];
        assert_eq!(garble(&b, 115_200, 115_200), b);
    }

    #[test]
    fn model_decodes_at_the_right_rate_and_garbles_otherwise() {
        // The bit model itself must be exact when both sides agree, even if
        // the comparison shortcut is bypassed by nearly equal rates.
        let sync = [
            0xC0, 0x00, 0x08, 0x24, 0x07, 0x07, 0x12, 0x20, 0x55, 0x55, 0xC0,
        ];
        assert_eq!(garble(&sync, 115_200, 115_201), sync);
        let fast = garble(&sync, 115_200, 921_600);
        assert_ne!(fast, sync);
        assert!(fast.len() > sync.len(), "a fast receiver sees more bytes");
        let slow = garble(&sync, 921_600, 115_200);
        assert_ne!(slow, sync);
        assert!(slow.len() < sync.len(), "a slow receiver sees fewer bytes");
        assert!(garble(&sync, 115_200, 9_600).len() < sync.len());
    }

    #[test]
    fn a_slow_wire_passes_what_it_can_carry_and_garbles_the_rest() {
        let sync = [
            0xC0, 0x00, 0x08, 0x24, 0x07, 0x07, 0x12, 0x20, 0x55, 0x55, 0xC0,
        ];
        // At or below its limit the wire is transparent.
        assert_eq!(through_slow_wire(&sync, 460_800, 460_800, 460_800), sync);
        assert_eq!(through_slow_wire(&sync, 115_200, 115_200, 460_800), sync);
        assert_eq!(
            through_slow_wire(&sync, 115_200, 921_600, 460_800),
            garble(&sync, 115_200, 921_600)
        );
        // Above it, both ends at the same rate still do not understand each other.
        let got = through_slow_wire(&sync, 921_600, 921_600, 460_800);
        assert_ne!(got, sync);
        // Alternating bits are single-bit pulses: nothing of them survives.
        assert!(through_slow_wire(&[0x55; 32], 921_600, 921_600, 460_800).is_empty());
        // A long low run (start bit and 0x00) is held long enough to pass.
        assert_eq!(
            through_slow_wire(&[0x00], 921_600, 921_600, 460_800),
            [0x00]
        );
        // A rate of 0 (no divider a host can match): zeros or nothing.
        let from_dead = garble(&sync, 0, 115_200);
        assert!(!from_dead.is_empty() && from_dead.iter().all(|&b| b == 0));
        assert!(garble(&sync, 115_200, 0).is_empty());
        assert!(garble(&sync, 0, 0).is_empty());
    }

    #[test]
    fn wire_time_is_ten_bits_per_byte() {
        assert_eq!(wire_time(11_520, 115_200), Duration::from_secs(1));
        assert_eq!(wire_time(0, 0), Duration::ZERO);
    }
}
