//! Serial line settings: the values a port can be set to. One vocabulary for the config file
//! (which deserializes them), the RFC 2217 codec (which decodes them from the wire and encodes
//! them back) and the UART (which applies them).

use serde::{Deserialize, Serialize};

/// The baud rates esp-bridge sets a UART to: the config's range, and the limit for every rate a
/// client asks for (SET-BAUDRATE, the raw port's CHANGE_BAUDRATE). Outside it the UART keeps
/// its rate.
pub const BAUD_MIN: u32 = 50;
pub const BAUD_MAX: u32 = 20_000_000;

/// Whether `baud` is one esp-bridge sets a UART to.
pub fn baud_in_range(baud: u32) -> bool {
    (BAUD_MIN..=BAUD_MAX).contains(&baud)
}

/// Parity as Linux UARTs offer it (RFC 2217's mark and space are not among them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    None,
    Odd,
    Even,
}

/// Stop bits as Linux UARTs offer them (RFC 2217's 1.5 is not among them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "i64", into = "i64")]
pub enum StopBits {
    One,
    Two,
}

impl From<StopBits> for i64 {
    fn from(s: StopBits) -> i64 {
        i64::from(s.count())
    }
}

impl TryFrom<i64> for StopBits {
    type Error = String;
    fn try_from(v: i64) -> Result<Self, String> {
        match v {
            1 => Ok(StopBits::One),
            2 => Ok(StopBits::Two),
            _ => Err(format!("stop_bits {v} is not allowed: use 1 or 2")),
        }
    }
}

impl StopBits {
    pub fn count(self) -> u8 {
        match self {
            StopBits::One => 1,
            StopBits::Two => 2,
        }
    }
}

/// Flow control of the UART.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowControl {
    None,
    /// XON/XOFF.
    Software,
    /// RTS/CTS.
    Hardware,
}

impl std::fmt::Display for Parity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Parity::None => "none",
            Parity::Odd => "odd",
            Parity::Even => "even",
        })
    }
}

impl std::fmt::Display for FlowControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FlowControl::None => "none",
            FlowControl::Software => "software",
            FlowControl::Hardware => "hardware",
        })
    }
}

/// The line settings in force on a UART.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineSettings {
    pub baud: u32,
    /// 5 to 8.
    pub data_bits: u8,
    pub parity: Parity,
    pub stop_bits: StopBits,
    pub flow: FlowControl,
}
