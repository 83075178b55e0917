//! esp-bridge: an RFC 2217 serial bridge for ESP8266/ESP32 boards wired to a Raspberry Pi.
//!
//! The crate is a stack of layers, each testable on its own:
//! - [`protocol`]: the telnet / RFC 2217 codec (bytes in, events out; no I/O),
//! - [`serial`] and [`control`]: the device backends (the UART, the EN/IO0 lines),
//! - [`config`]: the edge where users configure it.

pub mod config;
pub mod control;
pub mod protocol;
pub mod serial;
