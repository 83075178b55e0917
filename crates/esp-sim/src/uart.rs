//! What happens on the wire between two UARTs: how long bytes take (8N1, ten
//! bit times each), and what a receiver set to the wrong rate makes of them.
//!
//! The garbling is a bit-level model rather than random noise: the sender's
//! line is rebuilt from its start, data and stop bits, and a receiver at its
//! own rate looks for falling edges and samples mid-bit, the way a UART does.
//! So a host at 921600 reading a chip at 115200 sees bursts of mostly zero
//! bytes, and a host at 115200 reading a faster chip sees fewer, merged bytes,
//! much like the garbage a real board prints at the wrong rate.

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
pub fn garble(bytes: &[u8], tx_baud: u32, rx_baud: u32) -> Vec<u8> {
    if tx_baud == rx_baud {
        return bytes.to_vec();
    }
    let line = |bit: i64| -> bool {
        // Idle (before and after the transmission) is high.
        if bit < 0 || bit as usize >= bytes.len() * 10 {
            return true;
        }
        let byte = bytes[bit as usize / 10];
        match bit % 10 {
            0 => false,
            9 => true,
            k => (byte >> (k - 1)) & 1 == 1,
        }
    };
    let tx_bit = 1.0 / f64::from(tx_baud.max(1));
    let rx_bit = 1.0 / f64::from(rx_baud.max(1));
    let level_at = |t: f64| line((t / tx_bit).floor() as i64);
    let total_bits = (bytes.len() * 10) as i64;

    let mut out = Vec::new();
    // The receiver is ready to see a start bit from time `t` on.
    let mut t = 0.0f64;
    loop {
        // Falling edges happen only at the sender's bit boundaries.
        let mut i = (t / tx_bit).ceil() as i64;
        while i < total_bits && (!line(i - 1) || line(i)) {
            i += 1;
        }
        if i >= total_bits {
            break;
        }
        let edge = i as f64 * tx_bit;
        let mid = edge + rx_bit / 2.0;
        if level_at(mid) {
            // A glitch shorter than half a bit: not a start bit.
            t = mid;
            continue;
        }
        let mut v = 0u8;
        for k in 0..8 {
            if level_at(mid + f64::from(k + 1) * rx_bit) {
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
    fn wire_time_is_ten_bits_per_byte() {
        assert_eq!(wire_time(11_520, 115_200), Duration::from_secs(1));
        assert_eq!(wire_time(0, 0), Duration::ZERO);
    }
}
