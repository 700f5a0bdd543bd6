//! `token mint`: tokens with the claims the server expects, signed HS256 with a shared secret or
//! RS256 / ES256 / EdDSA with a private key (PEM; the algorithm follows the key's type).
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
    #[serde(skip_serializing_if = "Vec::is_empty")]
    groups: Vec<String>,
    iat: u64,
    exp: u64,
}

/// What signs the token.
pub enum Signer<'a> {
    /// `--secret-file`: HS256 with the file's trimmed content.
    Secret(&'a Path),
    /// `--private-key`: a PEM private key (RSA, EC P-256 or Ed25519).
    PrivateKey(&'a Path),
}

impl<'a> Signer<'a> {
    /// From `--secret-file` / `--private-key` (clap lets through at most one of them).
    pub fn from_flags(
        secret_file: Option<&'a Path>,
        private_key: Option<&'a Path>,
    ) -> Result<Self, CliError> {
        match (secret_file, private_key) {
            (_, Some(key)) => Ok(Signer::PrivateKey(key)),
            (Some(secret), None) => Ok(Signer::Secret(secret)),
            (None, None) => Err(CliError::usage(
                "--secret-file or --private-key is required",
            )),
        }
    }

    /// The algorithm and key, read from the file.
    fn key(&self) -> Result<(Algorithm, EncodingKey), CliError> {
        match *self {
            Signer::Secret(file) => {
                let secret = std::fs::read_to_string(file).map_err(CliError::io(file.display()))?;
                let secret = secret.trim();
                if secret.is_empty() {
                    return Err(CliError::usage(format!("{} is empty", file.display())));
                }
                Ok((
                    Algorithm::HS256,
                    EncodingKey::from_secret(secret.as_bytes()),
                ))
            }
            Signer::PrivateKey(file) => {
                let pem = std::fs::read(file).map_err(CliError::io(file.display()))?;
                if let Ok(k) = EncodingKey::from_rsa_pem(&pem) {
                    Ok((Algorithm::RS256, k))
                } else if let Ok(k) = EncodingKey::from_ec_pem(&pem) {
                    Ok((Algorithm::ES256, k))
                } else if let Ok(k) = EncodingKey::from_ed_pem(&pem) {
                    Ok((Algorithm::EdDSA, k))
                } else {
                    Err(CliError::usage(format!(
                        "{} is not a PEM private key (RSA, EC P-256 or Ed25519), e.g. one made by \
                         `openssl genpkey -algorithm ed25519 -out jwt.key`",
                        file.display()
                    )))
                }
            }
        }
    }
}

/// The signed token.
pub fn mint(
    signer: Signer<'_>,
    org: Option<&str>,
    user: &str,
    mut roles: Vec<String>,
    groups: Vec<String>,
    ttl: Duration,
) -> Result<String, CliError> {
    if roles.is_empty() {
        roles.push("member".into());
    }
    if org.is_none() && !roles.iter().any(|r| r == "service") {
        return Err(CliError::usage("--org is required unless --role service"));
    }
    let (alg, key) = signer.key()?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let claims = Claims {
        sub: user,
        org,
        roles,
        groups,
        iat: now,
        exp: now + ttl.as_secs().max(1),
    };
    jsonwebtoken::encode(&Header::new(alg), &claims, &key)
        .map_err(|e| CliError::usage(format!("cannot sign the token: {e}")))
}
