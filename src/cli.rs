//! The command line: parses arguments, sets up logging, and runs the chosen command.
//!
//! `main` only calls [`run`] and exits with the code it returns, so every path to an exit
//! code is here and testable.

use crate::config::{Config, ControlBackend, Overrides, Source};
use crate::error::{Error, Status};
use crate::supervisor::Reload;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

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
    /// Configuration file [default: /etc/esp-bridge.toml if it exists; ESP_BRIDGE_CONFIG
    /// names another]
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// The control socket `status` and `log` ask [default: /run/esp-bridge/control.sock,
    /// which esp-bridge.socket makes]; without systemd, the service (and the demo) binds it
    /// here when given
    #[arg(long, global = true, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Serial device, e.g. /dev/serial0 or /dev/ttyUSB0
    #[arg(long, global = true, value_name = "PATH")]
    device: Option<PathBuf>,
    /// Address to listen on for RFC 2217 clients (repeatable), e.g. 0.0.0.0:2217
    #[arg(long, global = true, value_name = "HOST:PORT")]
    listen: Vec<SocketAddr>,
    /// Address for the ESP-aware raw port (esptool --port socket://), e.g. 0.0.0.0:2218
    #[arg(long, global = true, value_name = "HOST:PORT")]
    raw_listen: Vec<SocketAddr>,
    /// Address for the board's read-only console (nc HOST PORT), e.g. 0.0.0.0:2219
    #[arg(long, global = true, value_name = "HOST:PORT")]
    console_listen: Vec<SocketAddr>,
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
    /// Show what each board is doing, asking the running service (on the Pi)
    Status,
    /// Print what a board printed recently, each line with the time it arrived (asking the
    /// running service, on the Pi); with --follow, go on with what it prints from now on
    Log {
        /// The board's name (not needed when there is one board)
        board: Option<String>,
        /// Keep printing the board's output as it comes, until interrupted
        #[arg(short, long)]
        follow: bool,
    },
    /// Read which chip a board has (model, revision, MAC, flash size) through its ROM
    /// loader, asking the running service (on the Pi), which resets the chip into its
    /// bootloader and back into its application; refused while a client writes
    Identify {
        /// The board's name (not needed when there is one board)
        board: Option<String>,
    },
    /// List the serial devices of this machine with their stable names, which board uses
    /// each, and a ready [[board]] table for the others
    Devices,
    /// Print a labgrid exporter configuration for the boards: one resource group per board
    /// with its RFC 2217 and raw ports as NetworkSerialPort resources, and the commands that
    /// make a labgrid place for each
    Labgrid {
        /// The host name clients connect to (default: this machine's name with .local)
        #[arg(long, value_name = "HOST")]
        host: Option<String>,
        /// The exporter's name, the first part of every resource's (default: this machine's
        /// host name)
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
    },
    /// Put an edited /etc/esp-bridge.toml into effect under systemd: regenerate the boards'
    /// socket units, restart the sockets and the service (as root)
    Apply,
    /// Write the boards' systemd socket units into DIR (the systemd generator runs this)
    #[command(hide = true)]
    GenerateUnits {
        /// The generator's output directories (normal, early, late); only the first is used
        #[arg(value_name = "DIR", num_args = 1..=3, required = true)]
        dirs: Vec<PathBuf>,
    },
    /// Print the device-tree controller ("uart3") of one of the SoC's ttys (esp-bridge's udev
    /// rule runs this to make /dev/serial/by-uart/uartN)
    #[command(hide = true)]
    UartName {
        /// The tty's kernel name (ttyAMA1)
        tty: String,
        /// Read /sys and /proc below DIR instead of / (tests)
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
    },
    /// Serve a virtual ESP32 on this machine: no hardware needed
    Demo(crate::demo::DemoArgs),
    /// Run only the virtual ESP32, on a pseudo-terminal or a unix socket (for tests)
    Sim(esp_sim::SimArgs),
    /// Set the Raspberry Pi's UARTs up for the boards: free the full UART on GPIO14/15
    /// (config.txt, cmdline.txt, hciuart) and turn on the extra UARTs the configuration names
    /// as /dev/serial/by-uart/uartN; the package runs it on install and --revert on removal
    SetupPi(crate::setup_pi::SetupPiArgs),
}

/// Runs the command line and returns the process exit code.
pub fn run() -> u8 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                Status::Usage.code()
            } else {
                0
            };
        }
    };
    crate::systemd::init_logging(cli.options.verbose);
    let overrides = Overrides {
        device: cli.options.device.clone(),
        listen: cli.options.listen.clone(),
        raw_listen: cli.options.raw_listen.clone(),
        console_listen: cli.options.console_listen.clone(),
        baud: cli.options.baud,
        control: cli.options.control,
    };
    let command = cli.command.unwrap_or(Command::Serve);
    if command.prints_a_report() {
        restore_sigpipe();
    }
    let prefix = match command {
        Command::SetupPi(_) => "esp-bridge setup-pi",
        _ => "esp-bridge",
    };
    let result = match command {
        Command::Serve => load(&cli.options, &overrides).and_then(|(config, source)| {
            let reload: Reload = std::sync::Arc::new(move || {
                Config::reload(&source, &overrides)
                    .inspect_err(|e| {
                        tracing::error!("SIGHUP: keeping the running configuration: {e}")
                    })
                    .ok()
            });
            crate::service::run(config, reload, cli.options.control_socket.as_deref())
        }),
        Command::CheckConfig => load(&cli.options, &overrides)
            .and_then(|(config, source)| crate::check::check_config(&config, &source)),
        Command::Demo(args) => {
            // Only a file named with --config: the demo does not read /etc/esp-bridge.toml.
            let file = cli
                .options
                .config
                .as_deref()
                .map(|path| Config::load(Some(path), &Overrides::default()).map(|(c, _)| c))
                .transpose();
            file.map_err(Error::from).and_then(|file| {
                crate::demo::run_demo(
                    args,
                    &overrides,
                    cli.options.control_socket.as_deref(),
                    file,
                )
            })
        }
        Command::Sim(args) => esp_sim::run_cli(args).map_err(Error::failure),
        Command::Status => crate::admin::status(
            cli.options
                .control_socket
                .as_deref()
                .unwrap_or(std::path::Path::new(crate::admin::DEFAULT_PATH)),
        ),
        Command::Log { board, follow } => crate::admin::log(
            cli.options
                .control_socket
                .as_deref()
                .unwrap_or(std::path::Path::new(crate::admin::DEFAULT_PATH)),
            board.as_deref(),
            follow,
        ),
        Command::Identify { board } => crate::admin::identify_board(
            cli.options
                .control_socket
                .as_deref()
                .unwrap_or(std::path::Path::new(crate::admin::DEFAULT_PATH)),
            board.as_deref(),
        ),
        Command::Devices => load(&cli.options, &overrides).map(|(config, _)| {
            print!(
                "{}",
                crate::devices::report(&config, std::path::Path::new("/"))
            );
        }),
        Command::Labgrid { host, name } => {
            load(&cli.options, &overrides).and_then(|(config, source)| {
                let exported = crate::labgrid::Exported::new(name, host)?;
                print!(
                    "{}",
                    crate::labgrid::exporter_config(&config, &source.to_string(), &exported)
                );
                Ok(())
            })
        }
        Command::Apply => {
            load(&cli.options, &overrides).and_then(|(config, _)| crate::units::apply(&config))
        }
        Command::GenerateUnits { dirs } => match dirs.first() {
            Some(dir) => crate::units::generate(
                dir,
                load(&cli.options, &overrides)
                    .map(|(config, _)| config)
                    .map_err(|e| e.to_string()),
            ),
            None => Err(Error::usage("generate-units needs a directory")),
        },
        Command::UartName { tty, root } => match crate::pi_uarts::controller_of(&root, &tty) {
            Some(name) => {
                println!("{name}");
                Ok(())
            }
            None => Err(Error::failure(format!(
                "{tty} is no UART of the device tree (no of_node, or no uartN label for it)"
            ))),
        },
        Command::SetupPi(args) => crate::setup_pi::run(args, cli.options.config.as_deref()),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{prefix}: {e}");
            e.status().code()
        }
    }
}

impl Command {
    /// Commands whose output may go into a pipe that closes early (`| head`).
    fn prints_a_report(&self) -> bool {
        matches!(
            self,
            Command::CheckConfig
                | Command::Status
                | Command::Log { .. }
                | Command::Devices
                | Command::Labgrid { .. }
                | Command::UartName { .. }
        )
    }
}

/// Lets SIGPIPE end the process, as it does for every other command-line tool, so that
/// `esp-bridge check-config | head -1` stops quietly instead of failing to print. (The Rust
/// runtime ignores SIGPIPE; the serving commands keep it so, for their sockets.)
fn restore_sigpipe() {
    // SAFETY: signal(2) with SIG_DFL installs no handler code, only the default action; it
    // runs before this process starts any thread, so nothing observes the change midway.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn load(options: &Options, overrides: &Overrides) -> crate::error::Result<(Config, Source)> {
    let (config, source) = Config::load(options.config.as_deref(), overrides)?;
    tracing::debug!("configuration from {source}");
    Ok((config, source))
}
