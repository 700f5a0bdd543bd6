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

    /// This error with what to do about it: which servers could not be reached, or how to pass
    /// the token that was missing (`tokenless`: no token flag or variable was given).
    pub fn with_hint(mut self, servers: &[String], tokenless: bool) -> Self {
        match self.class {
            ErrorClass::Unavailable => {
                self.message += &format!(" (server: {})", servers.join(", "));
            }
            ErrorClass::Auth if tokenless => {
                self.message += "; no token was given: pass --token TOKEN or set ORGPULSE_TOKEN \
                    (or --token-file / --token-command); `orgpulse-server --dev` prints development \
                    tokens, `orgpulse token mint` makes them";
            }
            _ => {}
        }
        self
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
