//! Why a command stops: a message for the user and the exit status that goes with it.
//!
//! Every command returns `Result<(), Error>`; only `cli::run` prints the message and turns the
//! status into the process's exit code, so the codes are decided in one place and tested.

use std::fmt;

/// Exit statuses, following sysexits.h where one fits (systemd knows 78 as "configuration",
/// and the unit's `RestartPreventExitStatus=78` does not restart what a restart cannot fix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Something failed that may work next time (a port in use, the runtime): 1.
    Failure,
    /// The command line was wrong: 64 (EX_USAGE).
    Usage,
    /// The configuration cannot work: the file, or the system it describes (a missing GPIO
    /// line, a device that is not a tty): 78 (EX_CONFIG).
    Config,
}

impl Status {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Status::Failure => 1,
            Status::Usage => 64,
            Status::Config => 78,
        }
    }
}

/// A command's failure: what went wrong and what to do, worded for the user.
#[derive(Debug)]
pub struct Error {
    status: Status,
    message: String,
}

impl Error {
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        Error {
            status,
            message: message.into(),
        }
    }
    pub fn failure(message: impl Into<String>) -> Self {
        Self::new(Status::Failure, message)
    }
    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(Status::Usage, message)
    }
    pub fn config(message: impl Into<String>) -> Self {
        Self::new(Status::Config, message)
    }
    pub fn status(&self) -> Status {
        self.status
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<crate::config::ConfigError> for Error {
    /// A value given on the command line is a usage error (64); one in the file, or the file
    /// itself, a configuration error (78).
    fn from(e: crate::config::ConfigError) -> Self {
        match e {
            crate::config::ConfigError::Override { .. } => Error::usage(e.to_string()),
            _ => Error::config(e.to_string()),
        }
    }
}

/// What a command returns.
pub type Result<T = ()> = std::result::Result<T, Error>;
