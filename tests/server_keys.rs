//! The other key configurations: EdDSA and ES256 public keys (PEM), a JWKS file chosen by `kid`,
//! and the `iss` / `aud` checks.
mod support;

use std::process::{Command, Stdio};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use orgpulse::proto::ListJobsRequest;
use support::*;
use tonic::Code;

fn openssl(args: &[&str]) {
    let ok = Command::new("openssl")
        .args(args)
        .stderr(Stdio::null())
        .status()
        .expect("openssl")
        .success();
    assert!(ok, "openssl {args:?}");
}

/// (private PEM path, public PEM path) of a fresh key made by `openssl genpkey <algo args>`.
fn keypair(dir: &std::path::Path, name: &str, algo: &[&str]) -> (String, String) {
    let private = dir.join(format!("{name}.key")).display().to_string();
    let public = dir.join(format!("{name}.pub")).display().to_string();
    let mut args = vec!["genpkey"];
    args.extend(algo);
    args.extend(["-out", &private]);
    openssl(&args);
    openssl(&["pkey", "-in", &private, "-pubout", "-out", &public]);
    (private, public)
}

async fn server_with(dir: &TempDir, key_args: &[String]) -> TestServer {
    let mut args = vec![
        "--listen".to_string(),
        "127.0.0.1:0".into(),
        "--database".into(),
        database_url(&dir.0),
    ];
    args.extend(key_args.iter().cloned());
    TestServer::spawn(args, dir.0.clone()).await
}

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
        let server = server_with(&data, &["--jwt-public-key".into(), public]).await;
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
    let (private, public) = keypair(dir, kid, &["-algorithm", "ed25519"]);
    // Raw Ed25519 public key = the last 32 bytes of its DER SubjectPublicKeyInfo.
    let der = dir.join(format!("{kid}.der")).display().to_string();
    openssl(&[
        "pkey", "-pubin", "-in", &public, "-outform", "DER", "-out", &der,
    ]);
    let raw = std::fs::read(&der).unwrap();
    let x = B64.encode(&raw[raw.len() - 32..]);
    let jwks = serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig"}]});
    let path = dir.join(format!("{kid}.jwks.json"));
    std::fs::write(&path, jwks.to_string()).unwrap();
    (private, path.display().to_string())
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
    let server = server_with(
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
        let server = server_with(&data, &args).await;
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
