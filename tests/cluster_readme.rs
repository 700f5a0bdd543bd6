//! README.md's "Running a cluster", run as written: the shell blocks marked
//! `<!-- readme-test: cluster -->` run in order in one bash from a clean directory, with only the
//! variables the README itself offers set (ports, database, and PATH to this build's binaries).
//! Needs PostgreSQL, NATS and haproxy: under `CI=true` a missing one fails, elsewhere it skips.
//! The job the README creates through node a must reach the watch on node b, the watch must hold
//! the org's log exactly once, in seq order, and HAProxy (from the README's config) must list it.
mod cli_support;
mod cluster_support;
mod support;

use std::process::Stdio;

use cli_support::{PATIENCE, kind_of, ok, seq_of};
use cluster_support::{free_port, services_or_skip};
use serde_json::Value;
use support::readme::{Group, marked_blocks};
use support::{TempDir, log_of, record_database, workspace_bin};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command,
    sync::mpsc,
};

const MARK: &str = "<!-- readme-test: cluster -->";

/// Whether `haproxy` is installed; without it, under `CI=true` a panic, else false after saying
/// why the test is skipped.
fn haproxy_or_skip() -> bool {
    let installed = std::process::Command::new("haproxy")
        .arg("-v")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed && std::env::var("CI").as_deref() == Ok("true") {
        panic!("the README's cluster needs haproxy (apt-get install -y haproxy)");
    }
    if !installed {
        eprintln!("skipped: haproxy is not installed (apt-get install -y haproxy)");
    }
    installed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_a_cluster_as_written() {
    if !services_or_skip(false) {
        return;
    }
    if !haproxy_or_skip() {
        return;
    }
    let blocks = marked_blocks(
        std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")),
        MARK,
    );
    assert!(
        blocks.len() >= 5,
        "README.md marks {} blocks with {MARK}",
        blocks.len()
    );
    let dir = TempDir::new("readme-cluster");
    let db = format!("orgpulse_readme_{:016x}", rand::random::<u64>());
    record_database(&dir.0, &format!("postgres://postgres@127.0.0.1:5432/{db}"));
    let (port_a, port_b, lb_port) = (free_port(), free_port(), free_port());
    let bin_dir = workspace_bin("orgpulse-server")
        .parent()
        .unwrap()
        .to_owned();
    assert!(
        bin_dir.join("orgpulse").exists(),
        "the CLI is built next to the server"
    );
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap());

    let mut cmd = Command::new("bash");
    cmd.arg("-euc")
        .arg(blocks.join("\n"))
        .current_dir(&dir.0)
        .env("PATH", path)
        .env("PORT_A", port_a.to_string())
        .env("PORT_B", port_b.to_string())
        .env("LB_PORT", lb_port.to_string())
        .env("DB", &db)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for (var, _) in std::env::vars().filter(|(v, _)| v.starts_with("ORGPULSE_")) {
        cmd.env_remove(var);
    }
    let mut script = cmd.spawn().expect("bash");
    let _group = Group(script.id().unwrap());

    // Every JSON line on stdout is the watch's; the rest is the commands' own output.
    let (tx, mut lines) = mpsc::unbounded_channel::<String>();
    let mut out = BufReader::new(script.stdout.take().unwrap()).lines();
    tokio::spawn(async move {
        while let Ok(Some(line)) = out.next_line().await {
            println!("[readme] {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let status = tokio::time::timeout(PATIENCE, script.wait())
        .await
        .expect("the README's blocks finished in time")
        .unwrap();
    let cluster_dir = dir.0.join("target/cluster");
    assert!(
        status.success(),
        "the README's blocks failed ({status}); node logs: {}\n{}",
        std::fs::read_to_string(cluster_dir.join("a.log")).unwrap_or_default(),
        std::fs::read_to_string(cluster_dir.join("b.log")).unwrap_or_default()
    );

    let (mut seen, mut text) = (vec![], vec![]);
    let mut until = async |done: &dyn Fn(&Value) -> bool| loop {
        let line = tokio::time::timeout(PATIENCE, lines.recv())
            .await
            .expect("an event on the watch in time")
            .expect("the watch is running");
        match serde_json::from_str::<Value>(&line) {
            Ok(v) if done(&v) => break seen.push(v),
            Ok(v) => seen.push(v),
            Err(_) => text.push(line),
        }
    };
    let created = |title: &'static str| {
        move |v: &Value| kind_of(v) == "jobCreated" && v["jobCreated"]["title"] == title
    };
    until(&created("hello from a")).await;

    // A second job through node a closes the window: everything before it has arrived.
    let token = std::fs::read_to_string(cluster_dir.join("alice.token")).unwrap();
    let a = format!("http://127.0.0.1:{port_a}");
    ok(&[&a], token.trim(), &["jobs", "create", "--title", "last"]).await;
    until(&created("last")).await;

    let through_lb = text
        .iter()
        .filter(|l| l.contains("\"hello from a\""))
        .count();
    assert_eq!(
        through_lb, 2,
        "jobs create on a and jobs list through HAProxy print the job: {text:?}"
    );

    let watched: Vec<u64> = seen.iter().map(seq_of).filter(|s| *s > 0).collect();
    let stored: Vec<u64> = log_of(&dir.0, "acme").iter().map(|e| e.0).collect();
    assert_eq!(
        watched, stored,
        "the watch on node b (left) holds the log (right) exactly once, in order"
    );
}
