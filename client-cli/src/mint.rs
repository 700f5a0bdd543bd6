//! `token mint`: HS256 development tokens with the claims the server expects.
use std::{
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use crate::error::CliError;

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    org: Option<&'a str>,
    roles: Vec<String>,
    iat: u64,
    exp: u64,
}

/// The signed token.
pub fn mint(
    secret_file: &Path,
    org: Option<&str>,
    user: &str,
    mut roles: Vec<String>,
    ttl: Duration,
) -> Result<String, CliError> {
    if roles.is_empty() {
        roles.push("member".into());
    }
    if org.is_none() && !roles.iter().any(|r| r == "service") {
        return Err(CliError::usage("--org is required unless --role service"));
    }
    let secret =
        std::fs::read_to_string(secret_file).map_err(CliError::io(secret_file.display()))?;
    let secret = secret.trim();
    if secret.is_empty() {
        return Err(CliError::usage(format!(
            "{} is empty",
            secret_file.display()
        )));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let claims = Claims {
        sub: user,
        org,
        roles,
        iat: now,
        exp: now + ttl.as_secs().max(1),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| CliError::usage(format!("cannot sign the token: {e}")))
}
