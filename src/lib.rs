//! esp-bridge: an RFC 2217 serial bridge for ESP8266/ESP32 boards wired to a Raspberry Pi.
//!
//! The crate is a stack of layers, each testable on its own:
//! - [`protocol`]: the telnet / RFC 2217 codec (bytes in, events out; no I/O),
//! - [`session`]: one client, owning the ordering of data and port commands,
//! - [`uart`] and [`control`]: the device backends (the UART, the EN/IO0 lines),
//! - [`server`] and [`shutdown`]: accepting clients, one at a time, and stopping cleanly,
//! - [`config`] and [`cli`]: the edge where users configure and start it,
//! - [`demo`]: the bridge in front of the virtual ESP32 of the esp-sim crate.

pub mod cli;
pub mod config;
pub mod control;
pub mod demo;
pub mod error;
pub mod protocol;
pub mod server;
pub mod service;
pub mod session;
pub mod setup_pi;
pub mod shutdown;
pub mod systemd;
pub mod uart;
