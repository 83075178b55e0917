//! Configuration: the TOML file (`/etc/esp-bridge.toml` by default), built-in defaults, and
//! command-line overrides, merged into one validated [`Config`].
//!
//! Validation happens while deserializing (each value type checks itself), so every error
//! that toml reports carries the file's line and column and the key, and says what is allowed.

use crate::settings::LineSettings;
pub use crate::settings::{FlowControl, Parity, StopBits};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the service looks for its configuration when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/esp-bridge.toml";
/// Names another default file (for a second instance, or a test), as `--config` would, except
/// that a missing file means the built-in defaults.
pub const DEFAULT_PATH_ENV: &str = "ESP_BRIDGE_CONFIG";

/// The file read when `--config` is not given.
pub fn default_path() -> PathBuf {
    std::env::var_os(DEFAULT_PATH_ENV)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH))
}

/// The whole configuration, after defaults and overrides.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub serial: SerialConfig,
    pub network: NetworkConfig,
    pub control: ControlConfig,
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
}

impl Default for SerialConfig {
    fn default() -> Self {
        SerialConfig {
            device: PathBuf::from("/dev/serial0"),
            baud: BaudRate(115_200),
            data_bits: DataBits(8),
            parity: Parity::None,
            stop_bits: StopBits::One,
            flow_control: FlowControl::None,
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
    pub second_client: SecondClient,
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
            second_client: SecondClient::Refuse,
            keepalive_secs: KeepaliveSecs(10),
            idle_exit_secs: IdleExitSecs(0),
        }
    }
}

impl NetworkConfig {
    pub fn keepalive(&self) -> Duration {
        Duration::from_secs(self.keepalive_secs.0)
    }
    /// How long without a client before the service exits, if it should.
    pub fn idle_exit(&self) -> Option<Duration> {
        (self.idle_exit_secs.0 > 0).then(|| Duration::from_secs(self.idle_exit_secs.0))
    }
}

/// What to do when a client connects while another is being served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SecondClient {
    /// Tell the newcomer the port is busy and close its connection.
    Refuse,
    /// Disconnect the current client and serve the newcomer (for a client that crashed and
    /// reconnects before keepalive noticed).
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
fn device_path<'de, D: serde::Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
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

checked_value!(KeepaliveSecs, u64, |v| {
    if (1..=3600).contains(&v) {
        Ok(v as u64)
    } else {
        Err(format!(
            "keepalive_secs {v} is out of range: use 1 to 3600 seconds"
        ))
    }
});

/// A configuration that could not be used, with what to do about it.
#[derive(Debug)]
pub enum ConfigError {
    /// The file given with --config could not be read.
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// Syntax, unknown key, wrong type or a value out of range. `detail` is toml's report,
    /// which shows the line, the column and the key.
    Invalid { path: PathBuf, detail: String },
    /// The path is not a regular file (a FIFO, a directory, a device).
    NotAFile { path: PathBuf, kind: &'static str },
    /// The file is larger than any configuration ([`MAX_FILE_BYTES`]).
    TooLarge { path: PathBuf, size: u64 },
    /// A command-line value was not acceptable.
    Override { flag: &'static str, detail: String },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, error } => write!(
                f,
                "cannot read config file {}: {error}\n  hint: check the path, or run without --config to use the built-in defaults",
                path.display()
            ),
            ConfigError::Invalid { path, detail } => write!(
                f,
                "invalid config file {}: {}\n  hint: every key is explained in the example /usr/share/doc/esp-bridge/esp-bridge.toml (config/esp-bridge.toml in the source)",
                path.display(),
                detail.trim_end()
            ),
            ConfigError::NotAFile { path, kind } => write!(
                f,
                "config file {} is {kind}, not a regular file\n  hint: give the path of the TOML file itself (--config), e.g. /etc/esp-bridge.toml",
                path.display()
            ),
            ConfigError::TooLarge { path, size } => write!(
                f,
                "config file {} is {size} bytes, more than any configuration ({MAX_FILE_BYTES} at most)\n  hint: check that --config names the TOML file, not a log or an image",
                path.display()
            ),
            ConfigError::Override { flag, detail } => write!(f, "invalid {flag}: {detail}"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Values given on the command line; each replaces the file's value.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub device: Option<PathBuf>,
    pub listen: Vec<SocketAddr>,
    pub raw_listen: Vec<SocketAddr>,
    pub baud: Option<u32>,
    pub control: Option<ControlBackend>,
}

/// Where the configuration came from, for the start-up log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    BuiltIn,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::BuiltIn => write!(
                f,
                "built-in defaults ({} not found)",
                default_path().display()
            ),
        }
    }
}

/// The line (1-based) holding the most deeply dotted key or table header, if it is deeper
/// than any esp-bridge key, with that key (shortened).
fn deepest_key_line(text: &str) -> Option<(usize, String)> {
    const DEEPEST_KEY: usize = 4;
    let mut deepest: Option<(usize, usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let code = line.split('#').next().unwrap_or_default().trim();
        let key = if let Some(header) = code.strip_prefix('[') {
            header
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or_default()
        } else {
            code.split('=').next().unwrap_or_default()
        };
        let depth = key.split('.').count();
        if depth > DEEPEST_KEY && deepest.as_ref().is_none_or(|(_, d, _)| depth > *d) {
            let shown: String = key.trim().chars().take(40).collect();
            deepest = Some((i + 1, depth, format!("{shown}...")));
        }
    }
    deepest.map(|(line, _, key)| (line, key))
}

/// The largest configuration file read: far above any real one (a hundred boards take about
/// 30 KiB), small enough that reading it costs nothing.
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// Reads a configuration file: a regular file of at most [`MAX_FILE_BYTES`]. It is opened
/// without blocking and checked before a byte is read, so a FIFO, a device or a huge file in
/// its place is refused with a message instead of stalling or swelling the service.
fn read_text(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let read_err = |error| ConfigError::Read {
        path: path.to_path_buf(),
        error,
    };
    let file = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(ConfigError::NotAFile {
            path: path.to_path_buf(),
            kind: file_kind(&meta.file_type()),
        });
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(ConfigError::TooLarge {
            path: path.to_path_buf(),
            size: meta.len(),
        });
    }
    let mut text = String::new();
    file.take(MAX_FILE_BYTES)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    Ok(text)
}

fn file_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "not a regular file"
    }
}

impl Config {
    /// Parses a TOML document; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            detail: match e.span() {
                Some(_) => e.to_string(),
                // toml's recursion limit on dotted keys comes without a position.
                None => match deepest_key_line(text) {
                    Some((line, key)) => format!(
                        "{} at line {line}: key `{key}` is nested too deeply (esp-bridge's keys are at most 3 levels deep, e.g. [control.gpio] reset)",
                        e.message().trim_end()
                    ),
                    None => e.to_string(),
                },
            },
        })
    }

    /// Reads `explicit` if given (it must exist), else [`DEFAULT_PATH`] if it exists, else the
    /// built-in defaults; then applies the overrides.
    pub fn load(
        explicit: Option<&Path>,
        overrides: &Overrides,
    ) -> Result<(Config, Source), ConfigError> {
        let (mut config, source) = match explicit {
            Some(path) => (Self::read(path)?, Source::File(path.to_path_buf())),
            None => {
                let path = default_path();
                match Self::read(&path) {
                    Ok(config) => (config, Source::File(path)),
                    Err(ConfigError::Read { error, .. })
                        if error.kind() == std::io::ErrorKind::NotFound =>
                    {
                        (Config::default(), Source::BuiltIn)
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        config.apply(overrides)?;
        Ok((config, source))
    }

    /// Reads the configuration again (SIGHUP) from where it came from at start: a file that
    /// was there must still be (a missing one is an error, not a reason to fall back to the
    /// built-in defaults); with no file at start, [`DEFAULT_PATH`] is read if it appeared.
    pub fn reload(source: &Source, overrides: &Overrides) -> Result<Config, ConfigError> {
        match source {
            Source::File(path) => {
                let mut config = Self::read(path)?;
                config.apply(overrides)?;
                Ok(config)
            }
            Source::BuiltIn => Self::load(None, overrides).map(|(config, _)| config),
        }
    }

    fn read(path: &Path) -> Result<Config, ConfigError> {
        let text = read_text(path)?;
        Self::parse(&text, path)
    }

    /// Applies command-line overrides, validating them like file values.
    pub fn apply(&mut self, o: &Overrides) -> Result<(), ConfigError> {
        if let Some(device) = &o.device {
            self.serial.device = device.clone();
        }
        if !o.listen.is_empty() {
            self.network.listen = o.listen.clone();
        }
        if !o.raw_listen.is_empty() {
            self.network.raw_listen = o.raw_listen.clone();
        }
        if let Some(baud) = o.baud {
            self.serial.baud =
                BaudRate::try_from(i64::from(baud)).map_err(|detail| ConfigError::Override {
                    flag: "--baud",
                    detail,
                })?;
        }
        if let Some(control) = o.control {
            self.control.backend = control;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::parse(text, Path::new("/etc/esp-bridge.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("", Path::new("x")).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.serial.device, PathBuf::from("/dev/serial0"));
        assert_eq!(c.control.gpio.reset, LineSpec::Name("GPIO22".into()));
    }

    /// The shipped file says "a missing key takes the default shown here": every key of the
    /// configuration is in it, with exactly the code's default value.
    #[test]
    fn the_shipped_file_is_the_built_in_defaults_key_for_key() {
        let text = include_str!("../config/esp-bridge.toml");
        let shipped = Config::parse(text, Path::new("config/esp-bridge.toml")).unwrap();
        assert_eq!(shipped, Config::default(), "values differ");
        let keys_of = |t: &toml::Table| {
            fn walk(prefix: &str, t: &toml::Table, out: &mut Vec<String>) {
                for (k, v) in t {
                    let key = format!("{prefix}{k}");
                    match v {
                        toml::Value::Table(inner) => walk(&format!("{key}."), inner, out),
                        _ => out.push(key),
                    }
                }
            }
            let mut out = Vec::new();
            walk("", t, &mut out);
            out.sort();
            out
        };
        let shipped_keys = keys_of(&text.parse::<toml::Table>().unwrap());
        let default_keys = keys_of(&toml::Table::try_from(Config::default()).unwrap());
        assert_eq!(shipped_keys, default_keys, "keys differ");
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = err("[serial]\ndevice = \"/dev/ttyUSB0\"\nspeed = 9600\n");
        assert!(e.contains("/etc/esp-bridge.toml"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        assert!(e.contains("speed"), "{e}");
        assert!(e.contains("baud"), "lists the allowed keys: {e}");
    }

    #[test]
    fn syntax_error_names_the_line() {
        let e = err("[serial]\ndevice = /dev/ttyUSB0\n");
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn wrong_type_and_range_say_what_is_allowed() {
        let e = err("[serial]\nbaud = \"fast\"\n");
        assert!(e.contains("line 2") && e.contains("baud"), "{e}");
        let e = err("[serial]\nbaud = 0\n");
        assert!(e.contains("50 to 20000000"), "{e}");
        let e = err("[serial]\ndata_bits = 9\n");
        assert!(e.contains("5, 6, 7 or 8"), "{e}");
        let e = err("[serial]\nparity = \"sometimes\"\n");
        assert!(e.contains("none") && e.contains("even"), "{e}");
        let e = err("[network]\nlisten = [\"localhost\"]\n");
        assert!(e.contains("listen") && e.contains("line 2"), "{e}");
        let e = err("[network]\nsecond_client = \"kick\"\n");
        assert!(e.contains("refuse") && e.contains("replace"), "{e}");
        let e = err("[control]\nbackend = \"relay\"\n");
        assert!(e.contains("gpio") && e.contains("modem"), "{e}");
        let e = err("[control.gpio]\nreset = -1\n");
        assert!(e.contains("offset") && e.contains("line 2"), "{e}");
        let e = err("[control.gpio]\nreset = true\n");
        assert!(e.contains("GPIO22"), "{e}");
        let c = Config::parse(
            "[control.gpio]\nreset = 5\nchip = \"gpiochip0\"\n",
            Path::new("x"),
        )
        .unwrap();
        assert_eq!(c.control.gpio.reset, LineSpec::Offset(5));
    }

    #[test]
    fn overrides_replace_file_values() {
        let mut c = Config::default();
        c.apply(&Overrides {
            device: Some("/dev/ttyUSB1".into()),
            listen: vec!["127.0.0.1:4000".parse().unwrap()],
            raw_listen: vec!["127.0.0.1:4001".parse().unwrap()],
            baud: Some(921_600),
            control: Some(ControlBackend::None),
        })
        .unwrap();
        assert_eq!(c.serial.device, PathBuf::from("/dev/ttyUSB1"));
        assert_eq!(c.network.listen.len(), 1);
        assert_eq!(c.serial.baud.0, 921_600);
        let bad = c.apply(&Overrides {
            baud: Some(0),
            ..Default::default()
        });
        assert!(bad.unwrap_err().to_string().contains("--baud"));
    }

    #[test]
    fn missing_explicit_file_is_an_error_with_a_hint() {
        let e = Config::load(
            Some(Path::new("/nonexistent/x.toml")),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("/nonexistent/x.toml") && e.contains("hint"),
            "{e}"
        );
    }
}
