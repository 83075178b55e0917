//! Helpers shared by the integration tests that run the real binary.

use std::ffi::OsStr;
use std::process::{Command, Output};

/// Runs the built esp-bridge with `args` and collects what it printed.
pub fn bridge<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> Output {
    Command::new(env!("CARGO_BIN_EXE_esp-bridge"))
        .args(args)
        .output()
        .expect("the binary runs")
}

/// Standard output and standard error, for messages and assertions.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
