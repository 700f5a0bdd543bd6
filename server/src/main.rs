//! The `orgpulse-server` binary: parses the configuration, sets up logging and keys, binds the
//! port and runs the server until SIGINT or SIGTERM.
use std::{io::IsTerminal, process::ExitCode};

use clap::Parser;
use orgpulse_server::{
    auth::{Authenticator, ClaimNames, KeyConfig},
    config::{Config, LogFormat},
    dev,
    jwks::RemoteKeys,
    server,
};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cfg = Config::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never in a log file or a journal.
        .with_ansi(std::io::stderr().is_terminal());
    match cfg.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(serve(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("orgpulse-server: {e:#}");
            ExitCode::from(2)
        }
    }
}

const NO_KEY: &str = "no JWT key configured. Pass one of
  --jwt-secret-file FILE   HS256 shared secret (the file's bytes, whitespace trimmed)
  --jwt-public-key PEM     RS256, ES256 or EdDSA public key
  --jwks-file FILE         JWKS, keys selected by kid
  --jwks-url URL           the JWKS of your identity provider, fetched and refreshed
or run `orgpulse-server --dev` to create a development secret and print ready-to-use tokens.";

async fn serve(cfg: Config) -> anyhow::Result<()> {
    let mut secret = match &cfg.jwt_secret_file {
        Some(path) => Some(
            std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("reading --jwt-secret-file {}: {e}", path.display()))?
                .trim_ascii()
                .to_vec(),
        ),
        None => None,
    };
    let has_key = secret.is_some()
        || cfg.jwt_public_key.is_some()
        || cfg.jwks_file.is_some()
        || cfg.jwks_url.is_some();
    let data_dir = cfg.data_dir().map_err(anyhow::Error::msg)?;
    if !has_key {
        anyhow::ensure!(cfg.dev, NO_KEY);
        secret = Some(dev::dev_secret(&data_dir)?);
    }
    let jwks_url = match &cfg.jwks_url {
        Some(url) => Some(RemoteKeys::load(url, cfg.jwks_cooldown).await?),
        None => None,
    };
    let auth = Authenticator::new(KeyConfig {
        secret: secret.as_deref(),
        public_key_pem: cfg.jwt_public_key.as_deref(),
        jwks_file: cfg.jwks_file.as_deref(),
        jwks_url,
        claims: ClaimNames {
            org: cfg.jwt_org_claim.clone(),
            roles: cfg.jwt_roles_claim.clone(),
            groups: cfg.jwt_groups_claim.clone(),
        },
        issuer: cfg.jwt_issuer.clone(),
        audience: cfg.jwt_audience.clone(),
        leeway: cfg.jwt_leeway,
    })?;
    let listener =
        listen(cfg.listen).map_err(|e| anyhow::anyhow!("binding {}: {e}", cfg.listen))?;
    let addr = listener.local_addr()?;
    if cfg.dev
        && let Some(s) = &secret
    {
        dev::print_dev_tokens(s, addr)?;
    }
    server::run(cfg, auth, listener, shutdown_signal()).await
}

/// Connections the kernel may hold accepted but not yet taken (capped by `net.core.somaxconn`).
/// tokio's default of 1,024 overflowed when the clients of a dead node came all at once: a
/// dropped SYN is retried only after a second, then three.
const LISTEN_BACKLOG: u32 = 4096;

/// The listening socket on `addr`, as tokio's `TcpListener::bind` makes it but with
/// [`LISTEN_BACKLOG`].
fn listen(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
