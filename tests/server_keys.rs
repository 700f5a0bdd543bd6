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
        let pem = std::fs::read(&private).unwrap();
        let key = match alg {
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem).unwrap(),
            _ => EncodingKey::from_ec_pem(&pem).unwrap(),
        };
        let good = jsonwebtoken::encode(&Header::new(alg), &claims(), &key).unwrap();
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

#[tokio::test]
async fn jwks_file_picks_the_key_by_kid_and_issuer_audience_are_checked() {
    let keys = TempDir::new("jwks");
    let (p1, pub1) = keypair(&keys.0, "k1", &["-algorithm", "ed25519"]);
    let (p2, _) = keypair(&keys.0, "k2", &["-algorithm", "ed25519"]);
    // Raw Ed25519 public key = the last 32 bytes of its DER SubjectPublicKeyInfo.
    let der = keys.0.join("k1.der").display().to_string();
    openssl(&[
        "pkey", "-pubin", "-in", &pub1, "-outform", "DER", "-out", &der,
    ]);
    let raw = std::fs::read(&der).unwrap();
    let x = B64.encode(&raw[raw.len() - 32..]);
    let jwks = serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "k1", "alg": "EdDSA", "use": "sig"}]});
    let jwks_path = keys.0.join("jwks.json");
    std::fs::write(&jwks_path, jwks.to_string()).unwrap();
    let data = TempDir::new("jwks-server");
    let server = server_with(
        &data,
        &[
            "--jwks-file".into(),
            jwks_path.display().to_string(),
            "--jwt-issuer".into(),
            "https://auth.test".into(),
            "--jwt-audience".into(),
            "orgpulse".into(),
        ],
    )
    .await;
    let sign = |pem: &str, kid: &str, claims: &serde_json::Value| {
        let mut h = Header::new(Algorithm::EdDSA);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(
            &h,
            claims,
            &EncodingKey::from_ed_pem(&std::fs::read(pem).unwrap()).unwrap(),
        )
        .unwrap()
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
