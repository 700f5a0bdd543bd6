//! The `orgpulse-server` binary's first-run behaviour. (Being an integration test of this package
//! also makes `cargo test --workspace` build the binary before the workspace's end-to-end tests run.)
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_orgpulse-server");

#[test]
fn help_lists_every_flag() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--listen",
        "--database",
        "--jwt-secret-file",
        "--jwt-public-key",
        "--jwks-file",
        "--jwt-issuer",
        "--jwt-audience",
        "--cors-origin",
        "--heartbeat-interval",
        "--presence-grace",
        "--retention",
        "--dev",
        "--demo",
        "--log-format",
        "ORGPULSE_LISTEN",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn without_a_key_it_refuses_to_start_and_says_how() {
    let dir = std::env::temp_dir().join(format!("orgpulse-nokey-{}", std::process::id()));
    let out = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--database"])
        .arg(format!("sqlite://{}/o.db", dir.display()))
        .env_remove("ORGPULSE_JWT_SECRET_FILE")
        .env_remove("ORGPULSE_DEV")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("no JWT key configured"), "{err}");
    assert!(
        err.contains("--jwt-secret-file") && err.contains("--dev"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn dev_mode_creates_a_secret_prints_tokens_and_keeps_the_secret() {
    let dir = std::env::temp_dir().join(format!("orgpulse-dev-{}", std::process::id()));
    let run = || {
        let mut child = Command::new(BIN)
            .args(["--dev", "--listen", "127.0.0.1:0", "--database"])
            .arg(format!("sqlite://{}/o.db", dir.display()))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut out = String::new();
        let mut reader = std::io::BufReader::new(child.stdout.take().unwrap());
        loop {
            let mut line = String::new();
            let n = std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
            assert!(n > 0, "server exited early: {out}");
            out.push_str(&line);
            if line.starts_with("listening on ") {
                break;
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        out
    };
    let first = run();
    for want in [
        "admin",
        "member",
        "viewer",
        "dashboard: http://127.0.0.1:",
        "/#token=ey",
    ] {
        assert!(first.contains(want), "{want} missing from:\n{first}");
    }
    let secret = std::fs::read_to_string(dir.join("dev-jwt-secret")).unwrap();
    run();
    assert_eq!(
        std::fs::read_to_string(dir.join("dev-jwt-secret")).unwrap(),
        secret,
        "secret is kept"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_unreachable_postgresql_database_stops_the_start_with_one_line() {
    let dir = std::env::temp_dir().join(format!("orgpulse-nopg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, "a-secret-of-enough-length-0123456789").unwrap();
    // Nothing listens on port 1.
    let out = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--database"])
        .arg("postgres://orgpulse@127.0.0.1:1/orgpulse")
        .arg("--jwt-secret-file")
        .arg(&secret)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot reach the PostgreSQL database 127.0.0.1:1/orgpulse")
            && err.contains("refused"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
