//! End-to-end: every `orgpulse` command other than `watch` against a live server, with the exit
//! code of each error class (usage 2, auth 3, not found 4, conflict 5, unavailable 6); the
//! presence and broadcast commands as a `watch` sees them.
mod cli_support;
mod support;

use std::{process::Stdio, time::Duration};

use cli_support::*;
use serde_json::Value;
use support::{
    SECRET, TempDir, TestServer, cursor_at,
    keys::{keypair, server_with_keys},
    token,
};

const ORG: &str = "cmds";

fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

fn one(stdout: &str) -> Value {
    let mut lines = json_lines(stdout);
    assert_eq!(lines.len(), 1, "one JSON line expected: {stdout}");
    lines.remove(0)
}

/// Runs and returns (exit code, stderr).
async fn fails(servers: &[&str], token: &str, args: &[&str]) -> (i32, String) {
    let out = run(servers, token, args).await;
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "orgpulse {args:?} should fail");
    assert_eq!(
        stderr.trim().lines().count(),
        1,
        "one readable line: {stderr}"
    );
    (out.status.code().unwrap(), stderr)
}

/// `orgpulse token mint --secret-file SECRET ARGS`: the token it prints.
async fn mint(secret: &str, args: &[&str]) -> String {
    let mut all = vec!["token", "mint", "--secret-file", secret];
    all.extend_from_slice(args);
    ok(&[], "", &all).await.trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_mint_makes_tokens_the_server_accepts() {
    let server = TestServer::start().await;
    let dir = TempDir::new("mint");
    let secret = dir.0.join("secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let secret = secret.to_str().unwrap();
    let s = [server.url.as_str()];
    let admin = mint(
        secret,
        &[
            "--org", ORG, "--user", "carol", "--role", "admin", "--ttl", "10m",
        ],
    )
    .await;
    let job = one(&ok(
        &s,
        &admin,
        &["jobs", "create", "--title", "minted", "--json"],
    )
    .await);
    assert_eq!(job["createdBy"], "carol");

    // The default role is member: it may not send notifications.
    let member = mint(secret, &["--org", ORG, "--user", "dave"]).await;
    let (code, _) = fails(&s, &member, &["notify", "send", "--title", "x"]).await;
    assert_eq!(code, 3);

    // A service token names no org, so every call must.
    let service = mint(secret, &["--user", "backend", "--role", "service"]).await;
    let listed = ok(&s, &service, &["jobs", "list", "--org", ORG, "--json"]).await;
    assert_eq!(json_lines(&listed).len(), 1);

    let (code, err) = fails(
        &s,
        "",
        &["token", "mint", "--secret-file", secret, "--user", "x"],
    )
    .await;
    assert_eq!(code, 2, "--org is required for non-service roles: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_mint_signs_with_a_private_key() {
    let dir = TempDir::new("mint-key");
    let path = |name: &str| dir.0.join(name).display().to_string();
    for (name, algo) in [
        (
            "rsa",
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"][..],
        ),
        (
            "ec",
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        ),
        ("ed", &["-algorithm", "ed25519"]),
    ] {
        let (private, public) = keypair(&dir.0, name, algo);
        let data = TempDir::new("mint-key-server");
        let server = server_with_keys(&data, &["--jwt-public-key".into(), public]).await;
        let s = [server.url.as_str()];
        let token = ok(
            &[],
            "",
            &[
                "token",
                "mint",
                "--private-key",
                &private,
                "--org",
                ORG,
                "--user",
                "carol",
                "--role",
                "admin",
            ],
        )
        .await;
        let job = one(&ok(
            &s,
            token.trim(),
            &["jobs", "create", "--title", name, "--json"],
        )
        .await);
        assert_eq!(job["createdBy"], "carol", "{name}");

        // The server checks the signature: the shared-secret token is refused.
        let secret = path("secret");
        std::fs::write(&secret, SECRET).unwrap();
        let hs256 = mint(&secret, &["--org", ORG, "--user", "carol"]).await;
        let (code, _) = fails(&s, &hs256, &["jobs", "list"]).await;
        assert_eq!(code, 3, "{name}: an HS256 token is refused");
    }

    let not_a_key = path("secret");
    let (code, err) = fails(
        &[],
        "",
        &[
            "token",
            "mint",
            "--private-key",
            &not_a_key,
            "--user",
            "x",
            "--role",
            "service",
        ],
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a PEM private key"), "{err}");
    let (code, err) = fails(
        &[],
        "",
        &["token", "mint", "--user", "x", "--role", "service"],
    )
    .await;
    assert_eq!(code, 2, "a key or a secret is required: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_commands_and_their_error_codes() {
    let server = TestServer::start().await;
    let s = [server.url.as_str()];
    let admin = token(ORG, "alice", "admin");
    let member = token(ORG, "bob", "member");

    let created = one(&ok(
        &s,
        &member,
        &[
            "jobs", "create", "--title", "build", "--label", "team=ci", "--json",
        ],
    )
    .await);
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["status"], "JOB_STATUS_QUEUED");
    assert_eq!(created["labels"]["team"], "ci");
    assert_eq!(created["version"], "1");

    // Same request id twice: one job.
    let again = [
        "jobs",
        "create",
        "--title",
        "once",
        "--request-id",
        "req-1",
        "--json",
    ];
    let a = one(&ok(&s, &member, &again).await);
    let b = one(&ok(&s, &member, &again).await);
    assert_eq!(a["id"], b["id"]);

    let got = one(&ok(&s, &member, &["jobs", "get", &id, "--json"]).await);
    assert_eq!(got["title"], "build");
    let human = ok(&s, &member, &["jobs", "get", &id]).await;
    assert!(human.contains(&id) && human.contains("QUEUED"), "{human}");

    let dir = TempDir::new("list");
    let cursor_file = dir.0.join("cursor");
    let listed = ok(
        &s,
        &member,
        &[
            "jobs",
            "list",
            "--json",
            "--cursor-file",
            cursor_file.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(json_lines(&listed).len(), 2);
    assert!(
        !std::fs::read_to_string(&cursor_file)
            .unwrap()
            .trim()
            .is_empty()
    );
    let running = one(&ok(
        &s,
        &member,
        &[
            "jobs",
            "update",
            &id,
            "--status",
            "running",
            "--progress",
            "40",
            "--json",
        ],
    )
    .await);
    assert_eq!(running["status"], "JOB_STATUS_RUNNING");
    assert_eq!(running["progress"], 40);
    assert_eq!(running["version"], "2");
    let queued_only = ok(
        &s,
        &member,
        &["jobs", "list", "--status", "queued", "--json"],
    )
    .await;
    assert_eq!(json_lines(&queued_only).len(), 1);
    // The snapshot cursor saved by `jobs list` resumes right after the snapshot.
    let mut w = Watcher::spawn(
        orgpulse(&s, &member),
        &["watch", "--cursor-file", cursor_file.to_str().unwrap()],
    );
    let next = w.until(|v| seq_of(v) > 0).await;
    assert_eq!(next["jobUpdated"]["version"], "2");
    w.kill().await;

    // conflict (5): illegal transition, version mismatch
    let (code, err) = fails(&s, &member, &["jobs", "update", &id, "--status", "queued"]).await;
    assert_eq!(code, 5, "{err}");
    let (code, err) = fails(
        &s,
        &member,
        &[
            "jobs",
            "update",
            &id,
            "--progress",
            "50",
            "--expected-version",
            "1",
        ],
    )
    .await;
    assert_eq!(code, 5, "{err}");
    // usage (2): bad flag value, nothing to change, invalid argument from the server
    let (code, _) = fails(
        &s,
        &member,
        &["jobs", "update", &id, "--status", "sideways"],
    )
    .await;
    assert_eq!(code, 2);
    let (code, _) = fails(&s, &member, &["jobs", "update", &id]).await;
    assert_eq!(code, 2);
    let (code, err) = fails(&s, &member, &["jobs", "create", "--title", ""]).await;
    assert_eq!(code, 2, "{err}");
    // not found (4)
    let (code, err) = fails(&s, &member, &["jobs", "get", "01JD0000000000000000000000"]).await;
    assert_eq!(code, 4, "{err}");
    // auth (3): members may not delete; no token; another org
    let (code, err) = fails(&s, &member, &["jobs", "delete", &id]).await;
    assert_eq!(code, 3, "{err}");
    let (code, err) = fails(&s, "", &["jobs", "list"]).await;
    assert_eq!(code, 3, "{err}");
    let (code, err) = fails(&s, &member, &["jobs", "list", "--org", "elsewhere"]).await;
    assert_eq!(code, 3, "{err}");

    // A dead first endpoint: even the writes that are never blindly retried fail over to the
    // second, since the first never got them.
    let dead = dead_endpoint();
    let both = [dead.as_str(), server.url.as_str()];
    let moved = one(&ok(
        &both,
        &member,
        &["jobs", "update", &id, "--progress", "41", "--json"],
    )
    .await);
    assert_eq!(moved["progress"], 41);
    ok(&both, &admin, &["jobs", "delete", &id]).await;
    let (code, _) = fails(&s, &member, &["jobs", "get", &id]).await;
    assert_eq!(code, 4);

    // unavailable (6)
    let (code, err) = fails(&[&dead], &member, &["jobs", "list", "--attempts", "2"]).await;
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("unavailable"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_commands() {
    let server = TestServer::start().await;
    let s = [server.url.as_str()];
    let admin = token(ORG, "alice", "admin");
    let bob = token(ORG, "bob", "member");

    let all = one(&ok(
        &s,
        &admin,
        &[
            "notify",
            "send",
            "--title",
            "deploy",
            "--severity",
            "success",
            "--json",
        ],
    )
    .await);
    assert_eq!(all["severity"], "SEVERITY_SUCCESS");
    let direct = one(&ok(
        &s,
        &admin,
        &[
            "notify", "send", "--user", "bob", "--title", "review", "--body", "PR 42", "--json",
        ],
    )
    .await);
    ok(
        &s,
        &admin,
        &[
            "notify",
            "send",
            "--user",
            "carol",
            "--title",
            "not for bob",
        ],
    )
    .await;

    let out = run(&s, &bob, &["notify", "list", "--unread", "--json"]).await;
    assert!(out.status.success());
    let listed = json_lines(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(listed.len(), 2, "bob sees the org-wide one and his own");
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 unread"));

    let read = one(&ok(
        &s,
        &bob,
        &["notify", "read", direct["id"].as_str().unwrap(), "--json"],
    )
    .await);
    assert_eq!(read["unreadCount"], 1);
    let human = ok(&s, &bob, &["notify", "read", all["id"].as_str().unwrap()]).await;
    assert_eq!(human.trim(), "0 unread");
    let unread = ok(&s, &bob, &["notify", "list", "--unread", "--json"]).await;
    assert!(unread.trim().is_empty());

    let (code, _) = fails(&s, &bob, &["notify", "send", "--title", "x"]).await;
    assert_eq!(code, 3, "members may not send");
    let (code, _) = fails(&s, &bob, &["notify", "read"]).await;
    assert_eq!(code, 2, "ids are required");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_and_poll() {
    let server = TestServer::start().await;
    let s = [server.url.as_str()];
    let admin = token(ORG, "alice", "admin");
    let dir = TempDir::new("poll");
    let cursor_file = dir.0.join("cursor");
    let cf = cursor_file.to_str().unwrap();

    // One-shot poll without a cursor: nothing yet, but a cursor to continue from.
    let first = run(&s, &admin, &["poll", "--json", "--cursor-file", cf]).await;
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(first.stdout.is_empty());
    assert!(cursor_file.exists());

    for i in 0..3 {
        ok(&s, &admin, &["jobs", "create", "--title", &format!("p{i}")]).await;
    }
    let polled = json_lines(&ok(&s, &admin, &["poll", "--json", "--cursor-file", cf]).await);
    let seqs: Vec<u64> = polled.iter().map(seq_of).collect();
    assert_eq!(seqs, [1, 2, 3]);
    let empty = ok(&s, &admin, &["poll", "--json", "--cursor-file", cf]).await;
    assert!(
        empty.is_empty(),
        "the cursor file moved past the 3 events: {empty}"
    );

    // --follow long-polls: each new event arrives without restarting it.
    let mut follow = Watcher::spawn(
        orgpulse(&s, &admin),
        &["poll", "--follow", "--wait", "5s", "--cursor-file", cf],
    );
    ok(&s, &admin, &["jobs", "create", "--title", "followed"]).await;
    let ev = follow.next().await;
    assert_eq!(seq_of(&ev), 4);
    assert_eq!(ev["jobCreated"]["title"], "followed");

    // A user with an open watch is online.
    let mut w = Watcher::spawn(orgpulse(&s, &token(ORG, "watcher", "viewer")), &["watch"]);
    w.until(|v| kind_of(v) == "caughtUp").await;
    let members = json_lines(&ok(&s, &admin, &["online", "--json"]).await);
    let watcher = members
        .iter()
        .find(|m| m["userId"] == "watcher")
        .expect("watcher online");
    assert_eq!(watcher["connections"], 1);
    let human = ok(&s, &admin, &["online"]).await;
    assert!(human.contains("watcher"), "{human}");
    w.kill().await;
    follow.kill().await;

    // poll --follow rides out a server restart
    let mut server = server;
    let mut follow = Watcher::spawn(
        orgpulse(&[&server.url], &admin),
        &["poll", "--follow", "--wait", "2s", "--cursor-file", cf],
    );
    server.kill().await;
    server.restart().await;
    tokio::time::timeout(Duration::from_secs(30), async {
        let admin_client = patient_client(&[&server.url], &admin);
        admin_client
            .create_job(orgpulse::proto::CreateJobRequest {
                title: "after restart".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    })
    .await
    .unwrap();
    let ev = follow.next().await;
    assert_eq!(ev["jobCreated"]["title"], "after restart");
    follow.kill().await;
}

#[tokio::test]
async fn every_command_has_help_with_examples() {
    let commands: &[&[&str]] = &[
        &[],
        &["watch"],
        &["poll"],
        &["online"],
        &["jobs", "create"],
        &["jobs", "get"],
        &["jobs", "list"],
        &["jobs", "update"],
        &["jobs", "delete"],
        &["notify", "send"],
        &["notify", "list"],
        &["notify", "read"],
        &["token", "mint"],
        &["presence", "set"],
        &["presence", "clear"],
        &["presence", "list"],
        &["broadcast"],
    ];
    for cmd in commands {
        let mut args = cmd.to_vec();
        args.push("--help");
        let help = ok(&[], "", &args).await;
        assert!(
            help.contains("Example"),
            "orgpulse {cmd:?} --help has examples"
        );
        assert!(
            help.contains("Exit codes"),
            "orgpulse {cmd:?} --help lists exit codes"
        );
    }
    let out = run(&[], "", &["watch", "--cursor", "a", "--cursor-file", "b"]).await;
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
}

/// `ORGPULSE_SERVER` (comma-separated, with failover), `ORGPULSE_TOKEN`, `ORGPULSE_TOKEN_FILE` and
/// `--token-command` reach the server.
#[tokio::test]
async fn environment_and_token_sources() {
    let server = TestServer::start().await;
    let dead = dead_endpoint();
    let servers = format!("{dead},{}", server.url);
    let dir = TempDir::new("env");
    let file = dir.0.join("token");
    write_token(&file, &token(ORG, "erin", "member"));
    let with = |cmd: &mut tokio::process::Command| {
        cmd.env("ORGPULSE_SERVER", &servers)
            .args(["jobs", "list", "--json"])
            .stderr(Stdio::piped());
    };

    let mut cmd = orgpulse(&[], "");
    cmd.env("ORGPULSE_TOKEN", token(ORG, "erin", "member"));
    with(&mut cmd);
    assert!(
        cmd.output().await.unwrap().status.success(),
        "ORGPULSE_SERVER + ORGPULSE_TOKEN"
    );

    let mut cmd = orgpulse(&[], "");
    cmd.env("ORGPULSE_TOKEN_FILE", &file);
    with(&mut cmd);
    assert!(
        cmd.output().await.unwrap().status.success(),
        "ORGPULSE_TOKEN_FILE"
    );

    let mut cmd = orgpulse(&[], "");
    cmd.arg("--token-command")
        .arg(format!("cat {}", file.display()));
    with(&mut cmd);
    assert!(
        cmd.output().await.unwrap().status.success(),
        "--token-command"
    );

    // A flag beats the environment.
    let mut cmd = orgpulse(&[], &token(ORG, "erin", "member"));
    cmd.env("ORGPULSE_TOKEN_FILE", dir.0.join("missing"));
    with(&mut cmd);
    assert!(
        cmd.output().await.unwrap().status.success(),
        "--token over ORGPULSE_TOKEN_FILE"
    );

    let mut cmd = orgpulse(&[], "");
    cmd.arg("--token-file").arg(dir.0.join("missing"));
    with(&mut cmd);
    let out = cmd.output().await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--kinds` narrows a watch: only notifications here, though a job changes first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_kinds_filter() {
    let server = TestServer::start().await;
    let s = [server.url.as_str()];
    let admin = token(ORG, "alice", "admin");
    let mut w = Watcher::spawn(orgpulse(&s, &admin), &["watch", "--kinds", "notification"]);
    w.until(|v| kind_of(v) == "caughtUp").await;
    ok(&s, &admin, &["jobs", "create", "--title", "unseen"]).await;
    ok(&s, &admin, &["notify", "send", "--title", "seen"]).await;
    let first = w.until(|v| seq_of(v) > 0).await;
    assert_eq!(kind_of(&first), "notificationNew");
    assert_eq!(seq_of(&first), 2, "seq 1 (the job) was filtered out");
    w.kill().await;
}

/// A malformed cursor is the caller's mistake: exit 2 at once, for `watch` as for `poll`.
#[tokio::test]
async fn malformed_cursor_is_a_usage_error() {
    let server = TestServer::start().await;
    let s = [server.url.as_str()];
    let viewer = token(ORG, "vic", "viewer");
    for cmd in ["watch", "poll"] {
        let (code, err) = fails(&s, &viewer, &[cmd, "--cursor", "not-a-cursor"]).await;
        assert_eq!(code, 2, "{cmd}: {err}");
        assert!(err.contains("invalid argument"), "{cmd}: {err}");
    }
}

/// Two token flags at once are a usage error.
#[tokio::test]
async fn token_flags_exclude_each_other() {
    let out = run(&[], "abc", &["jobs", "list", "--token-file", "f"]).await;
    assert_eq!(out.status.code(), Some(2));
}

fn publish<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["publish"];
    all.extend_from_slice(args);
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_prints_its_seq_and_watch_and_poll_show_entity_events() {
    let server = TestServer::start().await;
    let s = [server.url.as_str()];
    let admin = token(ORG, "alice", "admin");
    let viewer = token(ORG, "alice", "viewer");
    let mut invoices = Watcher::spawn(orgpulse(&s, &viewer), &["watch", "--types", "invoice"]);
    invoices.until(|v| kind_of(v) == "caughtUp").await;
    let first = one(&ok(
        &s,
        &admin,
        &publish(&[
            "--type",
            "invoice",
            "--id",
            "inv_1",
            "--action",
            "paid",
            "--data",
            r#"{"amount":12}"#,
            "--json",
        ]),
    )
    .await);
    assert_eq!(first["seq"], "1", "{first}");
    let cursor = first["cursor"].as_str().unwrap().to_string();
    let human = ok(
        &s,
        &admin,
        &publish(&["--type", "project", "--id", "p/1", "--action", "created"]),
    )
    .await;
    assert!(human.starts_with("#2 cursor "), "{human}");
    // Addressed to bob, with a request id: the retry returns the same seq.
    let for_bob = publish(&[
        "--type",
        "invoice",
        "--id",
        "inv_2",
        "--action",
        "sent",
        "--user",
        "bob",
        "--request-id",
        "send-inv_2",
        "--json",
    ]);
    let sent = one(&ok(&s, &admin, &for_bob).await);
    assert_eq!(
        one(&ok(&s, &admin, &for_bob).await),
        sent,
        "a retry appends nothing"
    );
    assert_eq!(sent["seq"], "3");

    // Exit codes: invalid (2, from the server or from --data), not allowed (3).
    let bad_type = publish(&["--type", "Invoice", "--id", "i", "--action", "paid"]);
    let (code, err) = fails(&s, &admin, &bad_type).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("entity_type"), "{err}");
    let bad_data = publish(&[
        "--type", "invoice", "--id", "i", "--action", "paid", "--data", "[1]",
    ]);
    let (code, err) = fails(&s, &admin, &bad_data).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--data must be a JSON object"), "{err}");
    let (code, _) = fails(
        &s,
        &viewer,
        &publish(&["--type", "invoice", "--id", "i", "--action", "paid"]),
    )
    .await;
    assert_eq!(code, 3);

    // The invoice watch saw inv_1 only (the project is filtered out, inv_2 is bob's); a last
    // invoice for everyone marks the end.
    let end = one(&ok(
        &s,
        &admin,
        &publish(&[
            "--type", "invoice", "--id", "inv_3", "--action", "void", "--json",
        ]),
    )
    .await);
    invoices.until_seq(seq_of(&end)).await;
    let seen: Vec<u64> = invoices.durable().iter().map(seq_of).collect();
    assert_eq!(seen, [1, 4]);
    let inv_1 = &invoices.durable()[0]["entityChanged"];
    assert_eq!(inv_1["entityType"], "invoice");
    assert_eq!(inv_1["entityId"], "inv_1");
    assert_eq!(inv_1["data"]["amount"], 12.0);
    invoices.kill().await;

    // Human-readable: type, id, action, compact data, the addressee, the actor.
    let bob = token(ORG, "bob", "viewer");
    let from = cursor_at(&cursor, 0);
    let lines = ok(
        &s,
        &bob,
        &[
            "poll", "--cursor", &from, "--kinds", "entity", "--types", "invoice",
        ],
    )
    .await;
    let lines: Vec<&str> = lines.lines().collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(
        lines[0].ends_with(r#"invoice inv_1 paid {"amount":12} by alice"#),
        "{lines:?}"
    );
    assert!(
        lines[1].ends_with("invoice inv_2 sent for bob by alice"),
        "{lines:?}"
    );
    assert!(lines[2].contains("invoice inv_3 void"), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_and_an_empty_poll_say_what_to_do() {
    let server = TestServer::start().await;
    let s = [server.url.as_str()];
    let admin = token(ORG, "alice", "admin");

    // A server address without a scheme is a usage error that says what to add, from the flag
    // and from the environment alike.
    let bare = server.url.trim_start_matches("http://");
    let (code, err) = fails(&[bare], &admin, &["jobs", "list"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&format!("--server http://{bare}")), "{err}");
    let out = orgpulse(&[], &admin)
        .env("ORGPULSE_SERVER", bare)
        .args(["jobs", "list"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("add http://"));

    // Unreachable: which URL.
    let dead = dead_endpoint();
    let (code, err) = fails(&[&dead], &admin, &["jobs", "list", "--attempts", "1"]).await;
    assert_eq!(code, 6, "{err}");
    assert!(err.contains(&dead), "the URL that failed: {err}");

    // No token at all: how to pass one.
    let (code, err) = fails(&s, "", &["jobs", "list"]).await;
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("--token") && err.contains("ORGPULSE_TOKEN"),
        "{err}"
    );
    // A token that is given but refused gets no such hint.
    let (code, err) = fails(
        &s,
        &token("elsewhere", "eve", "member"),
        &["jobs", "list", "--org", ORG],
    )
    .await;
    assert_eq!(code, 3, "{err}");
    assert!(!err.contains("no token was given"), "{err}");

    // `poll` without a cursor finds nothing before "now": it says so and how to see events.
    ok(
        &s,
        &admin,
        &["jobs", "create", "--title", "before the poll"],
    )
    .await;
    let out = run(&s, &admin, &["poll"]).await;
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
    let note = String::from_utf8_lossy(&out.stderr);
    assert!(
        note.contains("no events") && note.contains("--cursor ") && note.contains("--follow"),
        "{note}"
    );
    let cursor = note
        .split("poll again with --cursor ")
        .nth(1)
        .and_then(|rest| rest.split([',', ' ']).next())
        .expect("the cursor to pass");
    ok(&s, &admin, &["jobs", "create", "--title", "after the poll"]).await;
    let next = json_lines(&ok(&s, &admin, &["poll", "--json", "--cursor", cursor]).await);
    assert_eq!(next.len(), 1, "{next:?}");
    assert_eq!(next[0]["jobCreated"]["title"], "after the poll");
}

/// `orgpulse-server --dev` prints the lines that set up the CLI, and they work as printed; its
/// logs, written to a pipe, carry no colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_banner_sets_up_the_cli() {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
    let dir = TempDir::new("devcli");
    let mut server = tokio::process::Command::new(support::workspace_bin("orgpulse-server"))
        .args(["--dev", "--listen", "127.0.0.1:0", "--database"])
        .arg(format!("sqlite://{}/o.db", dir.0.display()))
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(server.stdout.take().unwrap()).lines();
    let mut banner = String::new();
    tokio::time::timeout(PATIENCE, async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            banner += &line;
            banner.push('\n');
            if line.starts_with("listening on ") {
                return;
            }
        }
        panic!("server exited early: {banner}");
    })
    .await
    .expect("the server started");
    assert!(
        banner.contains("cargo run -p orgpulse-cli -- watch"),
        "{banner}"
    );
    let exports: Vec<(&str, &str)> = banner
        .lines()
        .filter_map(|l| l.trim().strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .collect();
    let names: Vec<&str> = exports.iter().map(|(name, _)| *name).collect();
    assert_eq!(names, ["ORGPULSE_SERVER", "ORGPULSE_TOKEN"], "{banner}");

    let out = orgpulse(&[], "")
        .envs(exports)
        .args(["jobs", "create", "--title", "from the banner", "--json"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        one(&String::from_utf8_lossy(&out.stdout))["createdBy"],
        "alice"
    );

    server.start_kill().unwrap();
    let mut logs = String::new();
    server
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .await
        .unwrap();
    assert!(logs.contains("INFO"), "{logs}");
    assert!(
        !logs.contains('\x1b'),
        "colour codes in a piped log: {logs}"
    );
}

/// `(user, state)` of a watch's `presence_state` event; state `None` = left.
fn presence_of(v: &Value) -> (String, Option<Value>) {
    let p = &v["presenceState"];
    let state = Some(p["state"].clone()).filter(|s| s.as_object().is_some_and(|o| !o.is_empty()));
    (p["userId"].as_str().unwrap().to_string(), state)
}

/// Sends SIGINT to a running `orgpulse`.
fn interrupt(w: &Watcher) {
    let pid = w.child.id().expect("still running").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// `presence set` / `list` / `clear`, a TTL expiry and a `--hold` that outlives several TTLs and
/// clears its entry on Ctrl-C: a watch on the topic sees each change exactly once, in order, and
/// the refreshes of the held entry not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_set_list_clear_hold_and_expiry() {
    let server = TestServer::start().await;
    let s = [server.url.as_str()];
    let alice = token(ORG, "alice", "member");
    let bob = token(ORG, "bob", "viewer");
    let carol = token(ORG, "carol", "viewer");
    let mut w = Watcher::spawn(
        orgpulse(&s, &token(ORG, "vic", "viewer")),
        &["watch", "--kinds", "presence", "--topics", "job:1"],
    );
    w.until(|v| kind_of(v) == "caughtUp").await;
    let mut next_presence = async || presence_of(&w.until(|v| kind_of(v) == "presenceState").await);

    let set = ["presence", "set", "--topic", "job:1"];
    let viewing = [&set[..], &["--state", r#"{"viewing":true}"#]].concat();
    assert_eq!(ok(&s, &alice, &viewing).await, "", "nothing on stdout");
    let (user, state) = next_presence().await;
    assert_eq!(
        (user.as_str(), state),
        ("alice", Some(serde_json::json!({"viewing": true})))
    );
    // Set again, unchanged: announced to nobody (the next event is the clear).
    ok(&s, &alice, &viewing).await;

    let listed = json_lines(&ok(&s, &bob, &["presence", "list", "--json"]).await);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["userId"], "alice");
    assert_eq!(listed[0]["topic"], "job:1");
    assert_eq!(listed[0]["state"]["viewing"], true);
    assert!(listed[0]["updatedAt"].is_string());
    let human = ok(&s, &bob, &["presence", "list", "--topic", "job:1"]).await;
    assert!(
        human.starts_with(r#"alice on job:1 {"viewing":true} (updated "#),
        "{human}"
    );
    let other = ok(
        &s,
        &bob,
        &["presence", "list", "--topic", "job:2", "--json"],
    )
    .await;
    assert_eq!(other, "", "no entry on job:2");

    ok(&s, &alice, &["presence", "clear", "--topic", "job:1"]).await;
    assert_eq!(next_presence().await, ("alice".into(), None));
    assert_eq!(ok(&s, &bob, &["presence", "list"]).await, "");

    // bob holds his entry with a 1 s TTL; carol's one-shot entry, set after it with a 2 s TTL,
    // expires: without two refreshes since, bob's would have expired first.
    let mut hold = Watcher::spawn(
        orgpulse(&s, &bob),
        &[
            &set[..],
            &["--state", r#"{"typing":true}"#, "--ttl", "1s", "--hold"],
        ]
        .concat(),
    );
    hold.state("presence held on job:1").await;
    assert_eq!(next_presence().await.0, "bob");
    let carol_set = [&set[..], &["--state", r#"{"viewing":true}"#, "--ttl", "2s"]].concat();
    ok(&s, &carol, &carol_set).await;
    assert_eq!(next_presence().await.0, "carol");
    assert_eq!(next_presence().await, ("carol".into(), None), "expired");
    let listed = json_lines(&ok(&s, &alice, &["presence", "list", "--json"]).await);
    let users: Vec<&str> = listed
        .iter()
        .map(|e| e["userId"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["bob"], "the held entry outlived its TTL");

    interrupt(&hold);
    hold.state("presence cleared on job:1").await;
    let status = tokio::time::timeout(PATIENCE, hold.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "Ctrl-C ends a hold cleanly: {status}");
    assert_eq!(next_presence().await, ("bob".into(), None));
    assert_eq!(ok(&s, &alice, &["presence", "list"]).await, "");

    let seen: Vec<(String, bool)> = w
        .seen
        .iter()
        .filter(|v| kind_of(v) == "presenceState")
        .map(presence_of)
        .map(|(user, state)| (user, state.is_some()))
        .collect();
    let expected = [
        ("alice", true),
        ("alice", false),
        ("bob", true),
        ("carol", true),
        ("carol", false),
        ("bob", false),
    ];
    assert_eq!(seen, expected.map(|(u, set)| (u.to_string(), set)));
    w.kill().await;
}

/// `broadcast` reaches the watches open now whose topics and audience allow it, in order, and
/// nothing else; `watch --kinds broadcast` asks for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_reaches_the_watches_its_topic_and_audience_allow() {
    let server = TestServer::start().await;
    let s = [server.url.as_str()];
    let alice = token(ORG, "alice", "viewer");
    let watch = |user: &str, topics: &[&str]| {
        let mut args = vec!["watch", "--kinds", "broadcast"];
        args.extend_from_slice(topics);
        Watcher::spawn(orgpulse(&s, &token(ORG, user, "viewer")), &args)
    };
    let mut on_job1 = watch("vic", &["--topics", "job:1"]);
    let mut on_job2 = watch("pat", &["--topics", "job:2"]);
    let mut everywhere = watch("eve", &[]);
    for w in [&mut on_job1, &mut on_job2, &mut everywhere] {
        w.until(|v| kind_of(v) == "caughtUp").await;
    }
    let send = async |topic: &str, n: u32, audience: &[&str]| {
        let data = format!(r#"{{"n":{n}}}"#);
        let mut args = vec!["broadcast", "--topic", topic, "--data", &data];
        args.extend_from_slice(audience);
        assert_eq!(ok(&s, &alice, &args).await, "", "nothing on stdout");
    };
    send("job:1", 1, &[]).await;
    send("job:1", 2, &["--audience-users", "eve"]).await;
    send("job:1", 3, &[]).await;
    send("job:2", 4, &[]).await;

    let ns = async |w: &mut Watcher, last: u32| {
        let mut got = vec![];
        while got.last() != Some(&last) {
            let v = w.until(|v| kind_of(v) == "broadcast").await;
            assert_eq!(v["broadcast"]["userId"], "alice", "{v}");
            assert_eq!(v["seq"], Value::Null, "ephemeral: no seq: {v}");
            got.push(v["broadcast"]["data"]["n"].as_f64().unwrap() as u32);
        }
        got
    };
    // In order per sender: a broadcast missing before the last one expected was not delivered.
    assert_eq!(
        ns(&mut on_job1, 3).await,
        [1, 3],
        "topic job:1, not in eve's audience"
    );
    assert_eq!(ns(&mut on_job2, 4).await, [4], "topic job:2 only");
    assert_eq!(
        ns(&mut everywhere, 4).await,
        [1, 2, 3, 4],
        "every topic, in the audience"
    );
    let topics = &everywhere.seen.last().unwrap()["topics"];
    assert_eq!(topics, &serde_json::json!(["job:2"]));

    // A watch opened afterwards gets none of them: broadcasts are never replayed.
    let mut late = watch("vic", &["--topics", "job:1"]);
    late.until(|v| kind_of(v) == "caughtUp").await;
    send("job:1", 5, &[]).await;
    assert_eq!(ns(&mut late, 5).await, [5]);
    for mut w in [on_job1, on_job2, everywhere, late] {
        w.kill().await;
    }
}

/// Bad flags and requests the server finds invalid exit 2, before or after reaching it.
#[tokio::test]
async fn presence_and_broadcast_usage_errors() {
    let server = TestServer::start().await;
    let s = [server.url.as_str()];
    let vic = token(ORG, "vic", "viewer");
    let set = |extra: &[&'static str]| {
        let mut args = vec!["presence", "set", "--topic", "job:1"];
        args.extend_from_slice(extra);
        args
    };
    let cases: Vec<Vec<&str>> = vec![
        vec!["presence", "set", "--state", "{\"a\":1}"],
        set(&["--state", "[1]"]),
        set(&["--state", "{}"]),
        set(&["--state", "{\"a\":1}", "--ttl", "0s"]),
        set(&["--state", "{\"a\":1}", "--ttl", "soon"]),
        set(&["--state", "{\"a\":1}", "--ttl", "121s"]),
        vec![
            "presence",
            "set",
            "--topic",
            "no spaces",
            "--state",
            "{\"a\":1}",
        ],
        vec!["presence", "list", "--topic", "no spaces"],
        vec!["presence", "clear"],
        vec!["presence", "wave"],
        vec!["broadcast", "--topic", "job:1"],
        vec!["broadcast", "--topic", "job:1", "--data", "typing"],
        vec!["watch", "--kinds", "cursor"],
    ];
    for args in cases {
        let (code, err) = fails(&s, &vic, &args).await;
        assert_eq!(code, 2, "{args:?}: {err}");
    }
    let big = format!(r#"{{"x":"{}"}}"#, "y".repeat(5000));
    let (code, err) = fails(&s, &vic, &["broadcast", "--topic", "job:1", "--data", &big]).await;
    assert_eq!(code, 2, "over 4 KiB: {err}");
}
