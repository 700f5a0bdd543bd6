//! The other key configurations: EdDSA and ES256 public keys (PEM), a JWKS file chosen by `kid`,
//! a provider's JWKS URL (rotation, outage, cooldown), the `iss` / `aud` checks, and the org and
//! roles claims at configured paths.
mod support;

use std::path::Path;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use orgpulse::proto::ListJobsRequest;
use support::{keys::*, *};
use tonic::Code;

async fn call(server: &TestServer, token: &str) -> Result<(), tonic::Status> {
    server
        .jobs(token)
        .await
        .list_jobs(ListJobsRequest::default())
        .await
        .map(|_| ())
}

fn claims() -> serde_json::Value {
    serde_json::json!({"sub": "u1", "org": "acme", "exp": now_secs() + 600, "iss": "https://auth.test", "aud": "orgpulse"})
}

#[tokio::test]
async fn eddsa_and_es256_pem_keys() {
    let keys = TempDir::new("keys");
    for (name, algo, alg) in [
        ("ed", vec!["-algorithm", "ed25519"], Algorithm::EdDSA),
        (
            "ec",
            vec!["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
            Algorithm::ES256,
        ),
    ] {
        let (private, public) = keypair(&keys.0, name, &algo);
        let data = TempDir::new(name);
        let server = server_with_keys(&data, &["--jwt-public-key".into(), public]).await;
        let good = sign_pem(alg, &private, None, &claims());
        call(&server, &good)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        // An HS256 token is not accepted by a server that has only a public key.
        let hs = jsonwebtoken::encode(
            &Header::default(),
            &claims(),
            &EncodingKey::from_secret(b"x"),
        )
        .unwrap();
        assert_eq!(
            call(&server, &hs).await.unwrap_err().code(),
            Code::Unauthenticated
        );
    }
}

/// (private PEM path, JWKS file path) of a fresh Ed25519 key published in a JWKS under `kid`.
fn ed25519_jwks(dir: &std::path::Path, kid: &str) -> (String, String) {
    let (private, jwk) = ed25519_jwk(dir, kid);
    let jwks = serde_json::json!({ "keys": [jwk] });
    let path = dir.join(format!("{kid}.jwks.json"));
    std::fs::write(&path, jwks.to_string()).unwrap();
    (private, path.display().to_string())
}

/// (private PEM path, public JWK) of a fresh Ed25519 key with id `kid`.
fn ed25519_jwk(dir: &std::path::Path, kid: &str) -> (String, serde_json::Value) {
    let (private, public) = keypair(dir, kid, &["-algorithm", "ed25519"]);
    // Raw Ed25519 public key = the last 32 bytes of its DER SubjectPublicKeyInfo.
    let der = dir.join(format!("{kid}.der")).display().to_string();
    openssl(&[
        "pkey", "-pubin", "-in", &public, "-outform", "DER", "-out", &der,
    ]);
    let raw = std::fs::read(&der).unwrap();
    let x = B64.encode(&raw[raw.len() - 32..]);
    let jwk = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig"});
    (private, jwk)
}

/// A token with `claims` signed by the private key in the PEM file at `pem`.
fn sign_pem(alg: Algorithm, pem: &str, kid: Option<&str>, claims: &serde_json::Value) -> String {
    let pem = std::fs::read(pem).unwrap();
    let key = match alg {
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
        _ => EncodingKey::from_ec_pem(&pem),
    }
    .unwrap();
    let mut header = Header::new(alg);
    header.kid = kid.map(String::from);
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

#[tokio::test]
async fn jwks_file_picks_the_key_by_kid_and_issuer_audience_are_checked() {
    let keys = TempDir::new("jwks");
    let (p1, jwks_path) = ed25519_jwks(&keys.0, "k1");
    let (p2, _) = keypair(&keys.0, "k2", &["-algorithm", "ed25519"]);
    let data = TempDir::new("jwks-server");
    let server = server_with_keys(
        &data,
        &[
            "--jwks-file".into(),
            jwks_path,
            "--jwt-issuer".into(),
            "https://auth.test".into(),
            "--jwt-audience".into(),
            "orgpulse".into(),
        ],
    )
    .await;
    let sign = |pem: &str, kid: &str, claims: &serde_json::Value| {
        sign_pem(Algorithm::EdDSA, pem, Some(kid), claims)
    };
    call(&server, &sign(&p1, "k1", &claims()))
        .await
        .expect("k1 accepted");
    let err = call(&server, &sign(&p2, "k2", &claims()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "unknown kid");
    let err = call(&server, &sign(&p2, "k1", &claims()))
        .await
        .unwrap_err();
    assert!(err.message().contains("signature"), "{err:?}");
    let mut wrong_iss = claims();
    wrong_iss["iss"] = "https://evil.test".into();
    let err = call(&server, &sign(&p1, "k1", &wrong_iss))
        .await
        .unwrap_err();
    assert!(err.message().contains("issuer"), "{err:?}");
    let mut wrong_aud = claims();
    wrong_aud["aud"] = "someone-else".into();
    let err = call(&server, &sign(&p1, "k1", &wrong_aud))
        .await
        .unwrap_err();
    assert!(err.message().contains("audience"), "{err:?}");
}

/// With `--jwt-issuer` and `--jwt-audience` configured, a token that lacks the `iss` or the `aud`
/// claim altogether is UNAUTHENTICATED, naming the missing claim, on a unary call and on Subscribe,
/// whichever kind of key verified its signature.
#[tokio::test]
async fn issuer_and_audience_are_required_when_configured() {
    let keys = TempDir::new("required-claims");
    let secret = keys.0.join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let (rsa, rsa_public) = keypair(
        &keys.0,
        "rsa",
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    );
    let (ed, jwks) = ed25519_jwks(&keys.0, "k1");
    type Sign = Box<dyn Fn(&serde_json::Value) -> String>;
    let configs: Vec<(&str, [String; 2], Sign)> = vec![
        (
            "HS256",
            ["--jwt-secret-file".into(), secret.display().to_string()],
            Box::new(|c| {
                jsonwebtoken::encode(
                    &Header::new(Algorithm::HS256),
                    c,
                    &EncodingKey::from_secret(SECRET.as_bytes()),
                )
                .unwrap()
            }),
        ),
        (
            "RS256",
            ["--jwt-public-key".into(), rsa_public],
            Box::new(move |c| sign_pem(Algorithm::RS256, &rsa, None, c)),
        ),
        (
            "JWKS",
            ["--jwks-file".into(), jwks],
            Box::new(move |c| sign_pem(Algorithm::EdDSA, &ed, Some("k1"), c)),
        ),
    ];
    for (name, key_args, sign) in configs {
        let data = TempDir::new(name);
        let mut args = key_args.to_vec();
        args.extend(
            [
                "--jwt-issuer",
                "https://auth.test",
                "--jwt-audience",
                "orgpulse",
            ]
            .map(String::from),
        );
        let server = server_with_keys(&data, &args).await;
        let good = sign(&claims());
        call(&server, &good)
            .await
            .unwrap_or_else(|e| panic!("{name}: a token with iss and aud is accepted: {e:?}"));
        Sub::open(&server, &good, "acme", "", &[])
            .await
            .unwrap_or_else(|e| panic!("{name}: Subscribe with iss and aud: {e:?}"))
            .caught_up()
            .await;
        for claim in ["iss", "aud"] {
            let mut without = claims();
            without.as_object_mut().unwrap().remove(claim);
            refused(
                &server,
                &sign(&without),
                &format!("token has no {claim} claim"),
            )
            .await;
        }
    }
}

/// A local identity provider serving a JWKS document over HTTP/1.1, counting the fetches.
struct Provider {
    url: String,
    state: Served,
    hits: tokio::sync::watch::Receiver<usize>,
    task: tokio::task::JoinHandle<()>,
}

/// What a provider serves and how many fetches it answered.
type Served = std::sync::Arc<std::sync::Mutex<(String, usize)>>;

impl Provider {
    async fn start(keys: &[&serde_json::Value]) -> Provider {
        Self::start_with(keys, None).await
    }

    /// A provider over HTTPS with the certificate and key in these PEM files.
    async fn start_tls(keys: &[&serde_json::Value], cert: &Path, key: &Path) -> Provider {
        use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        use tokio_rustls::rustls;
        let chain = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        let tls = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        Self::start_with(keys, Some(tls)).await
    }

    async fn start_with(
        keys: &[&serde_json::Value],
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Provider {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!(
            "{scheme}://{}/.well-known/jwks.json",
            listener.local_addr().unwrap()
        );
        let state: Served = std::sync::Arc::new(std::sync::Mutex::new((jwks(keys), 0)));
        let (count, hits) = tokio::sync::watch::channel(0);
        let served = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let (conn, _) = listener.accept().await.unwrap();
                match &tls {
                    None => answer(conn, &served, &count).await,
                    Some(tls) => match tls.accept(conn).await {
                        Ok(conn) => answer(conn, &served, &count).await,
                        Err(e) => eprintln!("provider: TLS handshake failed: {e}"),
                    },
                }
            }
        });
        Provider {
            url,
            state,
            hits,
            task,
        }
    }

    /// Serves `keys` from now on; returns the fetches counted so far.
    fn serve(&self, keys: &[&serde_json::Value]) -> usize {
        let mut s = self.state.lock().unwrap();
        s.0 = jwks(keys);
        s.1
    }

    fn hits(&self) -> usize {
        *self.hits.borrow()
    }

    async fn wait_hits(&mut self, n: usize) {
        tokio::time::timeout(WAIT, self.hits.wait_for(|h| *h >= n))
            .await
            .expect("the server fetches the key set")
            .unwrap();
    }

    /// Stops answering: connections are refused from now on.
    async fn down(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Reads one request and answers it with the served key set, counting the fetch.
async fn answer<S>(mut conn: S, served: &Served, count: &tokio::sync::watch::Sender<usize>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.ends_with(b"\r\n\r\n") {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    // The body is chosen when the fetch is counted: every fetch counted after a `serve` gets the
    // new set.
    let body = {
        let mut s = served.lock().unwrap();
        s.1 += 1;
        count.send_replace(s.1);
        s.0.clone()
    };
    let answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(answer.as_bytes()).await;
    let _ = conn.shutdown().await;
}

fn jwks(keys: &[&serde_json::Value]) -> String {
    serde_json::json!({ "keys": keys }).to_string()
}

async fn jwks_url_server(data: &TempDir, provider: &Provider, extra: &[&str]) -> TestServer {
    let mut args = vec!["--jwks-url".to_string(), provider.url.clone()];
    args.extend(extra.iter().map(|s| s.to_string()));
    server_with_keys(data, &args).await
}

#[tokio::test]
async fn jwks_url_picks_up_a_rotated_key_without_restart_and_keeps_its_keys_when_the_provider_is_down()
 {
    let keys = TempDir::new("jwks-url");
    let (p1, k1) = ed25519_jwk(&keys.0, "k1");
    let (p2, k2) = ed25519_jwk(&keys.0, "k2");
    let (p3, _) = ed25519_jwk(&keys.0, "k3");
    let provider = Provider::start(&[&k1]).await;
    let data = TempDir::new("jwks-url-server");
    let server = jwks_url_server(&data, &provider, &["--jwks-cooldown", "0s"]).await;
    let sign = |pem: &str, kid: &str| sign_pem(Algorithm::EdDSA, pem, Some(kid), &claims());
    call(&server, &sign(&p1, "k1")).await.expect("k1 accepted");
    assert_eq!(provider.hits(), 1, "fetched once at start, then cached");
    // The provider rotates: k2 appears. A token signed with it is accepted at once.
    provider.serve(&[&k1, &k2]);
    call(&server, &sign(&p2, "k2"))
        .await
        .expect("the rotated-in key is fetched on its first token");
    assert_eq!(provider.hits(), 2);
    call(&server, &sign(&p1, "k1"))
        .await
        .expect("k1 still accepted");
    assert_eq!(provider.hits(), 2, "known keys need no fetch");
    // The provider goes down: the cached keys still verify; an unknown key id is refused.
    provider.down().await;
    for (pem, kid) in [(&p1, "k1"), (&p2, "k2")] {
        call(&server, &sign(pem, kid))
            .await
            .unwrap_or_else(|e| panic!("{kid} accepted from the cache: {e:?}"));
    }
    let err = call(&server, &sign(&p3, "k3")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("not accepted"), "{err:?}");
    call(&server, &sign(&p1, "k1"))
        .await
        .expect("a failed refresh keeps the last good set");
}

#[tokio::test]
async fn jwks_url_is_refreshed_periodically_and_unknown_kids_fetch_at_most_once_per_cooldown() {
    let keys = TempDir::new("jwks-refresh");
    let (p1, k1) = ed25519_jwk(&keys.0, "k1");
    let (p2, k2) = ed25519_jwk(&keys.0, "k2");
    let sign = |pem: &str, kid: &str| sign_pem(Algorithm::EdDSA, pem, Some(kid), &claims());
    // Tokens with an unknown kid within the cooldown cause no fetch.
    let quiet = Provider::start(&[&k1]).await;
    let data = TempDir::new("jwks-cooldown-server");
    let server = jwks_url_server(&data, &quiet, &["--jwks-cooldown", "1h"]).await;
    for _ in 0..5 {
        let err = call(&server, &sign(&p2, "k2")).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    assert_eq!(quiet.hits(), 1, "only the fetch at start");

    let mut provider = Provider::start(&[&k1]).await;
    let data = TempDir::new("jwks-refresh-server");
    let server = jwks_url_server(&data, &provider, &["--jwks-refresh", "200ms"]).await;
    call(&server, &sign(&p1, "k1")).await.expect("k1 accepted");
    // The provider replaces k1 by k2; the periodic refresh picks that up: once a fetch counted
    // after the change has completed (the next one started), k1 is gone and k2 verifies.
    let counted = provider.serve(&[&k2]);
    provider.wait_hits(counted + 2).await;
    call(&server, &sign(&p2, "k2"))
        .await
        .expect("k2 accepted after the periodic refresh");
    let err = call(&server, &sign(&p1, "k1")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "k1 was removed: {err:?}");
}

fn hs256(claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn create(server: &TestServer, token: &str) -> Result<orgpulse::proto::Job, tonic::Status> {
    server
        .jobs(token)
        .await
        .create_job(orgpulse::proto::CreateJobRequest {
            title: "t".into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn org_and_roles_claims_at_configured_paths() {
    let server = TestServer::start_args(&[
        "--jwt-org-claim",
        "app_metadata.org",
        "--jwt-roles-claim",
        "realm_access.roles",
    ])
    .await;
    let exp = now_secs() + 600;
    let with = |org: serde_json::Value, roles: serde_json::Value| {
        hs256(
            &serde_json::json!({"sub": "u1", "exp": exp, "app_metadata": org, "realm_access": roles}),
        )
    };
    let admin = with(
        serde_json::json!({"org": "acme"}),
        serde_json::json!({"roles": ["offline_access", "admin"]}),
    );
    assert_eq!(create(&server, &admin).await.expect("admin").org_id, "acme");
    // Roles as one space-separated string.
    let spaced = with(
        serde_json::json!({"org": "acme"}),
        serde_json::json!({"roles": "openid member"}),
    );
    create(&server, &spaced).await.expect("member");
    let viewer = with(
        serde_json::json!({"org": "acme"}),
        serde_json::json!({"roles": ["viewer"]}),
    );
    let err = create(&server, &viewer).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    // The top-level `org` / `roles` are not read any more.
    let flat =
        hs256(&serde_json::json!({"sub": "u1", "exp": exp, "org": "acme", "roles": ["admin"]}));
    refused(
        &server,
        &flat,
        "app_metadata.org is required unless the role is service",
    )
    .await;
    let bad_roles = with(
        serde_json::json!({"org": "acme"}),
        serde_json::json!({"roles": 7}),
    );
    refused(&server, &bad_roles, "realm_access.roles must be an array").await;

    // A claim whose name itself has dots (Auth0's namespaced claims) is taken by its exact name.
    let namespaced = TestServer::start_args(&["--jwt-org-claim", "https://example.com/org"]).await;
    let token = hs256(
        &serde_json::json!({"sub": "u1", "exp": exp, "https://example.com/org": "acme", "roles": ["admin"]}),
    );
    assert_eq!(
        create(&namespaced, &token)
            .await
            .expect("namespaced org")
            .org_id,
        "acme"
    );
}

/// The production path: a provider over HTTPS, trusted through the system roots (here
/// `SSL_CERT_FILE`, which the server honours like other TLS clients).
#[tokio::test]
async fn jwks_url_over_https() {
    let keys = TempDir::new("jwks-https");
    let (cert, key) = self_signed_cert(&keys.0);
    let (p1, k1) = ed25519_jwk(&keys.0, "k1");
    let provider = Provider::start_tls(&[&k1], &cert, &key).await;
    assert!(provider.url.starts_with("https://"));
    let data = TempDir::new("jwks-https-server");
    let args = vec![
        "--listen".to_string(),
        "127.0.0.1:0".into(),
        "--database".into(),
        format!("sqlite://{}/orgpulse.db", data.0.display()),
        "--jwks-url".into(),
        provider.url.clone(),
    ];
    let env = vec![("SSL_CERT_FILE".to_string(), cert.display().to_string())];
    let server = TestServer::spawn_in_env(args, data.0.clone(), false, env).await;
    call(
        &server,
        &sign_pem(Algorithm::EdDSA, &p1, Some("k1"), &claims()),
    )
    .await
    .expect("a key fetched over HTTPS verifies");
    assert_eq!(provider.hits(), 1);
}
