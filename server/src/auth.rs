//! Authentication and authorization: JWT verification (HS256 secret, RS256/ES256/EdDSA PEM key,
//! or a JWKS file), the claims of a caller, and the role and org rules of docs/api.md.
use std::{collections::HashSet, path::Path, time::Duration};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind, jwk::JwkSet};
use serde::Deserialize;
use tonic::{Status, metadata::MetadataMap};

use crate::validate;

/// A verified caller.
#[derive(Debug, Clone)]
pub struct Claims {
    pub user: String,
    /// The token's org; `None` only for service tokens.
    pub org: Option<String>,
    pub role: Role,
    /// When the token stops being accepted: `exp` plus the configured leeway, in seconds since the
    /// Unix epoch. Streams end then.
    pub exp: u64,
}

/// The longest a token is treated as having left: a century.
pub const MAX_TIME_LEFT: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// UNAUTHENTICATED "token expired", marked for clients with `orgpulse-error: token-expired`: for a
/// call refused because its token's `exp` passed, and for a stream ended by it.
pub fn token_expired() -> Status {
    use orgpulse::error_marker::{KEY, TOKEN_EXPIRED};
    let mut status = Status::unauthenticated("token expired");
    status.metadata_mut().insert(
        KEY,
        tonic::metadata::MetadataValue::from_static(TOKEN_EXPIRED),
    );
    status
}

/// The strongest role among the token's `roles`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Viewer,
    Member,
    Admin,
    Service,
}

/// What a call needs to be allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Need {
    /// read and subscribe
    Read,
    /// create and update jobs, mark own notifications read
    Write,
    /// delete jobs, send notifications
    Admin,
}

impl Claims {
    /// The org a request acts in: `requested` or, when empty, the token's own org.
    pub fn org_for(&self, requested: &str) -> Result<String, Status> {
        if requested.is_empty() {
            return self.org.clone().ok_or_else(|| {
                Status::invalid_argument("org_id is required with a service token")
            });
        }
        validate::id("org_id", requested)?;
        if self.role == Role::Service || self.org.as_deref() == Some(requested) {
            Ok(requested.to_string())
        } else {
            Err(Status::permission_denied(format!(
                "this token is for org {:?}; it may not access org {requested:?}",
                self.org.as_deref().unwrap_or_default()
            )))
        }
    }

    pub fn require(&self, need: Need) -> Result<(), Status> {
        let ok = match need {
            Need::Read => true,
            Need::Write => self.role >= Role::Member,
            Need::Admin => self.role >= Role::Admin,
        };
        if ok {
            return Ok(());
        }
        let what = match need {
            Need::Read => "read",
            Need::Write => "create or update (needs role member, admin or service)",
            Need::Admin => "delete jobs or send notifications (needs role admin or service)",
        };
        Err(Status::permission_denied(format!(
            "role {} may not {what}",
            self.role.name()
        )))
    }

    /// Time left until `exp`, at most [`MAX_TIME_LEFT`] (so that adding it to an `Instant`
    /// cannot overflow, whatever `exp` a validly signed token carries).
    pub fn time_left(&self) -> Duration {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Duration::from_secs(self.exp)
            .saturating_sub(now)
            .min(MAX_TIME_LEFT)
    }
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Member => "member",
            Role::Admin => "admin",
            Role::Service => "service",
        }
    }
}

#[derive(Deserialize)]
struct RawClaims {
    sub: Option<String>,
    org: Option<String>,
    roles: Option<Vec<String>>,
    exp: Option<u64>,
}

/// One key the server accepts, with the algorithm it is for.
struct Key {
    alg: Algorithm,
    kid: Option<String>,
    key: DecodingKey,
}

/// Verifies bearer tokens against the configured keys.
pub struct Authenticator {
    keys: Vec<Key>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: u64,
}

pub struct KeyConfig<'a> {
    pub secret: Option<&'a [u8]>,
    pub public_key_pem: Option<&'a Path>,
    pub jwks_file: Option<&'a Path>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Duration,
}

impl Authenticator {
    pub fn new(cfg: KeyConfig<'_>) -> anyhow::Result<Self> {
        let mut keys = Vec::new();
        if let Some(secret) = cfg.secret {
            anyhow::ensure!(!secret.is_empty(), "the JWT secret is empty");
            keys.push(Key {
                alg: Algorithm::HS256,
                kid: None,
                key: DecodingKey::from_secret(secret),
            });
        }
        if let Some(path) = cfg.public_key_pem {
            let pem = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("reading --jwt-public-key {}: {e}", path.display()))?;
            keys.push(pem_key(&pem).ok_or_else(|| {
                anyhow::anyhow!(
                    "--jwt-public-key {}: not an RSA, EC (P-256) or Ed25519 public key in PEM",
                    path.display()
                )
            })?);
        }
        if let Some(path) = cfg.jwks_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("reading --jwks-file {}: {e}", path.display()))?;
            let set: JwkSet = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("--jwks-file {}: {e}", path.display()))?;
            for jwk in &set.keys {
                let Some(alg) = jwk_alg(jwk) else { continue };
                let key = DecodingKey::from_jwk(jwk)
                    .map_err(|e| anyhow::anyhow!("--jwks-file {}: {e}", path.display()))?;
                keys.push(Key {
                    alg,
                    kid: jwk.common.key_id.clone(),
                    key,
                });
            }
        }
        anyhow::ensure!(!keys.is_empty(), "no JWT key configured");
        Ok(Authenticator {
            keys,
            issuer: cfg.issuer,
            audience: cfg.audience,
            leeway: cfg.leeway.as_secs(),
        })
    }

    /// Verifies the `authorization: Bearer <JWT>` of a call.
    pub fn authenticate(&self, md: &MetadataMap) -> Result<Claims, Status> {
        let header = md.get("authorization").ok_or_else(|| {
            Status::unauthenticated("missing authorization metadata (expected: Bearer <JWT>)")
        })?;
        let header = header
            .to_str()
            .map_err(|_| Status::unauthenticated("malformed authorization metadata"))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("authorization metadata must be 'Bearer <JWT>'")
            })?
            .trim();
        self.verify(token)
    }

    pub fn verify(&self, token: &str) -> Result<Claims, Status> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::Json(_) if alg_is_none(token) => {
                Status::unauthenticated("unsigned tokens (alg none) are not accepted")
            }
            _ => Status::unauthenticated("malformed token"),
        })?;
        let key = self
            .keys
            .iter()
            .find(|k| {
                k.alg == header.alg
                    && (k.kid.is_none() || header.kid.is_none() || k.kid == header.kid)
            })
            .ok_or_else(|| {
                Status::unauthenticated(format!(
                    "token algorithm {:?} (or key id) is not accepted by this server",
                    header.alg
                ))
            })?;
        let mut v = Validation::new(key.alg);
        v.leeway = self.leeway;
        v.validate_nbf = true;
        // A configured `iss` / `aud` is required: jsonwebtoken checks them only when present
        // unless they are required claims.
        v.required_spec_claims = HashSet::from(["exp".to_string(), "sub".to_string()]);
        match &self.audience {
            Some(aud) => {
                v.set_audience(&[aud]);
                v.required_spec_claims.insert("aud".into());
            }
            None => v.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
            v.required_spec_claims.insert("iss".into());
        }
        let data = jsonwebtoken::decode::<RawClaims>(token, &key.key, &v)
            .map_err(|e| refusal(e.kind()))?;
        let mut claims = claims_from(data.claims)?;
        claims.exp = claims.exp.saturating_add(self.leeway);
        Ok(claims)
    }
}

/// The status for a token jsonwebtoken refused, saying why.
fn refusal(kind: &ErrorKind) -> Status {
    let why = match kind {
        ErrorKind::ExpiredSignature => return token_expired(),
        ErrorKind::ImmatureSignature => "token not yet valid (nbf is in the future)".into(),
        ErrorKind::InvalidSignature => "invalid token signature".into(),
        ErrorKind::InvalidIssuer => "token issuer (iss) is not accepted".into(),
        ErrorKind::InvalidAudience => "token audience (aud) is not accepted".into(),
        ErrorKind::MissingRequiredClaim(c) => format!("token has no {c} claim"),
        ErrorKind::InvalidAlgorithm => "token algorithm is not accepted".into(),
        _ => "malformed token".to_string(),
    };
    Status::unauthenticated(why)
}

fn claims_from(raw: RawClaims) -> Result<Claims, Status> {
    let bad = |m: &str| Status::unauthenticated(format!("invalid token claims: {m}"));
    let user = raw.sub.ok_or_else(|| bad("sub is required"))?;
    validate::id("sub", &user).map_err(|_| bad("sub must be 1-64 of [A-Za-z0-9._:@-]"))?;
    let exp = raw.exp.ok_or_else(|| bad("exp is required"))?;
    let roles = raw.roles.unwrap_or_else(|| vec!["member".into()]);
    let role = roles
        .iter()
        .filter_map(|r| match r.as_str() {
            "viewer" => Some(Role::Viewer),
            "member" => Some(Role::Member),
            "admin" => Some(Role::Admin),
            "service" => Some(Role::Service),
            _ => None,
        })
        .max()
        .ok_or_else(|| bad("roles names none of viewer, member, admin, service"))?;
    let org = match raw.org {
        Some(o) => {
            validate::id("org", &o).map_err(|_| bad("org must be 1-64 of [A-Za-z0-9._:@-]"))?;
            Some(o)
        }
        None if role == Role::Service => None,
        None => return Err(bad("org is required unless the role is service")),
    };
    Ok(Claims {
        user,
        org,
        role,
        exp,
    })
}

fn pem_key(pem: &[u8]) -> Option<Key> {
    let (alg, key) = if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
        (Algorithm::RS256, k)
    } else if let Ok(k) = DecodingKey::from_ec_pem(pem) {
        (Algorithm::ES256, k)
    } else if let Ok(k) = DecodingKey::from_ed_pem(pem) {
        (Algorithm::EdDSA, k)
    } else {
        return None;
    };
    Some(Key {
        alg,
        kid: None,
        key,
    })
}

fn jwk_alg(jwk: &jsonwebtoken::jwk::Jwk) -> Option<Algorithm> {
    use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve};
    if let Some(a) = jwk.common.key_algorithm {
        return a.to_string().parse().ok();
    }
    match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
            Some(Algorithm::ES256)
        }
        AlgorithmParameters::OctetKeyPair(_) => Some(Algorithm::EdDSA),
        _ => None,
    }
}

/// True when the token's header says `"alg": "none"` (which jsonwebtoken cannot even parse).
fn alg_is_none(token: &str) -> bool {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    let Some(head) = token.split('.').next() else {
        return false;
    };
    let Ok(bytes) = URL_SAFE_NO_PAD.decode(head.trim_end_matches('=')) else {
        return false;
    };
    serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| {
            v.get("alg")
                .and_then(|a| a.as_str())
                .map(|a| a.eq_ignore_ascii_case("none"))
        })
        .unwrap_or(false)
}
