//! Configuration: the TOML file (`/etc/esp-bridge.toml` by default), built-in defaults, and
//! command-line overrides, merged into one validated [`Config`].
//!
//! Validation happens while deserializing (each value type checks itself), so every error
//! that toml reports carries the file's line and column and the key, and says what is allowed.

mod file;
mod values;

pub use file::{
    ControlConfig, DEFAULT_FLASH_BAUD, FileConfig, GpioConfig, NetworkConfig, SerialConfig,
};
pub use values::*;

use crate::protocol::PortKind;
pub use crate::settings::{FlowControl, Parity, StopBits};
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
    pub console_listen: Vec<SocketAddr>,
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

/// The settings every board shares (`[network]` but its addresses).
#[derive(Debug, Clone, PartialEq)]
pub struct Network {
    pub second_client: SecondClient,
    /// A writer silent this long may be replaced by a client that wants to write.
    pub takeover_idle: Duration,
    /// How long a client that wants to write waits before it is told who writes.
    pub claim_wait: Duration,
    /// Silence before TCP keepalive probes start; a dead peer is dropped after about this
    /// plus 3 probes at a third of it.
    pub keepalive: Duration,
    /// How long without a client before the service exits, if it should.
    pub idle_exit: Option<Duration>,
}

/// One board: its name, its UART and the settings every session starts with, its ports, and
/// how its EN/IO0 are wired.
#[derive(Debug, Clone, PartialEq)]
pub struct BoardConfig {
    pub name: String,
    pub serial: SerialConfig,
    pub listen: Vec<SocketAddr>,
    pub raw_listen: Vec<SocketAddr>,
    /// The read-only console's addresses (none: no console port).
    pub console_listen: Vec<SocketAddr>,
    pub control: ControlConfig,
}

impl BoardConfig {
    /// Every address the board listens on, with what it serves there.
    pub fn ports(&self) -> impl Iterator<Item = (&SocketAddr, PortKind)> {
        self.listen
            .iter()
            .map(|a| (a, PortKind::Rfc2217))
            .chain(self.raw_listen.iter().map(|a| (a, PortKind::EspRaw)))
            .chain(self.console_listen.iter().map(|a| (a, PortKind::Console)))
    }
}

/// The name the single board of a file without `[[board]]` tables goes by.
pub const DEFAULT_BOARD: &str = "default";

/// The effective configuration: the shared settings and every board.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub network: Network,
    pub boards: Vec<BoardConfig>,
}

impl Default for Config {
    fn default() -> Self {
        FileConfig::default()
            .resolve(&toml::Table::new())
            .unwrap_or_else(|_| unreachable!("the defaults describe one valid board"))
    }
}

/// What two boards must not share: a name, a device, a port, a GPIO line.
pub(crate) fn check_boards(boards: &[BoardConfig]) -> Result<(), String> {
    for (i, a) in boards.iter().enumerate() {
        if a.listen.is_empty() && a.raw_listen.is_empty() {
            return Err(format!(
                "board {} has no port: give it listen = [\"0.0.0.0:PORT\"] and/or raw_listen = [\"0.0.0.0:PORT\"]",
                a.name
            ));
        }
        let own: Vec<&SocketAddr> = a.ports().map(|(x, _)| x).collect();
        for (j, x) in own.iter().enumerate() {
            if own[..j].iter().any(|y| overlap(x, y)) {
                return Err(format!(
                    "board {} uses port {} twice: each of its addresses needs a port of its own",
                    a.name,
                    x.port()
                ));
            }
        }
        for b in &boards[..i] {
            if a.name == b.name {
                return Err(format!(
                    "two boards are named {}: give each board a name of its own",
                    a.name
                ));
            }
            if a.serial.device == b.serial.device {
                return Err(format!(
                    "boards {} and {} both use device {}: each board has its own serial device",
                    b.name,
                    a.name,
                    a.serial.device.display()
                ));
            }
            let theirs: Vec<&SocketAddr> = b.ports().map(|(x, _)| x).collect();
            if let Some(x) = own.iter().find(|x| theirs.iter().any(|y| overlap(x, y))) {
                return Err(format!(
                    "boards {} and {} both use port {}: give each board ports of its own",
                    b.name,
                    a.name,
                    x.port()
                ));
            }
            if let Some(line) = shared_line(a, b) {
                return Err(format!(
                    "boards {} and {} both use GPIO line {line}: each board needs its own EN and IO0 lines ([control.gpio] reset and boot)",
                    b.name, a.name
                ));
            }
        }
    }
    Ok(())
}

/// Whether two listening addresses would clash: the same port, on the same address or on
/// every address.
fn overlap(x: &SocketAddr, y: &SocketAddr) -> bool {
    x.port() == y.port() && (x.ip() == y.ip() || x.ip().is_unspecified() || y.ip().is_unspecified())
}

/// A GPIO line both boards drive, if any.
fn shared_line(a: &BoardConfig, b: &BoardConfig) -> Option<String> {
    let lines = |c: &BoardConfig| {
        (c.control.backend == ControlBackend::Gpio)
            .then(|| {
                let g = &c.control.gpio;
                [&g.reset, &g.boot].map(|l| (g.chip.clone(), l.clone()))
            })
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
    };
    let theirs = lines(b);
    lines(a).into_iter().find_map(|(chip, line)| {
        theirs
            .iter()
            .any(|(c, l)| *l == line && (matches!(line, LineSpec::Name(_)) || *c == chip))
            .then(|| line.to_string())
    })
}

impl Config {
    /// Parses a TOML document; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |detail: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            detail,
        };
        let file: FileConfig = toml::from_str(text).map_err(|e| {
            invalid(match e.span() {
                Some(_) => e.to_string(),
                // toml's recursion limit on dotted keys comes without a position.
                None => match deepest_key_line(text) {
                    Some((line, key)) => format!(
                        "{} at line {line}: key `{key}` is nested too deeply (esp-bridge's keys are at most 3 levels deep, e.g. [control.gpio] reset)",
                        e.message().trim_end()
                    ),
                    None => e.to_string(),
                },
            })
        })?;
        // The same text parsed (successfully) as plain TOML, to see which keys it writes.
        let table: toml::Table = text.parse().unwrap_or_default();
        file.resolve(&table).map_err(invalid)
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

    /// The board named `name`.
    pub fn board(&self, name: &str) -> Option<&BoardConfig> {
        self.boards.iter().find(|b| b.name == name)
    }

    /// Applies command-line overrides, validating them like file values. `--baud` applies to
    /// every board; the others name one board's device, ports or lines, so they need a
    /// configuration with one board.
    pub fn apply(&mut self, o: &Overrides) -> Result<(), ConfigError> {
        if let Some(baud) = o.baud {
            let baud =
                BaudRate::try_from(i64::from(baud)).map_err(|detail| ConfigError::Override {
                    flag: "--baud",
                    detail,
                })?;
            for b in &mut self.boards {
                b.serial.baud = baud.clone();
            }
        }
        let per_board = [
            ("--device", o.device.is_some()),
            ("--listen", !o.listen.is_empty()),
            ("--raw-listen", !o.raw_listen.is_empty()),
            ("--console-listen", !o.console_listen.is_empty()),
            ("--control", o.control.is_some()),
        ];
        let board = match self.boards.as_mut_slice() {
            [only] => only,
            _ => {
                return match per_board.iter().find(|(_, given)| *given) {
                    Some((flag, _)) => Err(ConfigError::Override {
                        flag,
                        detail: "the configuration has several boards; set each board's device, ports and lines in its [[board]] table".into(),
                    }),
                    None => Ok(()),
                };
            }
        };
        if let Some(device) = &o.device {
            board.serial.device = device.clone();
        }
        if !o.listen.is_empty() {
            board.listen = o.listen.clone();
        }
        if !o.raw_listen.is_empty() {
            board.raw_listen = o.raw_listen.clone();
        }
        if !o.console_listen.is_empty() {
            board.console_listen = o.console_listen.clone();
        }
        if let Some(control) = o.control {
            board.control.backend = control;
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
        assert_eq!(c.boards.len(), 1);
        assert_eq!(c.boards[0].name, "default");
        assert_eq!(c.boards[0].serial.device, PathBuf::from("/dev/serial0"));
        assert_eq!(
            c.boards[0].control.gpio.reset,
            LineSpec::Name("GPIO22".into())
        );
    }

    /// The shipped file's commented-out [[board]] example, uncommented after removing the
    /// one-board keys as its comment says, is a valid three-board configuration.
    #[test]
    fn the_shipped_boards_example_works_as_its_comment_says() {
        let text = include_str!("../../config/esp-bridge.toml");
        let (head, example) = text
            .split_once("# Two boards on a Pi 4")
            .expect("the example is there");
        let mut file: Vec<String> = head
            .lines()
            .filter(|l| {
                !(l.starts_with("device =")
                    || l.starts_with("listen =")
                    || l.starts_with("raw_listen ="))
            })
            .map(str::to_string)
            .collect();
        for line in example.lines() {
            let Some(rest) = line.strip_prefix("# ") else {
                continue;
            };
            let is_toml = rest.starts_with('[')
                || rest
                    .split_once(" = ")
                    .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
            if is_toml {
                file.push(rest.to_string());
            }
        }
        let c = Config::parse(&file.join("\n"), Path::new("example")).expect("valid example");
        let names: Vec<&str> = c.boards.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["lab1", "lab2", "devkit"]);
        assert_eq!(c.boards[2].control.backend, ControlBackend::Modem);
        assert_eq!(
            c.boards[1].control.gpio.reset,
            LineSpec::Name("GPIO17".into())
        );
        assert!(c.boards[1].serial.journal && !c.boards[0].serial.journal);
        assert_eq!(c.boards[1].console_listen[0].port(), 2230);
    }

    /// README's complete example is a valid configuration that means what its text says.
    #[test]
    fn the_readme_three_board_example_is_valid() {
        let readme = include_str!("../../README.md");
        let start = readme
            .find("```toml\n# /etc/esp-bridge.toml\n")
            .expect("the example is there")
            + "```toml\n".len();
        let len = readme[start..].find("```").expect("the block ends");
        let c = Config::parse(&readme[start..start + len], Path::new("README.md")).expect("valid");
        let names: Vec<&str> = c.boards.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["lab1", "lab2", "devkit"]);
        let lab2 = &c.boards[1];
        assert!(lab2.serial.journal && !c.boards[0].serial.journal);
        assert_eq!(lab2.console_listen[0].port(), 2230);
        assert_eq!(c.boards[2].control.backend, ControlBackend::Modem);
    }

    /// The shipped file says "a missing key takes the default shown here": every key of the
    /// configuration is in it, with exactly the code's default value.
    #[test]
    fn the_shipped_file_is_the_built_in_defaults_key_for_key() {
        let text = include_str!("../../config/esp-bridge.toml");
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
        let default_keys = keys_of(&toml::Table::try_from(FileConfig::default()).unwrap());
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
        assert_eq!(c.boards[0].control.gpio.reset, LineSpec::Offset(5));
    }

    #[test]
    fn every_number_out_of_range_names_its_line_key_and_range() {
        // Each number the file can hold, just outside its range on both sides where there is
        // a lower bound, and far outside (the overflow the hardening issue found).
        let cases = [
            ("[serial]\nbaud = 49\n", "50 to 20000000"),
            ("[serial]\nbaud = 20000001\n", "50 to 20000000"),
            ("[serial]\nflash_baud = 115199\n", "115200 to 20000000"),
            ("[serial]\nflash_baud = 4294967296\n", "115200 to 20000000"),
            ("[serial]\ndata_bits = 4\n", "5, 6, 7 or 8"),
            ("[network]\nkeepalive_secs = 0\n", "1 to 3600"),
            ("[network]\nkeepalive_secs = 3601\n", "1 to 3600"),
            ("[network]\nidle_exit_secs = 604801\n", "604800"),
            (
                "[network]\nidle_exit_secs = 9223372036854775807\n",
                "604800",
            ),
            ("[network]\nidle_exit_secs = -1\n", "604800"),
            ("[serial]\nhistory_kib = 4097\n", "0 (keep none) to 4096"),
            ("[serial]\nhistory_kib = -1\n", "0 (keep none) to 4096"),
            ("[network]\ntakeover_idle_secs = 0\n", "1 to 86400"),
            ("[network]\ntakeover_idle_secs = 86401\n", "1 to 86400"),
            (
                "[network]\nclaim_wait_secs = 601\n",
                "0 (refuse at once) to 600",
            ),
            (
                "[network]\nclaim_wait_secs = -1\n",
                "0 (refuse at once) to 600",
            ),
        ];
        for (text, range) in cases {
            let e = err(text);
            let key = text
                .lines()
                .nth(1)
                .and_then(|l| l.split(' ').next())
                .unwrap();
            assert!(
                e.contains("/etc/esp-bridge.toml") && e.contains("line 2") && e.contains(key),
                "{text:?}: {e}"
            );
            assert!(e.contains(range), "{text:?}: {e}");
        }
    }

    #[test]
    fn keys_nested_too_deeply_say_where() {
        let deep = format!(
            "[serial]\nbaud = 115200\n{} = 1\n",
            vec!["a"; 200].join(".")
        );
        let e = err(&deep);
        assert!(
            e.contains("line 3") && e.contains("nested too deeply"),
            "{e}"
        );
    }

    #[test]
    fn overrides_replace_file_values() {
        let mut c = Config::default();
        c.apply(&Overrides {
            device: Some("/dev/ttyUSB1".into()),
            listen: vec!["127.0.0.1:4000".parse().unwrap()],
            raw_listen: vec!["127.0.0.1:4001".parse().unwrap()],
            console_listen: vec!["127.0.0.1:4002".parse().unwrap()],
            baud: Some(921_600),
            control: Some(ControlBackend::None),
        })
        .unwrap();
        assert_eq!(c.boards[0].serial.device, PathBuf::from("/dev/ttyUSB1"));
        assert_eq!(c.boards[0].console_listen[0].port(), 4002);
        assert_eq!(c.boards[0].listen.len(), 1);
        assert_eq!(c.boards[0].serial.baud.0, 921_600);
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

    const TWO_BOARDS: &str = r#"
[serial]
baud = 230400

[control]
after_disconnect = "release"

[[board]]
name = "lab1"
device = "/dev/serial/by-path/platform-usb-0:1.1:1.0-port0"
listen = ["0.0.0.0:2217"]
raw_listen = ["0.0.0.0:2218"]
[board.control]
backend = "modem"

[[board]]
name = "lab2"
device = "/dev/serial/by-uart/uart3"
listen = ["0.0.0.0:2219"]
raw_listen = ["0.0.0.0:2220"]
[board.serial]
baud = 115200
[board.control.gpio]
reset = "GPIO5"
boot = "GPIO6"
"#;

    #[test]
    fn boards_take_what_they_do_not_set_from_the_shared_sections() {
        let c = Config::parse(TWO_BOARDS, Path::new("x")).unwrap();
        let names: Vec<&str> = c.boards.iter().map(|b| b.name.as_str()).collect();
        assert_eq!(names, ["lab1", "lab2"]);
        let (a, b) = (&c.boards[0], &c.boards[1]);
        assert_eq!(a.serial.baud.0, 230_400, "from [serial]");
        assert_eq!(b.serial.baud.0, 115_200, "its own");
        assert_eq!(a.control.backend, ControlBackend::Modem);
        assert_eq!(b.control.backend, ControlBackend::Gpio, "the default");
        assert_eq!(a.control.after_disconnect, AfterDisconnect::Release);
        assert_eq!(b.control.gpio.reset, LineSpec::Name("GPIO5".into()));
        assert_eq!(b.control.gpio.drive, Drive::OpenDrain, "the default");
        assert_eq!(b.listen, ["0.0.0.0:2219".parse().unwrap()]);
        // Written out again, it reads back the same.
        let text = c.to_toml();
        assert_eq!(Config::parse(&text, Path::new("y")).unwrap(), c, "{text}");
        // Each board says everything; no shared section shows defaults that nothing uses.
        assert!(
            !text.contains("[serial]") && !text.contains("[control]"),
            "{text}"
        );
        assert!(text.contains("after_disconnect = \"release\""), "{text}");
    }

    #[test]
    fn what_two_boards_may_not_share_is_an_error_naming_both() {
        let cases = [
            (
                "name = \"lab2\"",
                "name = \"lab1\"",
                "two boards are named lab1",
            ),
            (
                "device = \"/dev/serial/by-uart/uart3\"",
                "device = \"/dev/serial/by-path/platform-usb-0:1.1:1.0-port0\"",
                "both use device",
            ),
            (
                "\"0.0.0.0:2219\"",
                "\"127.0.0.1:2217\"",
                "both use port 2217",
            ),
            (
                "reset = \"GPIO5\"",
                "reset = \"GPIO10\"",
                "both use GPIO line GPIO10",
            ),
        ];
        let with_gpio = TWO_BOARDS.replace("backend = \"modem\"", "backend = \"gpio\"");
        for (from, to, said) in cases {
            let text = with_gpio.replacen(from, to, 1);
            let e = Config::parse(&text, Path::new("/etc/esp-bridge.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(said), "{said}: {e}");
            assert!(e.contains("/etc/esp-bridge.toml"), "{e}");
        }
        let e = err("[[board]]\nname = \"a\"\ndevice = \"/dev/ttyUSB0\"\n");
        assert!(e.contains("board a has no port"), "{e}");
        let e =
            err("[[board]]\nname = \"a b\"\ndevice = \"/dev/ttyUSB0\"\nlisten = [\"0.0.0.0:1\"]\n");
        assert!(e.contains("not valid") && e.contains("line 2"), "{e}");
        let e = err("[[board]]\nname = \"a\"\nlisten = [\"0.0.0.0:1\"]\n");
        assert!(e.contains("device"), "{e}");
        let e = err(
            "[serial]\ndevice = \"/dev/ttyUSB9\"\n[[board]]\nname = \"a\"\ndevice = \"/dev/ttyUSB0\"\nlisten = [\"0.0.0.0:1\"]\n",
        );
        assert!(
            e.contains("[serial] device is set") && e.contains("every board has its own"),
            "{e}"
        );
        let e = err(
            "[network]\nconsole_listen = [\"0.0.0.0:2\"]\n[[board]]\nname = \"a\"\ndevice = \"/dev/ttyUSB0\"\nlisten = [\"0.0.0.0:1\"]\n",
        );
        assert!(e.contains("[network] console_listen is set"), "{e}");
        // An empty list gives the boards nothing: it may stay.
        let c = Config::parse(
            "[network]\nconsole_listen = []\n[[board]]\nname = \"a\"\ndevice = \"/dev/ttyUSB0\"\nlisten = [\"0.0.0.0:1\"]\n",
            Path::new("x"),
        )
        .expect("valid");
        assert!(c.boards[0].console_listen.is_empty());
        let e = err(
            "[[board]]\nname = \"a\"\ndevice = \"/dev/ttyUSB0\"\nlisten = [\"0.0.0.0:1\"]\nraw_listen = [\"127.0.0.1:1\"]\n",
        );
        assert!(e.contains("board a uses port 1 twice"), "{e}");
    }

    #[test]
    fn flags_naming_one_board_need_a_configuration_with_one() {
        let mut c = Config::parse(TWO_BOARDS, Path::new("x")).unwrap();
        let e = c
            .apply(&Overrides {
                device: Some("/dev/ttyUSB0".into()),
                ..Default::default()
            })
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--device") && e.contains("several boards"),
            "{e}"
        );
        c.apply(&Overrides {
            baud: Some(9600),
            ..Default::default()
        })
        .unwrap();
        assert!(c.boards.iter().all(|b| b.serial.baud.0 == 9600));
    }
}
