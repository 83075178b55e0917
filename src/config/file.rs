//! The layout of the configuration file: `[serial]`, `[network]`, `[control]` and
//! `[control.gpio]` (the only board, or what every `[[board]]` starts from), and the
//! `[[board]]` tables, each with a name, a device, its ports and what it sets differently.
//! [`FileConfig::resolve`] turns a file into the effective [`Config`]: one [`BoardConfig`]
//! per board, every board checked against the others.

use super::values::*;
use super::{BoardConfig, Config, Network};
use crate::settings::LineSettings;
pub use crate::settings::{FlowControl, Parity, StopBits};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The configuration file as written.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    pub serial: SerialConfig,
    pub network: NetworkConfig,
    pub control: ControlConfig,
    /// `[[board]]` tables; none: the file describes one board, named "default".
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub board: Vec<BoardTable>,
}

/// `[serial]`: the UART and its settings at the start of every client session.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SerialConfig {
    #[serde(deserialize_with = "device_path")]
    pub device: PathBuf,
    pub baud: BaudRate,
    pub data_bits: DataBits,
    pub parity: Parity,
    pub stop_bits: StopBits,
    pub flow_control: FlowControl,
    /// Raw port: the rate a running flasher stub is moved to, whatever the client asked
    /// (0: the client's own rate).
    pub flash_baud: FlashBaud,
    /// How much of the board's recent output is kept for `esp-bridge log` (KiB; 0: none).
    pub history_kib: HistoryKib,
    /// The board's output also goes to the journal, line by line; its device is then read
    /// from the service's start, whether or not a client is connected.
    pub journal: bool,
}

/// 921600 by default: the rate esptool's own users pick for flashing (Arduino's default),
/// which the Pi's PL011 and the common USB bridges (CP210x, CH340, FT232R) carry; a
/// wiring that cannot carry it is noticed and the session falls back to the client's rate.
pub const DEFAULT_FLASH_BAUD: u32 = 921_600;

impl Default for SerialConfig {
    fn default() -> Self {
        SerialConfig {
            device: PathBuf::from("/dev/serial0"),
            baud: BaudRate(115_200),
            data_bits: DataBits(8),
            parity: Parity::None,
            stop_bits: StopBits::One,
            flow_control: FlowControl::None,
            flash_baud: FlashBaud(DEFAULT_FLASH_BAUD),
            history_kib: HistoryKib(64),
            journal: false,
        }
    }
}

impl SerialConfig {
    /// The settings every client session starts with.
    pub fn line_settings(&self) -> LineSettings {
        LineSettings {
            baud: self.baud.0,
            data_bits: self.data_bits.0,
            parity: self.parity,
            stop_bits: self.stop_bits,
            flow: self.flow_control,
        }
    }
}

/// `[network]`: where clients connect and how a second client is treated.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Addresses bound for RFC 2217 clients when no socket is passed in by systemd.
    pub listen: Vec<SocketAddr>,
    /// Addresses bound for the ESP-aware raw port (`esptool --port socket://`), likewise.
    pub raw_listen: Vec<SocketAddr>,
    /// Addresses bound for the read-only console (`nc pi 2219`), likewise; none by default.
    pub console_listen: Vec<SocketAddr>,
    pub second_client: SecondClient,
    /// A writer whose client has sent nothing for this long may be replaced by a client that
    /// wants to write.
    pub takeover_idle_secs: TakeoverIdleSecs,
    /// How long a client that wants to write waits for the writer to finish before it is told
    /// who writes and closed.
    pub claim_wait_secs: ClaimWaitSecs,
    /// Seconds of silence before TCP keepalive probes start; a dead peer is dropped after
    /// about this plus 3 probes at a third of it.
    pub keepalive_secs: KeepaliveSecs,
    /// Exit after this many seconds without a client (0: never). Under socket activation
    /// systemd starts the service again on the next connection.
    pub idle_exit_secs: IdleExitSecs,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            listen: vec![SocketAddr::from(([0, 0, 0, 0], 2217))],
            raw_listen: vec![SocketAddr::from(([0, 0, 0, 0], 2218))],
            console_listen: Vec::new(),
            second_client: SecondClient::Refuse,
            takeover_idle_secs: TakeoverIdleSecs(30),
            claim_wait_secs: ClaimWaitSecs(10),
            keepalive_secs: KeepaliveSecs(10),
            idle_exit_secs: IdleExitSecs(0),
        }
    }
}

impl NetworkConfig {
    /// The settings every board shares.
    pub fn shared(&self) -> Network {
        Network {
            second_client: self.second_client,
            takeover_idle: Duration::from_secs(self.takeover_idle_secs.0),
            claim_wait: Duration::from_secs(self.claim_wait_secs.0),
            keepalive: Duration::from_secs(self.keepalive_secs.0),
            idle_exit: (self.idle_exit_secs.0 > 0)
                .then(|| Duration::from_secs(self.idle_exit_secs.0)),
        }
    }
}

/// `[control]`: how the client's DTR/RTS reach the board's EN and IO0.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    pub backend: ControlBackend,
    pub mode: ControlMode,
    pub after_disconnect: AfterDisconnect,
    pub gpio: GpioConfig,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            backend: ControlBackend::Gpio,
            mode: ControlMode::Esp,
            after_disconnect: AfterDisconnect::Run,
            gpio: GpioConfig::default(),
        }
    }
}

/// `[control.gpio]`: the two lines of the seed wiring.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GpioConfig {
    /// The line wired to EN (reset).
    pub reset: LineSpec,
    /// The line wired to IO0 (boot mode).
    pub boot: LineSpec,
    /// The chip, needed only when lines are given by offset ("gpiochip0" or a path).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chip: Option<String>,
    /// Asserted = driven low.
    pub active_low: bool,
    pub drive: Drive,
    pub bias: Bias,
}

impl Default for GpioConfig {
    fn default() -> Self {
        GpioConfig {
            reset: LineSpec::Name("GPIO22".into()),
            boot: LineSpec::Name("GPIO10".into()),
            chip: None,
            active_low: true,
            // Released = not driven: the line floats up to the board's pull-up (and the Pi's),
            // so a board's EN or BOOT button never shorts a Pi output driven high.
            drive: Drive::OpenDrain,
            bias: Bias::PullUp,
        }
    }
}

/// A board's name: in unit names, socket names, the journal's BOARD= field and URLs, so a
/// short word: letters, digits, '-' and '_', starting with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct BoardName(pub String);

impl TryFrom<String> for BoardName {
    type Error = String;
    fn try_from(v: String) -> Result<Self, String> {
        let ok = !v.is_empty()
            && v.len() <= 32
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && v.starts_with(|c: char| c.is_ascii_alphanumeric());
        if ok {
            Ok(BoardName(v))
        } else {
            Err(format!(
                "board name {v:?} is not valid: use 1 to 32 letters, digits, '-' or '_', starting with a letter or digit (e.g. \"lab1\")"
            ))
        }
    }
}

impl From<BoardName> for String {
    fn from(n: BoardName) -> String {
        n.0
    }
}

/// `[[board]]`: one board. Anything it does not set comes from `[serial]` and `[control]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BoardTable {
    pub name: BoardName,
    #[serde(deserialize_with = "device_path")]
    pub device: PathBuf,
    /// Addresses for RFC 2217 clients.
    #[serde(default)]
    pub listen: Vec<SocketAddr>,
    /// Addresses for the ESP-aware raw port.
    #[serde(default)]
    pub raw_listen: Vec<SocketAddr>,
    /// Addresses for the read-only console.
    #[serde(default)]
    pub console_listen: Vec<SocketAddr>,
    #[serde(default, skip_serializing_if = "SerialOverrides::is_empty")]
    pub serial: SerialOverrides,
    #[serde(default, skip_serializing_if = "ControlOverrides::is_empty")]
    pub control: ControlOverrides,
}

/// `[board.serial]`: line settings this board starts with instead of `[serial]`'s.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SerialOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baud: Option<BaudRate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_bits: Option<DataBits>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parity: Option<Parity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_bits: Option<StopBits>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flow_control: Option<FlowControl>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flash_baud: Option<FlashBaud>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history_kib: Option<HistoryKib>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journal: Option<bool>,
}

impl SerialOverrides {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
    fn over(&self, base: &SerialConfig, device: PathBuf) -> SerialConfig {
        SerialConfig {
            device,
            baud: self.baud.clone().unwrap_or_else(|| base.baud.clone()),
            data_bits: self
                .data_bits
                .clone()
                .unwrap_or_else(|| base.data_bits.clone()),
            parity: self.parity.unwrap_or(base.parity),
            stop_bits: self.stop_bits.unwrap_or(base.stop_bits),
            flow_control: self.flow_control.unwrap_or(base.flow_control),
            flash_baud: self
                .flash_baud
                .clone()
                .unwrap_or_else(|| base.flash_baud.clone()),
            history_kib: self
                .history_kib
                .clone()
                .unwrap_or_else(|| base.history_kib.clone()),
            journal: self.journal.unwrap_or(base.journal),
        }
    }
}

/// `[board.control]` (and `[board.control.gpio]`): how this board's EN/IO0 are wired, where
/// it differs from `[control]`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ControlOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<ControlBackend>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<ControlMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after_disconnect: Option<AfterDisconnect>,
    #[serde(default, skip_serializing_if = "GpioOverrides::is_empty")]
    pub gpio: GpioOverrides,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GpioOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reset: Option<LineSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot: Option<LineSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_low: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drive: Option<Drive>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bias: Option<Bias>,
}

impl GpioOverrides {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl ControlOverrides {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
    fn over(&self, base: &ControlConfig) -> ControlConfig {
        let g = &self.gpio;
        let b = &base.gpio;
        ControlConfig {
            backend: self.backend.unwrap_or(base.backend),
            mode: self.mode.unwrap_or(base.mode),
            after_disconnect: self.after_disconnect.unwrap_or(base.after_disconnect),
            gpio: GpioConfig {
                reset: g.reset.clone().unwrap_or_else(|| b.reset.clone()),
                boot: g.boot.clone().unwrap_or_else(|| b.boot.clone()),
                chip: g.chip.clone().or_else(|| b.chip.clone()),
                active_low: g.active_low.unwrap_or(b.active_low),
                drive: g.drive.unwrap_or(b.drive),
                bias: g.bias.unwrap_or(b.bias),
            },
        }
    }
}

/// Keys a file with `[[board]]` tables must not set outside them: each board has its own.
const PER_BOARD_KEYS: [(&str, &str); 4] = [
    ("serial", "device"),
    ("network", "listen"),
    ("network", "raw_listen"),
    ("network", "console_listen"),
];

impl FileConfig {
    /// The effective configuration. `table` is the same document, to tell a key written in
    /// the file from its default; problems between boards are said with their names.
    pub fn resolve(self, table: &toml::Table) -> Result<Config, String> {
        let network = self.network.shared();
        if self.board.is_empty() {
            return Ok(Config {
                network,
                boards: vec![BoardConfig {
                    name: crate::config::DEFAULT_BOARD.to_string(),
                    serial: self.serial,
                    listen: self.network.listen,
                    raw_listen: self.network.raw_listen,
                    console_listen: self.network.console_listen,
                    control: self.control,
                }],
            });
        }
        for (section, key) in PER_BOARD_KEYS {
            // An empty list of addresses gives the boards nothing (the shipped file's
            // `console_listen = []` may stay when its boards move into tables).
            let set = table
                .get(section)
                .and_then(|t| t.as_table())
                .and_then(|t| t.get(key))
                .is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty()));
            if set {
                return Err(format!(
                    "[{section}] {key} is set, but with [[board]] tables every board has its own: move it into the boards (or remove it)"
                ));
            }
        }
        let boards: Vec<BoardConfig> = self
            .board
            .into_iter()
            .map(|b| BoardConfig {
                name: b.name.0,
                serial: b.serial.over(&self.serial, b.device),
                listen: b.listen,
                raw_listen: b.raw_listen,
                console_listen: b.console_listen,
                control: b.control.over(&self.control),
            })
            .collect();
        super::check_boards(&boards)?;
        Ok(Config { network, boards })
    }
}

impl Config {
    /// The configuration as TOML, every key written out (what check-config prints).
    pub fn to_toml(&self) -> String {
        let file = self.to_file();
        let many = !file.board.is_empty();
        let Ok(mut table) = toml::Table::try_from(file) else {
            return String::new();
        };
        if many {
            // Every board table spells out all its settings: shared [serial] and [control]
            // sections beside them would only show defaults nothing uses.
            table.remove("serial");
            table.remove("control");
            for (section, key) in PER_BOARD_KEYS {
                if let Some(t) = table.get_mut(section).and_then(|t| t.as_table_mut()) {
                    t.remove(key);
                }
            }
        }
        toml::to_string(&table).unwrap_or_default()
    }

    /// The configuration as a file would say it, every key written out: the single-board
    /// layout for one board named "default", `[[board]]` tables otherwise.
    fn to_file(&self) -> FileConfig {
        let net = &self.network;
        let network = |listen: Vec<SocketAddr>,
                       raw_listen: Vec<SocketAddr>,
                       console_listen: Vec<SocketAddr>| NetworkConfig {
            listen,
            raw_listen,
            console_listen,
            second_client: net.second_client,
            takeover_idle_secs: TakeoverIdleSecs(net.takeover_idle.as_secs()),
            claim_wait_secs: ClaimWaitSecs(net.claim_wait.as_secs()),
            keepalive_secs: KeepaliveSecs(net.keepalive.as_secs()),
            idle_exit_secs: IdleExitSecs(net.idle_exit.map_or(0, |d| d.as_secs())),
        };
        if let [only] = self.boards.as_slice()
            && only.name == crate::config::DEFAULT_BOARD
        {
            return FileConfig {
                serial: only.serial.clone(),
                network: network(
                    only.listen.clone(),
                    only.raw_listen.clone(),
                    only.console_listen.clone(),
                ),
                control: only.control.clone(),
                board: Vec::new(),
            };
        }
        let base = FileConfig::default();
        FileConfig {
            serial: base.serial.clone(),
            network: network(Vec::new(), Vec::new(), Vec::new()),
            control: base.control.clone(),
            board: self
                .boards
                .iter()
                .map(|b| BoardTable {
                    name: BoardName(b.name.clone()),
                    device: b.serial.device.clone(),
                    listen: b.listen.clone(),
                    raw_listen: b.raw_listen.clone(),
                    console_listen: b.console_listen.clone(),
                    serial: SerialOverrides {
                        baud: Some(b.serial.baud.clone()),
                        data_bits: Some(b.serial.data_bits.clone()),
                        parity: Some(b.serial.parity),
                        stop_bits: Some(b.serial.stop_bits),
                        flow_control: Some(b.serial.flow_control),
                        flash_baud: Some(b.serial.flash_baud.clone()),
                        history_kib: Some(b.serial.history_kib.clone()),
                        journal: Some(b.serial.journal),
                    },
                    control: ControlOverrides {
                        backend: Some(b.control.backend),
                        mode: Some(b.control.mode),
                        after_disconnect: Some(b.control.after_disconnect),
                        gpio: GpioOverrides {
                            reset: Some(b.control.gpio.reset.clone()),
                            boot: Some(b.control.gpio.boot.clone()),
                            chip: b.control.gpio.chip.clone(),
                            active_low: Some(b.control.gpio.active_low),
                            drive: Some(b.control.gpio.drive),
                            bias: Some(b.control.gpio.bias),
                        },
                    },
                })
                .collect(),
        }
    }
}
