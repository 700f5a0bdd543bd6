//! Authentication and authorization: JWT verification (HS256 secret, RS256/ES256/EdDSA PEM key,
//! a JWKS file, or a provider's JWKS URL), the claims of a caller (the org and roles claims at
//! configurable paths), and the role and org rules of docs/api.md.
use std::{collections::HashSet, path::Path, sync::Arc, time::Duration};

use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation, errors::ErrorKind, jwk::JwkSet};
use serde_json::{Map, Value};
use tonic::Status;

use crate::{
    audience::{MAX_TOKEN_GROUPS, MAX_TOKEN_ROLES, Names, Viewer},
    jwks::RemoteKeys,
    validate,
};

/// The largest `--jwt-leeway` accepted: jsonwebtoken's time checks underflow on huge ones.
pub const MAX_LEEWAY: Duration = Duration::from_secs(24 * 3600);

/// A verified caller.
#[derive(Debug, Clone)]
pub struct Claims {
    pub user: String,
    /// The token's org; `None` only for service tokens.
    pub org: Option<String>,
    pub role: Role,
    /// Every role name of the token and its groups: what audiences are checked against.
    pub roles: Names,
    pub groups: Names,
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
    /// publish entity events
    Publish,
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
            Need::Admin | Need::Publish => self.role >= Role::Admin,
        };
        if ok {
            return Ok(());
        }
        let what = match need {
            Need::Read => "read",
            Need::Write => "create or update (needs role member, admin or service)",
            Need::Admin => "delete jobs or send notifications (needs role admin or service)",
            Need::Publish => "publish entity events (needs role admin or service)",
        };
        Err(Status::permission_denied(format!(
            "role {} may not {what}",
            self.role.name()
        )))
    }

    /// The caller as audiences see it.
    pub fn viewer(&self) -> Viewer {
        Viewer {
            user: self.user.as_str().into(),
            groups: self.groups.clone(),
            roles: self.roles.clone(),
            sees_all: self.role == Role::Service,
        }
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

/// One key the server accepts, with the algorithm it is for.
pub struct Key {
    alg: Algorithm,
    kid: Option<String>,
    key: DecodingKey,
}

impl Key {
    /// Whether this key verifies a token with `header`.
    fn fits(&self, header: &Header) -> bool {
        self.alg == header.alg
            && (self.kid.is_none() || header.kid.is_none() || self.kid == header.kid)
    }
}

/// Verifies bearer tokens against the configured keys.
pub struct Authenticator {
    keys: Vec<Key>,
    remote: Option<Arc<RemoteKeys>>,
    claims: ClaimNames,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: u64,
}

/// Where in a token the org and the roles are: a claim name, or a dotted path into nested
/// objects (`app_metadata.org`) when no claim has that exact name.
#[derive(Debug, Clone)]
pub struct ClaimNames {
    pub org: String,
    pub roles: String,
    pub groups: String,
}

impl Default for ClaimNames {
    fn default() -> Self {
        ClaimNames {
            org: "org".into(),
            roles: "roles".into(),
            groups: "groups".into(),
        }
    }
}

pub struct KeyConfig<'a> {
    pub secret: Option<&'a [u8]>,
    pub public_key_pem: Option<&'a Path>,
    pub jwks_file: Option<&'a Path>,
    /// A provider's key set, fetched before the server starts.
    pub jwks_url: Option<Arc<RemoteKeys>>,
    pub claims: ClaimNames,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Duration,
}

impl Authenticator {
    pub fn new(cfg: KeyConfig<'_>) -> anyhow::Result<Self> {
        anyhow::ensure!(
            cfg.leeway <= MAX_LEEWAY,
            "--jwt-leeway {} is too large; at most 1 day",
            humantime::format_duration(cfg.leeway)
        );
        for (flag, path) in [
            ("--jwt-org-claim", &cfg.claims.org),
            ("--jwt-roles-claim", &cfg.claims.roles),
            ("--jwt-groups-claim", &cfg.claims.groups),
        ] {
            anyhow::ensure!(
                !path.is_empty() && path.split('.').all(|p| !p.is_empty()),
                "{flag} {path:?}: expected a claim name or a dotted path like app_metadata.org"
            );
        }
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
            keys.extend(
                keys_from_jwks(&set)
                    .map_err(|e| anyhow::anyhow!("--jwks-file {}: {e}", path.display()))?,
            );
        }
        anyhow::ensure!(
            !keys.is_empty() || cfg.jwks_url.is_some(),
            "no JWT key configured"
        );
        Ok(Authenticator {
            keys,
            remote: cfg.jwks_url,
            claims: cfg.claims,
            issuer: cfg.issuer,
            audience: cfg.audience,
            leeway: cfg.leeway.as_secs(),
        })
    }

    /// The provider key set behind `--jwks-url`, to refresh periodically.
    pub fn remote_keys(&self) -> Option<&Arc<RemoteKeys>> {
        self.remote.as_ref()
    }

    /// Verifies the `authorization: Bearer <JWT>` header of a call.
    pub async fn authenticate(&self, headers: &http::HeaderMap) -> Result<Claims, Status> {
        let header = headers.get(http::header::AUTHORIZATION).ok_or_else(|| {
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
        self.verify(token).await
    }

    pub async fn verify(&self, token: &str) -> Result<Claims, Status> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            ErrorKind::Json(_) if alg_is_none(token) => {
                Status::unauthenticated("unsigned tokens (alg none) are not accepted")
            }
            _ => Status::unauthenticated("malformed token"),
        })?;
        if let Some(verified) = self.verify_with_known_key(token, &header) {
            return verified;
        }
        // A key id the provider's set does not hold (yet): the provider may have rotated keys.
        if let Some(remote) = &self.remote
            && header.kid.is_some()
            && remote.refresh_for_unknown_kid().await
            && let Some(verified) = self.verify_with_known_key(token, &header)
        {
            return verified;
        }
        Err(Status::unauthenticated(format!(
            "token algorithm {:?} (or key id) is not accepted by this server",
            header.alg
        )))
    }

    /// The verdict of the first configured or fetched key that fits `header`; `None` when none
    /// does.
    fn verify_with_known_key(
        &self,
        token: &str,
        header: &Header,
    ) -> Option<Result<Claims, Status>> {
        if let Some(key) = self.keys.iter().find(|k| k.fits(header)) {
            return Some(self.verify_with(token, key));
        }
        let fetched = self.remote.as_ref()?.current();
        let key = fetched.iter().find(|k| k.fits(header))?;
        Some(self.verify_with(token, key))
    }

    fn verify_with(&self, token: &str, key: &Key) -> Result<Claims, Status> {
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
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &v)
            .map_err(|e| refusal(e.kind()))?;
        let mut claims = claims_from(&data.claims, &self.claims)?;
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

/// The claim at `path`: the claim of exactly that name (`https://example.com/org` is one name),
/// else the dotted path into nested objects (`app_metadata.org`).
fn claim<'a>(raw: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if let Some(v) = raw.get(path) {
        return Some(v);
    }
    let mut parts = path.split('.');
    let mut v = raw.get(parts.next()?)?;
    for part in parts {
        v = v.as_object()?.get(part)?;
    }
    Some(v)
}

fn claims_from(raw: &Map<String, Value>, names: &ClaimNames) -> Result<Claims, Status> {
    let bad = |m: &str| Status::unauthenticated(format!("invalid token claims: {m}"));
    let user = raw
        .get("sub")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("sub is required"))?
        .to_string();
    validate::id("sub", &user).map_err(|_| bad("sub must be 1-64 of [A-Za-z0-9._:@-]"))?;
    let exp = raw
        .get("exp")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("exp is required"))?;
    // An array of strings, or one space-separated string (OAuth `scope` style).
    let roles = match claim(raw, &names.roles) {
        None | Some(Value::Null) => vec!["member"],
        v => strings(v, &names.roles).map_err(|m| bad(&m))?,
    };
    let groups = strings(claim(raw, &names.groups), &names.groups).map_err(|m| bad(&m))?;
    if groups.len() > MAX_TOKEN_GROUPS {
        return Err(Status::unauthenticated(format!(
            "too many groups: the token has {}; at most {MAX_TOKEN_GROUPS} allowed",
            groups.len()
        )));
    }
    let role = roles
        .iter()
        .filter_map(|r| match *r {
            "viewer" => Some(Role::Viewer),
            "member" => Some(Role::Member),
            "admin" => Some(Role::Admin),
            "service" => Some(Role::Service),
            _ => None,
        })
        .max()
        .ok_or_else(|| {
            bad(&format!(
                "{} names none of viewer, member, admin, service",
                names.roles
            ))
        })?;
    let org = match claim(raw, &names.org) {
        Some(Value::String(o)) => {
            validate::id("org", o)
                .map_err(|_| bad(&format!("{} must be 1-64 of [A-Za-z0-9._:@-]", names.org)))?;
            Some(o.clone())
        }
        None | Some(Value::Null) if role == Role::Service => None,
        None | Some(Value::Null) => {
            return Err(bad(&format!(
                "{} is required unless the role is service",
                names.org
            )));
        }
        Some(_) => return Err(bad(&format!("{} must be a string", names.org))),
    };
    Ok(Claims {
        user,
        org,
        role,
        roles: Names::new(roles.iter().take(MAX_TOKEN_ROLES)),
        groups: Names::new(groups),
        exp,
    })
}

/// A claim that lists names: an array of strings or one space-separated string (absent or null:
/// none). Entries that are not strings are skipped.
fn strings<'a>(v: Option<&'a Value>, name: &str) -> Result<Vec<&'a str>, String> {
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::String(s)) => Ok(s.split_ascii_whitespace().collect()),
        Some(Value::Array(list)) => Ok(list.iter().filter_map(Value::as_str).collect()),
        Some(_) => Err(format!(
            "{name} must be an array of strings or a space-separated string"
        )),
    }
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

/// The signing keys of a JWKS document; keys for algorithms this server does not verify are
/// skipped.
pub fn keys_from_jwks(set: &JwkSet) -> anyhow::Result<Vec<Key>> {
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let Some(alg) = jwk_alg(jwk) else { continue };
        let key = DecodingKey::from_jwk(jwk)
            .map_err(|e| anyhow::anyhow!("key {:?}: {e}", jwk.common.key_id))?;
        keys.push(Key {
            alg,
            kid: jwk.common.key_id.clone(),
            key,
        });
    }
    Ok(keys)
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
