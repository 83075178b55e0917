//! The values of the configuration: each type checks itself while it is deserialized, so
//! toml's error names the file's line and the key, and says what is allowed.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;

/// What a client that wants to write gets while another client writes and is not silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SecondClient {
    /// It waits (`claim_wait_secs`), then is told who writes and is closed; it takes over
    /// only from a writer silent for `takeover_idle_secs`.
    Refuse,
    /// It takes over at once, even from an active writer (after that writer's first seconds,
    /// and at most one takeover a second): for a client that crashed and reconnects before
    /// keepalive noticed.
    Replace,
}

/// What to do with the chip when its client leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AfterDisconnect {
    /// Release both lines; a chip left in download mode is reset into its application.
    Run,
    /// Release both lines and leave the chip as it is (e.g. in the flasher stub).
    Release,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ControlBackend {
    /// Nothing is driven; DTR/RTS requests are acknowledged only.
    None,
    /// Two GPIO lines wired to EN and IO0.
    Gpio,
    /// The UART's own DTR/RTS (a USB dev board with the auto-program circuit).
    Modem,
}

impl fmt::Display for ControlBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ControlBackend::None => "none",
            ControlBackend::Gpio => "gpio",
            ControlBackend::Modem => "modem",
        })
    }
}

/// How DTR/RTS are interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlMode {
    /// As the intent of a dev board's auto-program circuit, with reset and bootloader
    /// sequences timed on the Pi (see `reset.rs`).
    Esp,
    /// Literally: RTS asserted = EN low, DTR asserted = IO0 low, at the moment they arrive.
    Direct,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Drive {
    PushPull,
    OpenDrain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Bias {
    AsIs,
    Disabled,
    PullUp,
    PullDown,
}

/// A GPIO line: its name as `gpioinfo` shows it ("GPIO22"), or its offset on `chip`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineSpec {
    Name(String),
    Offset(u32),
}

impl fmt::Display for LineSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LineSpec::Name(n) => write!(f, "{n}"),
            LineSpec::Offset(o) => write!(f, "offset {o}"),
        }
    }
}

impl Serialize for LineSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            LineSpec::Name(n) => s.serialize_str(n),
            LineSpec::Offset(o) => s.serialize_u32(*o),
        }
    }
}

impl<'de> Deserialize<'de> for LineSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = LineSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a line name as gpioinfo shows it (e.g. \"GPIO22\") or a line offset (e.g. 22, with chip = \"gpiochip0\")")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<LineSpec, E> {
                if v.trim().is_empty() || v.len() > 31 {
                    Err(E::custom(format!(
                        "line name {v:?} is not valid: give the name gpioinfo shows, e.g. \"GPIO22\""
                    )))
                } else {
                    Ok(LineSpec::Name(v.to_string()))
                }
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<LineSpec, E> {
                u32::try_from(v).map(LineSpec::Offset).map_err(|_| {
                    E::custom(format!("line offset {v} is not valid: offsets start at 0"))
                })
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A device path must be absolute: a relative one would depend on the service's working
/// directory, and an empty one is a forgotten value.
pub fn device_path<'de, D: serde::Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
    let s = String::deserialize(d)?;
    if s.starts_with('/') {
        Ok(PathBuf::from(s))
    } else {
        Err(serde::de::Error::custom(format!(
            "device {s:?} is not an absolute path: give the serial device, e.g. \"/dev/serial0\" or \"/dev/ttyUSB0\""
        )))
    }
}

macro_rules! checked_value {
    ($name:ident, $inner:ty, $check:expr) => {
        #[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
        #[serde(try_from = "i64", into = "i64")]
        pub struct $name(pub $inner);

        impl From<$name> for i64 {
            fn from(v: $name) -> i64 {
                // Every checked value's range fits in an i64: it came from one.
                i64::try_from(v.0).unwrap_or(i64::MAX)
            }
        }

        impl TryFrom<i64> for $name {
            type Error = String;
            fn try_from(v: i64) -> Result<Self, String> {
                let check: fn(i64) -> Result<$inner, String> = $check;
                check(v).map($name)
            }
        }
    };
}

checked_value!(BaudRate, u32, |v| {
    match u32::try_from(v) {
        Ok(b) if crate::settings::baud_in_range(b) => Ok(b),
        _ => Err(format!(
            "baud rate {v} is out of range: use a rate from {} to {}, e.g. 115200",
            crate::settings::BAUD_MIN,
            crate::settings::BAUD_MAX
        )),
    }
});

/// The lowest `flash_baud`: below the ROM's own 115200 a faster rate gains nothing.
pub const FLASH_BAUD_MIN: u32 = 115_200;

checked_value!(FlashBaud, u32, |v| {
    match u32::try_from(v) {
        Ok(0) => Ok(0),
        Ok(b) if (FLASH_BAUD_MIN..=crate::settings::BAUD_MAX).contains(&b) => Ok(b),
        _ => Err(format!(
            "flash_baud {v} is out of range: use 0 (flash at the rate the client asks for) or a rate from {FLASH_BAUD_MIN} to {}, e.g. 921600",
            crate::settings::BAUD_MAX
        )),
    }
});

impl FlashBaud {
    /// The rate the raw port moves a running flasher stub to, if any.
    pub fn rate(&self) -> Option<u32> {
        (self.0 != 0).then_some(self.0)
    }
}

/// The most output a board keeps for `esp-bridge log` (4 MiB).
pub const HISTORY_KIB_MAX: i64 = 4096;

checked_value!(HistoryKib, u32, |v| {
    if (0..=HISTORY_KIB_MAX).contains(&v) {
        Ok(v as u32)
    } else {
        Err(format!(
            "history_kib {v} is out of range: use 0 (keep none) to {HISTORY_KIB_MAX} KiB"
        ))
    }
});

impl HistoryKib {
    /// The limit in bytes.
    pub fn bytes(&self) -> usize {
        usize::try_from(self.0).unwrap_or(0).saturating_mul(1024)
    }
}

checked_value!(DataBits, u8, |v| {
    if (5..=8).contains(&v) {
        Ok(v as u8)
    } else {
        Err(format!("data_bits {v} is not allowed: use 5, 6, 7 or 8"))
    }
});

/// The longest idle exit: a week. Beyond that "never" (0) is what is meant.
pub const IDLE_EXIT_MAX: i64 = 7 * 24 * 3600;

checked_value!(IdleExitSecs, u64, |v| {
    if (0..=IDLE_EXIT_MAX).contains(&v) {
        Ok(v as u64)
    } else {
        Err(format!(
            "idle_exit_secs {v} is out of range: use 0 (never exit) to {IDLE_EXIT_MAX} seconds (a week)"
        ))
    }
});

checked_value!(TakeoverIdleSecs, u64, |v| {
    if (1..=86_400).contains(&v) {
        Ok(v as u64)
    } else {
        Err(format!(
            "takeover_idle_secs {v} is out of range: use 1 to 86400 seconds (a day)"
        ))
    }
});

checked_value!(ClaimWaitSecs, u64, |v| {
    if (0..=600).contains(&v) {
        Ok(v as u64)
    } else {
        Err(format!(
            "claim_wait_secs {v} is out of range: use 0 (refuse at once) to 600 seconds"
        ))
    }
});

checked_value!(KeepaliveSecs, u64, |v| {
    if (1..=3600).contains(&v) {
        Ok(v as u64)
    } else {
        Err(format!(
            "keepalive_secs {v} is out of range: use 1 to 3600 seconds"
        ))
    }
});
