//! Asymmetric token keys for the tests: key pairs made by `openssl genpkey`, and servers that
//! check tokens with key flags of the test's choice (`--jwt-public-key`, `--jwks-file`, ...).
use std::{path::Path, process::Command, process::Stdio};

use super::{TempDir, TestServer, database_url};

/// Runs `openssl ARGS`, which must succeed.
pub fn openssl(args: &[&str]) {
    let ok = Command::new("openssl")
        .args(args)
        .stderr(Stdio::null())
        .status()
        .expect("openssl")
        .success();
    assert!(ok, "openssl {args:?}");
}

/// (private PEM path, public PEM path) of a fresh key made by `openssl genpkey <algo args>`.
pub fn keypair(dir: &Path, name: &str, algo: &[&str]) -> (String, String) {
    let private = dir.join(format!("{name}.key")).display().to_string();
    let public = dir.join(format!("{name}.pub")).display().to_string();
    let mut args = vec!["genpkey"];
    args.extend(algo);
    args.extend(["-out", &private]);
    openssl(&args);
    openssl(&["pkey", "-in", &private, "-pubout", "-out", &public]);
    (private, public)
}

/// A server on `dir`'s store with exactly the token key flags `key_args` (no shared secret).
pub async fn server_with_keys(dir: &TempDir, key_args: &[String]) -> TestServer {
    let mut args = vec![
        "--listen".to_string(),
        "127.0.0.1:0".into(),
        "--database".into(),
        database_url(&dir.0),
    ];
    args.extend(key_args.iter().cloned());
    TestServer::spawn(args, dir.0.clone()).await
}
