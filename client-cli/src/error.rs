//! CLI errors: one readable line on stderr and an exit code per class (see `orgpulse --help`).
use std::fmt;

use orgpulse::client::{Error, ErrorClass};

/// A failed command.
#[derive(Debug)]
pub struct CliError {
    pub class: ErrorClass,
    pub message: String,
}

impl CliError {
    pub fn usage(message: impl Into<String>) -> Self {
        CliError {
            class: ErrorClass::Usage,
            message: message.into(),
        }
    }

    /// Wraps an I/O error on `what` (a path or stream name) as an "other" error.
    pub fn io(what: impl fmt::Display) -> impl FnOnce(std::io::Error) -> CliError {
        move |e| CliError {
            class: ErrorClass::Other,
            message: format!("{what}: {e}"),
        }
    }

    /// The process exit code of this error's class.
    pub fn exit_code(&self) -> i32 {
        match self.class {
            ErrorClass::Other => 1,
            ErrorClass::Usage => 2,
            ErrorClass::Auth => 3,
            ErrorClass::NotFound => 4,
            ErrorClass::Conflict => 5,
            ErrorClass::Unavailable => 6,
        }
    }
}

impl From<Error> for CliError {
    fn from(e: Error) -> Self {
        CliError {
            class: e.class(),
            message: e.to_string(),
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}
