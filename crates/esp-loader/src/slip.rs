//! SLIP framing as the ESP ROM loader and the flasher stub speak it: frames
//! delimited by `0xC0`, with `0xC0`/`0xDB` escaped as `DB DC`/`DB DD`.
//!
//! Pure code: bytes in, frames out. The decoder is bounded and never fails
//! hard: anything it cannot make sense of is dropped, the way the ROM drops
//! noise between frames.

pub const END: u8 = 0xC0;
pub const ESC: u8 = 0xDB;
pub const ESC_END: u8 = 0xDC;
pub const ESC_ESC: u8 = 0xDD;

/// Largest frame payload the sim accepts. The biggest legitimate request is a
/// 16 KiB flash block plus its 16-byte data header and the 8-byte command
/// header; anything beyond 64 KiB is noise and is discarded.
pub const MAX_FRAME: usize = 64 * 1024;

/// Encodes one payload as a complete SLIP frame (with both delimiters).
pub fn encode(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + payload.len() / 16 + 2);
    out.push(END);
    for &b in payload {
        match b {
            END => out.extend_from_slice(&[ESC, ESC_END]),
            ESC => out.extend_from_slice(&[ESC, ESC_ESC]),
            _ => out.push(b),
        }
    }
    out.push(END);
    out
}

/// Why a frame was dropped instead of delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// `0xDB` followed by something other than `0xDC`/`0xDD`.
    BadEscape,
    /// The frame grew past [`MAX_FRAME`].
    Oversized,
    /// Some of its bytes arrived at the wrong baud rate.
    Garbled,
}

/// What one input byte completed, if anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    Frame(Vec<u8>),
    Dropped(Dropped),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between frames: everything but `0xC0` is line noise.
    Idle,
    InFrame,
    Escape,
    /// The current frame is already lost; skip to its closing `0xC0`.
    Discard(Dropped),
}

#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    state: State,
    garbled: bool,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    pub fn new() -> Self {
        Decoder {
            buf: Vec::new(),
            state: State::Idle,
            garbled: false,
        }
    }

    /// Forgets any partial frame (a chip reset clears the UART FIFO).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.state = State::Idle;
        self.garbled = false;
    }

    /// True while a frame is open, i.e. the next `0xC0` would close it.
    pub fn in_frame(&self) -> bool {
        self.state != State::Idle
    }

    /// Feeds one byte that arrived at the wrong baud rate: the UART decoded
    /// *something*, but the frame it lands in is lost however plausible its
    /// bytes look.
    pub fn push_garbled(&mut self, b: u8) -> Option<Decoded> {
        let out = self.push(b);
        if self.state != State::Idle {
            self.garbled = true;
        }
        out
    }

    /// Feeds one byte; returns a frame or a drop notice when `0xC0` closes one.
    pub fn push(&mut self, b: u8) -> Option<Decoded> {
        match self.state {
            State::Idle => {
                if b == END {
                    self.buf.clear();
                    self.garbled = false;
                    self.state = State::InFrame;
                }
                None
            }
            State::InFrame => match b {
                END => {
                    if self.buf.is_empty() {
                        // `C0 C0`: the second delimiter opens the next frame.
                        self.garbled = false;
                        return None;
                    }
                    self.state = State::InFrame;
                    let garbled = std::mem::take(&mut self.garbled);
                    let frame = std::mem::take(&mut self.buf);
                    if garbled {
                        Some(Decoded::Dropped(Dropped::Garbled))
                    } else {
                        Some(Decoded::Frame(frame))
                    }
                }
                ESC => {
                    self.state = State::Escape;
                    None
                }
                _ => self.store(b),
            },
            State::Escape => match b {
                ESC_END => {
                    self.state = State::InFrame;
                    self.store(END)
                }
                ESC_ESC => {
                    self.state = State::InFrame;
                    self.store(ESC)
                }
                END => self.finish_dropped(Dropped::BadEscape),
                _ => {
                    self.buf.clear();
                    self.state = State::Discard(Dropped::BadEscape);
                    None
                }
            },
            State::Discard(why) => {
                if b == END {
                    self.finish_dropped(why)
                } else {
                    None
                }
            }
        }
    }

    fn store(&mut self, b: u8) -> Option<Decoded> {
        if self.buf.len() >= MAX_FRAME {
            self.buf = Vec::new();
            self.state = State::Discard(Dropped::Oversized);
        } else {
            self.buf.push(b);
        }
        None
    }

    fn finish_dropped(&mut self, why: Dropped) -> Option<Decoded> {
        self.buf.clear();
        self.garbled = false;
        // The closing delimiter of a broken frame is also taken as the
        // opening one of the next, as the ROM's reader does.
        self.state = State::InFrame;
        Some(Decoded::Dropped(why))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(d: &mut Decoder, bytes: &[u8]) -> Vec<Decoded> {
        bytes.iter().filter_map(|&b| d.push(b)).collect()
    }

    #[test]
    fn roundtrip_with_escapes() {
        let payload = [0x00, 0xC0, 0xDB, 0xDC, 0xDD, 0xC0, 0xFF];
        let enc = encode(&payload);
        assert_eq!(
            enc,
            [
                0xC0, 0x00, 0xDB, 0xDC, 0xDB, 0xDD, 0xDC, 0xDD, 0xDB, 0xDC, 0xFF, 0xC0
            ]
        );
        let mut d = Decoder::new();
        assert_eq!(
            decode_all(&mut d, &enc),
            vec![Decoded::Frame(payload.to_vec())]
        );
    }

    #[test]
    fn noise_between_frames_and_double_delimiters_are_ignored() {
        let mut d = Decoder::new();
        let mut input = b"ets Jun  8\r\n".to_vec();
        input.extend_from_slice(&[0xC0, 0xC0, 1, 2, 0xC0, 0xC0, 3, 0xC0]);
        assert_eq!(
            decode_all(&mut d, &input),
            vec![Decoded::Frame(vec![1, 2]), Decoded::Frame(vec![3])]
        );
    }

    #[test]
    fn bad_escape_drops_only_that_frame() {
        let mut d = Decoder::new();
        let input = [0xC0, 1, 0xDB, 0x42, 2, 0xC0, 5, 6, 0xC0];
        assert_eq!(
            decode_all(&mut d, &input),
            vec![
                Decoded::Dropped(Dropped::BadEscape),
                Decoded::Frame(vec![5, 6])
            ]
        );
    }

    #[test]
    fn escape_then_end_is_a_bad_escape() {
        let mut d = Decoder::new();
        let input = [0xC0, 1, 0xDB, 0xC0, 7, 0xC0];
        assert_eq!(
            decode_all(&mut d, &input),
            vec![
                Decoded::Dropped(Dropped::BadEscape),
                Decoded::Frame(vec![7])
            ]
        );
    }

    #[test]
    fn oversized_frame_is_bounded_and_dropped() {
        let mut d = Decoder::new();
        d.push(END);
        for _ in 0..(MAX_FRAME + 10_000) {
            assert_eq!(d.push(0x55), None);
        }
        assert!(d.buf.capacity() <= MAX_FRAME * 2);
        assert_eq!(d.push(END), Some(Decoded::Dropped(Dropped::Oversized)));
        assert_eq!(decode_all(&mut d, &[9, END]), vec![Decoded::Frame(vec![9])]);
    }

    #[test]
    fn garbled_frame_is_dropped_even_if_well_formed() {
        let mut d = Decoder::new();
        d.push(END);
        d.push_garbled(1);
        assert_eq!(d.push(END), Some(Decoded::Dropped(Dropped::Garbled)));
        // A frame opened by a garbled delimiter is lost too.
        d.reset();
        d.push_garbled(0x33);
        d.push_garbled(END);
        d.push(1);
        assert_eq!(d.push(END), Some(Decoded::Dropped(Dropped::Garbled)));
        assert_eq!(decode_all(&mut d, &[2, END]), vec![Decoded::Frame(vec![2])]);
    }

    #[test]
    fn truncated_frame_is_discarded_by_reset() {
        let mut d = Decoder::new();
        decode_all(&mut d, &[END, 1, 2, 3]);
        assert!(d.in_frame());
        d.reset();
        assert!(!d.in_frame());
        assert_eq!(
            decode_all(&mut d, &[4, END, 5, END]),
            vec![Decoded::Frame(vec![5])]
        );
    }
}
