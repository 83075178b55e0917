//! The command line: parses arguments, sets up logging, and runs the chosen command.
//!
//! `main` only calls [`run`] and exits with the code it returns, so every path to an exit
//! code is here and testable.

use crate::config::{Config, ConfigError, ControlBackend, ControlConfig, ControlMode, Overrides};
use crate::control::{Control, DirectControl, LineDriver, NoControl};
use crate::gpio::GpioLines;
use crate::modem::{ModemLines, ModemPassthrough, TtyModem};
use crate::reset::EspControl;
use crate::server::{PortKind, Reload};
use crate::session::SharedControl;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Exit codes, following sysexits.h where one fits (systemd knows 78 as "configuration").
pub mod exit {
    pub const OK: u8 = 0;
    pub const FAILURE: u8 = 1;
    pub const USAGE: u8 = 64;
    pub const CONFIG: u8 = 78;
}

#[derive(Debug, Parser)]
#[command(
    name = "esp-bridge",
    version,
    about = "RFC 2217 serial bridge for ESP32/ESP8266 boards wired to a Raspberry Pi",
    long_about = "Exposes a UART as an RFC 2217 server (telnet COM-port control), so that \
esptool --port rfc2217://HOST:2217, idf.py monitor, PlatformIO and pyserial can flash and watch \
an ESP board over the network. The client's DTR/RTS drive the board's EN and IO0.\n\n\
Without a command it serves clients. Settings come from /etc/esp-bridge.toml (or --config); \
the flags below override the file, and with no file at all built-in defaults apply.\n\n\
Try it without hardware:  esp-bridge demo"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    options: Options,
}

#[derive(Debug, clap::Args)]
struct Options {
    /// Configuration file [default: /etc/esp-bridge.toml if it exists]
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Serial device, e.g. /dev/serial0 or /dev/ttyUSB0
    #[arg(long, global = true, value_name = "PATH")]
    device: Option<PathBuf>,
    /// Address to listen on for RFC 2217 clients (repeatable), e.g. 0.0.0.0:2217
    #[arg(long, global = true, value_name = "HOST:PORT")]
    listen: Vec<SocketAddr>,
    /// Address for the ESP-aware raw port (esptool --port socket://), e.g. 0.0.0.0:2218
    #[arg(long, global = true, value_name = "HOST:PORT")]
    raw_listen: Vec<SocketAddr>,
    /// Baud rate the port starts with for every client
    #[arg(long, global = true, value_name = "N")]
    baud: Option<u32>,
    /// How DTR/RTS reach the board
    #[arg(long, global = true, value_enum)]
    control: Option<ControlBackend>,
    /// Log debug details
    #[arg(short, long, global = true)]
    verbose: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve clients (the default)
    Serve,
    /// Validate the configuration and print what it means; exits 78 if it is invalid
    CheckConfig,
    /// Serve a virtual ESP32 on this machine: no hardware needed
    Demo(crate::demo::DemoArgs),
    /// Run only the virtual ESP32, on a pseudo-terminal or a unix socket (for tests)
    Sim(esp_sim::SimArgs),
    /// Make the Raspberry Pi's full UART on GPIO14/15 free for the board (config.txt, cmdline.txt,
    /// hciuart); the package runs it on install and --revert on removal
    SetupPi(crate::setup_pi::SetupPiArgs),
}

/// Runs the command line and returns the process exit code.
pub fn run() -> u8 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
        }
    };
    crate::systemd::init_logging(cli.options.verbose);
    let overrides = Overrides {
        device: cli.options.device.clone(),
        listen: cli.options.listen.clone(),
        raw_listen: cli.options.raw_listen.clone(),
        baud: cli.options.baud,
        control: cli.options.control,
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => match load(&cli.options, &overrides) {
            Ok(config) => {
                let path = cli.options.config.clone();
                let reload: Reload =
                    Box::new(move || match Config::load(path.as_deref(), &overrides) {
                        Ok((config, _)) => Some(config),
                        Err(e) => {
                            tracing::error!("SIGHUP: keeping the running configuration: {e}");
                            None
                        }
                    });
                serve(config, reload)
            }
            Err(code) => code,
        },
        Command::CheckConfig => match load(&cli.options, &overrides) {
            Ok(config) => check_config(&config),
            Err(code) => code,
        },
        Command::Demo(args) => crate::demo::run_demo(args, &overrides),
        Command::Sim(args) => esp_sim::run_cli(args),
        Command::SetupPi(args) => crate::setup_pi::run(args),
    }
}

fn load(options: &Options, overrides: &Overrides) -> Result<Config, u8> {
    match Config::load(options.config.as_deref(), overrides) {
        Ok((config, source)) => {
            tracing::debug!("configuration from {source}");
            Ok(config)
        }
        Err(e) => {
            report_config_error(&e);
            Err(exit::CONFIG)
        }
    }
}

fn report_config_error(e: &ConfigError) {
    eprintln!("esp-bridge: {e}");
}

fn check_config(config: &Config) -> u8 {
    let s = &config.serial;
    println!(
        "configuration OK\n  serial:  {} at {} baud, {} data bits, parity {:?}, {} stop bit(s), flow control {:?}",
        s.device.display(),
        s.baud.0,
        s.data_bits.0,
        s.parity,
        s.stop_bits.0,
        s.flow_control
    );
    let listen: Vec<String> = config
        .network
        .listen
        .iter()
        .map(|a| a.to_string())
        .collect();
    println!(
        "  network: listen on {} (unless started by esp-bridge.socket), second client: {:?}, keepalive {} s",
        listen.join(", "),
        config.network.second_client,
        config.network.keepalive_secs.0
    );
    println!("  control: {}", config.control.backend);
    if !s.device.exists() {
        println!(
            "  note: {} does not exist right now; clients will be told so until it appears",
            s.device.display()
        );
    }
    exit::OK
}

async fn listeners(
    config: &Config,
) -> Result<Vec<(tokio::net::TcpListener, PortKind)>, (u8, String)> {
    let raw_ports: Vec<u16> = config.network.raw_listen.iter().map(|a| a.port()).collect();
    let inherited =
        crate::systemd::inherited_listeners(&raw_ports).map_err(|e| (exit::CONFIG, e))?;
    let mut out = Vec::new();
    if let Some(sockets) = inherited {
        for s in sockets {
            let l = tokio::net::TcpListener::from_std(s.listener).map_err(|e| {
                (
                    exit::FAILURE,
                    format!("cannot use the socket from systemd: {e}"),
                )
            })?;
            if let Ok(a) = l.local_addr() {
                tracing::info!(
                    "listening on {a} for {} clients (socket \"{}\" passed by systemd; [network] listen is not used)",
                    s.kind,
                    s.name
                );
            }
            out.push((l, s.kind));
        }
        return Ok(out);
    }
    let wanted = config
        .network
        .listen
        .iter()
        .map(|a| (a, PortKind::Rfc2217))
        .chain(
            config
                .network
                .raw_listen
                .iter()
                .map(|a| (a, PortKind::EspRaw)),
        );
    for (addr, kind) in wanted {
        let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            (
                exit::FAILURE,
                format!(
                    "cannot listen on {addr}: {e}\n  hint: another program (another esp-bridge, ser2net?) may use the port; change [network] listen / raw_listen, or --listen / --raw-listen"
                ),
            )
        })?;
        if let Ok(a) = l.local_addr() {
            tracing::info!("listening on {a} for {kind} clients");
        }
        out.push((l, kind));
    }
    Ok(out)
}

/// Builds the control-line policy the configuration asks for. Must run inside the runtime
/// (the reset engine is a task).
pub fn build_control(config: &Config) -> Result<Box<dyn Control>, String> {
    let driver: Box<dyn LineDriver> = match config.control.backend {
        ControlBackend::None => return Ok(Box::new(NoControl)),
        ControlBackend::Gpio => Box::new(GpioLines::open(&config.control.gpio)?),
        ControlBackend::Modem => {
            let port = TtyModem::open(&config.serial.device)?;
            if config.control.mode == ControlMode::Direct {
                return Ok(Box::new(ModemPassthrough::new(port)));
            }
            Box::new(ModemLines::new(port))
        }
    };
    Ok(control_over(driver, &config.control))
}

/// The policy of `[control] mode` over a line driver.
pub fn control_over(driver: Box<dyn LineDriver>, c: &ControlConfig) -> Box<dyn Control> {
    match c.mode {
        ControlMode::Esp => Box::new(EspControl::start(driver, c.after_disconnect)),
        ControlMode::Direct => Box::new(DirectControl::new(driver)),
    }
}

/// The async runtime, or the exit code after saying why there is none.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, u8> {
    // One thread: the bridge moves one client's bytes at a time, and a Pi Zero has one core.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("esp-bridge: cannot start the async runtime: {e}");
            exit::FAILURE
        })
}

fn serve(config: Config, reload: Reload) -> u8 {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async {
        let control = match build_control(&config) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("esp-bridge: {e}");
                return exit::CONFIG;
            }
        };
        serve_with(config, Arc::new(Mutex::new(control)), Some(reload)).await
    })
}

/// Takes the sockets systemd passed in, or binds the configured addresses, and serves until
/// SIGTERM/SIGINT.
pub async fn serve_with(config: Config, control: SharedControl, reload: Option<Reload>) -> u8 {
    let listeners = match listeners(&config).await {
        Ok(l) => l,
        Err((code, message)) => {
            eprintln!("esp-bridge: {message}");
            return code;
        }
    };
    tracing::info!("serial device {}", config.serial.device.display());
    if let Ok(target) = std::fs::canonicalize(&config.serial.device)
        && let Some(hint) = crate::serial::debug_uart_hint(&config.serial.device, &target)
    {
        tracing::warn!("{hint}");
    }
    {
        let c = control
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        tracing::info!("control lines: {}", c.describe());
    }
    crate::server::serve(
        config,
        listeners,
        control.clone(),
        crate::shutdown::requested(),
        reload,
    )
    .await;
    // The lines go to their safe state before the process (and its line request) ends.
    let settled = {
        let mut c = control
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = c.release() {
            tracing::error!("releasing the control lines failed: {e}");
        }
        c.settled()
    };
    if tokio::time::timeout(std::time::Duration::from_secs(3), settled)
        .await
        .is_err()
    {
        tracing::warn!("the control lines did not reach their safe state in time");
    }
    exit::OK
}
