//! Cursor files: where `watch`, `poll` and `jobs list` keep an event-stream position between runs.
use std::path::{Path, PathBuf};

use crate::{cli::From, error::CliError};

/// The start position given by `--cursor` / `--cursor-file`, and where to save new positions.
pub struct Position {
    pub start: Option<String>,
    pub file: Option<PathBuf>,
}

impl Position {
    /// Reads `--cursor-file` (a missing or empty file means "live from now").
    pub fn load(from: &From) -> Result<Self, CliError> {
        let start = match (&from.cursor, &from.cursor_file) {
            (Some(c), _) => Some(c.clone()),
            (None, Some(f)) => match std::fs::read_to_string(f) {
                Ok(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
                Ok(_) => None,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(CliError::io(f.display())(e)),
            },
            (None, None) => None,
        };
        Ok(Position {
            start,
            file: from.cursor_file.clone(),
        })
    }

    /// Saves `cursor` to the cursor file, if there is one.
    pub fn save(&self, cursor: &str) -> Result<(), CliError> {
        match &self.file {
            Some(f) if !cursor.is_empty() => save(f, cursor),
            _ => Ok(()),
        }
    }
}

/// Writes `cursor` to `path` atomically (a temporary file renamed over it), so a reader or a
/// crash never sees half a cursor.
pub fn save(path: &Path, cursor: &str) -> Result<(), CliError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, format!("{cursor}\n"))
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(CliError::io(path.display()))
}
