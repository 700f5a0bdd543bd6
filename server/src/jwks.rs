//! A key set fetched from a product's identity provider (`--jwks-url`, Auth0 / Keycloak / Clerk /
//! Cognito style): fetched at start (the server refuses to start without one), refreshed
//! periodically and when a token names a `kid` the set does not hold (at most once per cooldown),
//! and kept as it is whenever the provider is unreachable or answers with something unusable.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::JwkSet;
use parking_lot::{Mutex, RwLock};
use tokio_rustls::{TlsConnector, rustls};
use tokio_util::sync::CancellationToken;

use crate::auth::{Key, keys_from_jwks};

/// How long one fetch of the key set may take, connect to last byte.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest key-set document accepted.
const MAX_BODY: usize = 1024 * 1024;

/// The provider's current key set and how to refresh it.
pub struct RemoteKeys {
    url: String,
    uri: http::Uri,
    tls: Option<TlsConnector>,
    set: RwLock<Arc<[Key]>>,
    /// Least time between two fetches caused by unknown key ids.
    cooldown: Duration,
    /// When the last fetch started (successful or not).
    last_fetch: Mutex<Instant>,
    /// One fetch at a time.
    fetching: tokio::sync::Mutex<()>,
}

impl RemoteKeys {
    /// Fetches the key set at `url` (http:// or https://); fails when it cannot be fetched or holds
    /// no usable key.
    pub async fn load(url: &str, cooldown: Duration) -> anyhow::Result<Arc<RemoteKeys>> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| anyhow::anyhow!("--jwks-url {url:?}: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("https") => Some(tls_connector()?),
            Some("http") => None,
            _ => anyhow::bail!("--jwks-url {url:?}: expected an https:// (or http://) URL"),
        };
        anyhow::ensure!(uri.host().is_some(), "--jwks-url {url:?}: no host");
        let mut remote = RemoteKeys {
            url: url.to_string(),
            uri,
            tls,
            set: RwLock::new(Arc::from(Vec::new())),
            cooldown,
            last_fetch: Mutex::new(Instant::now()),
            fetching: tokio::sync::Mutex::new(()),
        };
        let keys = remote
            .fetch()
            .await
            .map_err(|e| anyhow::anyhow!("--jwks-url {url}: cannot load the key set: {e:#}"))?;
        remote.set = RwLock::new(keys.into());
        Ok(Arc::new(remote))
    }

    /// The keys as last fetched.
    pub fn current(&self) -> Arc<[Key]> {
        self.set.read().clone()
    }

    /// Called when a token names a key id the set does not hold: fetches the set again unless a
    /// fetch ran within the cooldown. True when the set was replaced.
    pub async fn refresh_for_unknown_kid(&self) -> bool {
        let asked = Instant::now();
        let _one = self.fetching.lock().await;
        let last = *self.last_fetch.lock();
        // Another caller fetched while we waited: its set is the one to look in.
        if last >= asked {
            return true;
        }
        if last.elapsed() < self.cooldown {
            return false;
        }
        self.refresh().await
    }

    /// Refreshes the set every `period` until `stop`.
    pub async fn refresh_every(self: Arc<Self>, period: Duration, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
            let _one = self.fetching.lock().await;
            self.refresh().await;
        }
    }

    /// One fetch (the caller holds `fetching`); on failure the last good set stays.
    async fn refresh(&self) -> bool {
        match self.fetch().await {
            Ok(keys) => {
                tracing::debug!(url = self.url, keys = keys.len(), "key set refreshed");
                *self.set.write() = keys.into();
                true
            }
            Err(e) => {
                tracing::warn!(
                    url = self.url,
                    error = format!("{e:#}"),
                    "refreshing the key set failed; keeping the last good one"
                );
                false
            }
        }
    }

    async fn fetch(&self) -> anyhow::Result<Vec<Key>> {
        *self.last_fetch.lock() = Instant::now();
        let body = tokio::time::timeout(FETCH_TIMEOUT, self.get())
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {FETCH_TIMEOUT:?}"))??;
        let set: JwkSet = serde_json::from_slice(&body)
            .map_err(|e| anyhow::anyhow!("not a JWKS document: {e}"))?;
        let keys = keys_from_jwks(&set)?;
        anyhow::ensure!(!keys.is_empty(), "the key set holds no usable signing key");
        Ok(keys)
    }

    /// `GET` the URL over HTTP/1.1; the body of a 200 answer.
    async fn get(&self) -> anyhow::Result<Bytes> {
        let host = self.uri.host().unwrap_or_default();
        let tls = self.tls.as_ref();
        let port = self
            .uri
            .port_u16()
            .unwrap_or(if tls.is_some() { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host, port)).await?;
        let request = http::Request::get(self.uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(
                http::header::HOST,
                self.uri.authority().map_or(host, |a| a.as_str()),
            )
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::USER_AGENT, "orgpulse-server")
            .body(Empty::<Bytes>::new())?;
        let response = match tls {
            None => send(TokioIo::new(tcp), request).await?,
            Some(tls) => {
                let name = rustls_pki_types::ServerName::try_from(host.to_string())?;
                send(TokioIo::new(tls.connect(name, tcp).await?), request).await?
            }
        };
        anyhow::ensure!(
            response.status() == http::StatusCode::OK,
            "HTTP status {}",
            response.status()
        );
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the answer: {e}"))?;
        Ok(body.to_bytes())
    }
}

async fn send<I>(
    io: I,
    request: http::Request<Empty<Bytes>>,
) -> anyhow::Result<http::Response<hyper::body::Incoming>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender.send_request(request).await?)
}

/// TLS for https:// providers: the system's roots (`SSL_CERT_FILE` overrides them).
fn tls_connector() -> anyhow::Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for cert in found.certs {
        let _ = roots.add(cert);
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "no trusted root certificates found on this system (set SSL_CERT_FILE)"
    );
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}
