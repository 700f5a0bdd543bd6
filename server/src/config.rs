//! Server configuration: command-line flags, each with an `ORGPULSE_*` environment equivalent.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};

/// orgpulse-server: a real-time event server. Jobs and notifications of organizations, streamed to
/// every subscriber of the org the moment they commit, over gRPC and grpc-web on one port.
#[derive(Parser, Debug, Clone)]
#[command(name = "orgpulse-server", version, after_help = EXAMPLES)]
pub struct Config {
    /// Address to serve gRPC, grpc-web, the dashboard, /healthz and /metrics on (port 0 = any free port).
    #[arg(long, env = "ORGPULSE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Database URL: `sqlite://PATH` (created when missing) or `postgres://USER@HOST:PORT/DB`
    /// (`postgresql://` too; the schema is migrated at start; several nodes may share it).
    #[arg(
        long,
        env = "ORGPULSE_DATABASE",
        default_value = "sqlite://./orgpulse-data/orgpulse.db"
    )]
    pub database: String,

    /// TLS certificate chain (PEM). With --tls-key, the port serves everything over TLS
    /// (native gRPC over HTTP/2, grpc-web and the dashboard over HTTP/1.1 or HTTP/2).
    #[arg(long, env = "ORGPULSE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM) for --tls-cert.
    #[arg(long, env = "ORGPULSE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// HS256: file whose bytes, surrounding whitespace trimmed, are the shared secret.
    #[arg(long, env = "ORGPULSE_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,

    /// PEM public key file; RS256, ES256 or EdDSA chosen by the key type.
    #[arg(long, env = "ORGPULSE_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,

    /// JWKS file (JSON); the key is selected by the token's `kid`.
    #[arg(long, env = "ORGPULSE_JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,

    /// URL of the identity provider's JWKS (https://, or http:// for tests): fetched at start
    /// (the server does not start without it), refreshed every --jwks-refresh and when a token
    /// names an unknown `kid`; the last good key set is kept while the provider is unreachable.
    #[arg(long, env = "ORGPULSE_JWKS_URL")]
    pub jwks_url: Option<String>,

    /// How often the --jwks-url key set is fetched again.
    #[arg(long, env = "ORGPULSE_JWKS_REFRESH", default_value = "5m", value_parser = parse_duration)]
    pub jwks_refresh: Duration,

    /// Least time between two fetches of the --jwks-url key set caused by tokens with an
    /// unknown `kid` (so a flood of such tokens cannot hammer the provider).
    #[arg(long, env = "ORGPULSE_JWKS_COOLDOWN", default_value = "10s", value_parser = parse_duration)]
    pub jwks_cooldown: Duration,

    /// Claim holding the org id: a name, or a dotted path into nested objects
    /// (`app_metadata.org`) used when no claim has that exact name.
    #[arg(long, env = "ORGPULSE_JWT_ORG_CLAIM", default_value = "org")]
    pub jwt_org_claim: String,

    /// Claim holding the roles (an array of strings or one space-separated string); a name or a
    /// dotted path like `realm_access.roles`.
    #[arg(long, env = "ORGPULSE_JWT_ROLES_CLAIM", default_value = "roles")]
    pub jwt_roles_claim: String,

    /// Claim holding the caller's groups, which event audiences name (an array of strings or one
    /// space-separated string, at most 256); a name or a dotted path like `app_metadata.groups`.
    #[arg(long, env = "ORGPULSE_JWT_GROUPS_CLAIM", default_value = "groups")]
    pub jwt_groups_claim: String,

    /// Required `iss` claim, when set.
    #[arg(long, env = "ORGPULSE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Required `aud` claim, when set.
    #[arg(long, env = "ORGPULSE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Clock leeway for `exp` and `nbf` checks (at most 1 day).
    #[arg(long, env = "ORGPULSE_JWT_LEEWAY", default_value = "0s", value_parser = parse_duration)]
    pub jwt_leeway: Duration,

    /// The product's PostgreSQL database (postgres://USER@HOST:PORT/DB) whose outbox table is
    /// turned into entity events: every committed row becomes exactly one `entity_changed` event
    /// and is deleted; invalid rows move to `<table>_rejected`.
    #[arg(long, env = "ORGPULSE_OUTBOX")]
    pub outbox: Option<String>,

    /// The outbox table (created with `<table>_rejected` and its NOTIFY trigger when missing).
    #[arg(long, env = "ORGPULSE_OUTBOX_TABLE", default_value = "orgpulse_outbox")]
    pub outbox_table: String,

    /// How often the outbox is read when no NOTIFY woke the consumer.
    #[arg(long, env = "ORGPULSE_OUTBOX_POLL", default_value = "500ms", value_parser = parse_duration)]
    pub outbox_poll: Duration,

    /// Browser origin allowed to call grpc-web (repeatable, or comma-separated in the env var).
    #[arg(
        long = "cors-origin",
        env = "ORGPULSE_CORS_ORIGIN",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,

    /// The longest a stream stays silent: an idle stream gets a heartbeat at least this often
    /// (on its connection's grid: more than half of this after its last message).
    #[arg(long, env = "ORGPULSE_HEARTBEAT_INTERVAL", default_value = "15s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,

    /// How long a user stays online after their last stream closed.
    #[arg(long, env = "ORGPULSE_PRESENCE_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub presence_grace: Duration,

    /// Keep events in the log this long; older cursors get `resync`.
    #[arg(long, env = "ORGPULSE_RETENTION", default_value = "7d", value_parser = parse_duration)]
    pub retention: Duration,

    /// How long a store write waits for a lock another process holds on the database file
    /// before it fails (and the server reports NOT_SERVING until it can write again).
    #[arg(long, env = "ORGPULSE_SQLITE_BUSY_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub sqlite_busy_timeout: Duration,

    /// Events a subscriber may have queued before it is cut off as too slow.
    #[arg(long, env = "ORGPULSE_SUBSCRIBER_QUEUE", default_value_t = 4096)]
    pub subscriber_queue: usize,

    /// Open Subscribe streams one user (same `sub` and org) may hold on this node; the next one
    /// gets RESOURCE_EXHAUSTED.
    #[arg(long, env = "ORGPULSE_MAX_STREAMS_PER_USER", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_user: u32,

    /// `Poll` calls one user (same `sub` and org) may have waiting at once on this node; the next
    /// one gets RESOURCE_EXHAUSTED.
    #[arg(long, env = "ORGPULSE_MAX_POLLS_PER_USER", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_polls_per_user: u32,

    /// Concurrent HTTP/2 streams (calls) one connection may hold open.
    #[arg(long, env = "ORGPULSE_MAX_CONCURRENT_STREAMS", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,

    /// Open client connections at most; lowered at start to what the open-file limit allows
    /// (the server raises its soft limit to the hard one). At capacity a new connection evicts
    /// the oldest one that has not sent a complete request head, or is closed at accept.
    #[arg(long, env = "ORGPULSE_MAX_CONNECTIONS", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,

    /// Bytes that all request bodies being received on this node may hold together (`64MiB`,
    /// `512KiB` or plain bytes); beyond it new calls get RESOURCE_EXHAUSTED.
    #[arg(long, env = "ORGPULSE_MAX_REQUEST_BUFFER", default_value = "64MiB", value_parser = parse_size)]
    pub max_request_buffer: usize,

    /// Development mode: create and keep an HS256 secret in the data directory (the SQLite file's
    /// directory; `./orgpulse-data` with PostgreSQL) and print tokens.
    #[arg(long, env = "ORGPULSE_DEV")]
    pub dev: bool,

    /// NATS server URL (`nats://HOST:4222`): cluster mode. Committed events and presence are
    /// shared with the other nodes on the same database through it. Needs a PostgreSQL store.
    #[arg(long, env = "ORGPULSE_NATS")]
    pub nats: Option<String>,

    /// Prefix of this cluster's NATS subjects (several clusters may share one NATS server).
    #[arg(long, env = "ORGPULSE_NATS_SUBJECT_PREFIX", default_value = "orgpulse")]
    pub nats_subject_prefix: String,

    /// This node's name in logs, `/metrics` and presence heartbeats (default: random).
    #[arg(long, env = "ORGPULSE_NODE_ID")]
    pub node_id: Option<String>,

    /// Cluster mode: how often a node tells the others which users it has streams for.
    #[arg(long, env = "ORGPULSE_PRESENCE_HEARTBEAT", default_value = "5s", value_parser = parse_duration)]
    pub presence_heartbeat: Duration,

    /// Cluster mode: a node not heard from for this long is dead; its users' streams stop
    /// counting (they go offline after the grace period unless they reconnected elsewhere).
    #[arg(long, env = "ORGPULSE_PRESENCE_NODE_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    pub presence_node_timeout: Duration,

    /// Run a background workload in org `demo` (jobs progressing, notifications); its unfinished
    /// jobs are cancelled when the server stops.
    #[arg(long, env = "ORGPULSE_DEMO")]
    pub demo: bool,

    /// Log format.
    #[arg(long, env = "ORGPULSE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

const EXAMPLES: &str = "\
Examples:
  orgpulse-server --dev --demo
  orgpulse-server --database sqlite:///var/lib/orgpulse/orgpulse.db --jwt-secret-file /etc/orgpulse/secret
  orgpulse-server --jwt-public-key /etc/orgpulse/jwt.pem --jwt-issuer https://auth.example.com
  orgpulse-server --jwks-url https://idp.example.com/.well-known/jwks.json --jwt-org-claim app_metadata.org
  orgpulse-server --jwt-secret-file ./secret --outbox postgres://app@db.example.com/app

Logs go to stderr; filter them with RUST_LOG (e.g. RUST_LOG=orgpulse_server=debug).";

fn parse_duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// A byte size: plain bytes, or a number with `KiB`, `MiB` or `GiB`.
fn parse_size(s: &str) -> Result<usize, String> {
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, ""),
    };
    let scale: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => return Err(format!("unknown unit {other:?}: use KiB, MiB or GiB")),
    };
    digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{s:?} is not a size like 64MiB"))
}

/// The store `--database` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// An SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL.
    Postgres(String),
}

impl Config {
    /// The store named by `--database`.
    pub fn database(&self) -> Result<Database, String> {
        let url = self.database.as_str();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Database::Postgres(url.to_string()));
        }
        let path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .ok_or_else(|| {
                format!(
                    "unsupported --database {url:?}: expected sqlite://PATH or postgres://USER@HOST/DB"
                )
            })?;
        if path.is_empty() {
            return Err("--database sqlite:// needs a file path".into());
        }
        Ok(Database::Sqlite(PathBuf::from(path)))
    }

    /// Where `--dev` keeps its secret: beside the SQLite file, or `./orgpulse-data` with a
    /// database elsewhere.
    pub fn data_dir(&self) -> Result<PathBuf, String> {
        Ok(match self.database()? {
            Database::Sqlite(path) => path
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .to_path_buf(),
            Database::Postgres(_) => PathBuf::from("./orgpulse-data"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn database(url: &str) -> Result<Database, String> {
        Config::parse_from(["orgpulse-server", "--database", url]).database()
    }

    #[test]
    fn database_urls_choose_the_engine() {
        assert_eq!(
            database("sqlite:///var/lib/o.db"),
            Ok(Database::Sqlite("/var/lib/o.db".into()))
        );
        assert_eq!(database("sqlite:o.db"), Ok(Database::Sqlite("o.db".into())));
        for pg in ["postgres://u@h:5432/db", "postgresql://u@h/db"] {
            assert_eq!(database(pg), Ok(Database::Postgres(pg.into())));
        }
        assert!(database("sqlite://").is_err());
        assert!(
            database("mysql://h/db")
                .unwrap_err()
                .contains("postgres://")
        );
    }

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("512 KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("0").is_err());
        assert!(parse_size("64MB").unwrap_err().contains("MiB"));
        assert!(parse_size("MiB").is_err());
    }
}
