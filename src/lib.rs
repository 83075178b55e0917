//! esp-bridge: an RFC 2217 serial bridge for ESP8266/ESP32 boards wired to a Raspberry Pi.
//!
//! The crate is a stack of layers, each testable on its own (ARCHITECTURE.md draws them):
//! - [`protocol`]: the codec: telnet and RFC 2217, and the raw port's ESP loader watcher
//!   (bytes in, typed events out; no I/O);
//! - `session`: one client: the pump that keeps data and commands in stream order, and the
//!   COM port it drives;
//! - `uart` and `control`: the device backends (the UART; the EN/IO0 lines: the reset engine,
//!   its planner, the gpio and modem drivers);
//! - `bridge`: one board: its listeners, its accept policy, its active session, its status;
//! - `supervisor`: the process: signals, systemd notifications, reload, idle exit, shutdown
//!   (`shutdown`: the stop signal every task waits on);
//! - `service`, [`cli`], [`config`], `systemd`: the edge where it is configured and started;
//! - `demo`: the bridge in front of the virtual ESP32 of the esp-sim crate; `setup_pi`: the
//!   Raspberry Pi's UART made free for the board.
//!
//! Public: the command line ([`cli::run`]), the codec and the configuration (for the fuzz
//! targets), and [`serve`] with the control-line traits (for the in-process tests).

mod admin;
mod bridge;
mod check;
pub mod cli;
pub mod config;
mod connection;
mod console;
mod control;
mod demo;
mod devices;
mod error;
mod fanout;
mod history;
mod identify;
mod journal_output;
mod labgrid;
mod log_limit;
mod pi_uarts;
pub mod protocol;
mod seat;
mod service;
mod session;
mod settings;
mod setup_pi;
mod shutdown;
mod status;
mod supervisor;
mod sysfs;
mod systemd;
mod timer;
mod uart;
mod units;
mod watcher;

pub use bridge::Listener;
pub use control::{Control, ModemOutputs, NoControl};
pub use protocol::PortKind;
pub use service::serve;
