//! Where the client gets its bearer token: a fixed string, a file re-read whenever a new token is
//! needed (so another process can rotate it), or a command whose stdout is the token.
use std::path::PathBuf;

use tokio::sync::Mutex;

use super::Error;

/// How to obtain a token.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// No `authorization` header at all.
    None,
    /// A fixed token.
    Static(String),
    /// A file holding the token; re-read when the current token has expired.
    File(PathBuf),
    /// A shell command (`sh -c`) printing the token on stdout; re-run when the token has expired.
    Command(String),
}

impl TokenSource {
    /// Produces a token from the source (reads the file, runs the command).
    pub async fn fetch(&self) -> Result<Option<String>, Error> {
        let raw = match self {
            TokenSource::None => return Ok(None),
            TokenSource::Static(t) => t.clone(),
            TokenSource::File(p) => tokio::fs::read_to_string(p)
                .await
                .map_err(|e| Error::Token(format!("cannot read {}: {e}", p.display())))?,
            TokenSource::Command(cmd) => {
                let out = tokio::process::Command::new("sh")
                    .arg("-c")
                    .arg(cmd)
                    .stdin(std::process::Stdio::null())
                    .stderr(std::process::Stdio::inherit())
                    .output()
                    .await
                    .map_err(|e| Error::Token(format!("cannot run `{cmd}`: {e}")))?;
                if !out.status.success() {
                    return Err(Error::Token(format!("`{cmd}` failed: {}", out.status)));
                }
                String::from_utf8(out.stdout)
                    .map_err(|_| Error::Token(format!("`{cmd}` printed a non-UTF-8 token")))?
            }
        };
        let token = raw.trim();
        let token = token.strip_prefix("Bearer ").unwrap_or(token).trim();
        if token.is_empty() {
            return Err(Error::Token("the token source gave an empty token".into()));
        }
        Ok(Some(token.to_string()))
    }
}

/// A token source with the token currently in use, fetched on first use and on [`refresh`].
///
/// [`refresh`]: Tokens::refresh
#[derive(Debug)]
pub(crate) struct Tokens {
    source: TokenSource,
    current: Mutex<Option<Option<String>>>,
}

impl Tokens {
    pub(crate) fn new(source: TokenSource) -> Self {
        Tokens {
            source,
            current: Mutex::new(None),
        }
    }

    /// True when fetching again may give a different token (a file or a command).
    pub(crate) fn renewable(&self) -> bool {
        matches!(self.source, TokenSource::File(_) | TokenSource::Command(_))
    }

    /// The token in use, fetching it on first use.
    pub(crate) async fn get(&self) -> Result<Option<String>, Error> {
        let mut cur = self.current.lock().await;
        if let Some(t) = &*cur {
            return Ok(t.clone());
        }
        let t = self.source.fetch().await?;
        *cur = Some(t.clone());
        Ok(t)
    }

    /// Fetches a new token from the source because `stale` (the one a call used) expired. When
    /// another caller already replaced `stale`, its replacement is returned as is.
    pub(crate) async fn refresh(&self, stale: &Option<String>) -> Result<Option<String>, Error> {
        let mut cur = self.current.lock().await;
        if let Some(t) = &*cur
            && t != stale
        {
            return Ok(t.clone());
        }
        let t = self.source.fetch().await?;
        *cur = Some(t.clone());
        Ok(t)
    }
}
