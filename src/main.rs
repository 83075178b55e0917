//! The esp-bridge executable: all the work is in the library; see `esp_bridge::cli`.

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(esp_bridge::cli::run())
}
