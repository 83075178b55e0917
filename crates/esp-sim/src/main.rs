//! `esp-sim`: a virtual ESP32 on a pseudo-terminal, for tests, benchmarks and VMs. Prints the
//! device path on stdout; runs until SIGTERM or SIGINT.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "esp-sim",
    version,
    about = "A virtual ESP32 on a pseudo-terminal"
)]
struct Cli {
    #[command(flatten)]
    args: esp_sim::SimArgs,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    match esp_sim::run_cli(Cli::parse().args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("esp-sim: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
