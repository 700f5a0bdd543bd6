//! examples/express-react/README.md run as written: its blocks marked
//! `<!-- readme-test: example -->` (the setup, run to its end; then orgpulse-server and the
//! product, each left running as in a terminal of its own) in a copy of the example's tracked files
//! (so no secret.txt or build of an earlier run helps), with only the variables the README offers
//! set: the ports and a PostgreSQL database of the test's own.
//!
//! The README's `cargo run --release -p orgpulse-server -- ARGS` runs this build's orgpulse-server
//! with ARGS, through a `cargo` on PATH that accepts exactly that command (a release build takes
//! minutes; the README's own first command is the same `cargo run --release`).
//!
//! The board's API must answer, and tasks created through it (the product's transaction with its
//! outbox row) must reach an orgpulse subscriber of the org exactly once, in the order of the org's
//! log. Needs PostgreSQL, node and `npm ci` at the root: under `CI=true` a missing one fails, else
//! the test skips.
mod cluster_support;
mod support;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use cluster_support::free_port;
use orgpulse::proto::{EventKind, event::Payload};
use serde_json::{Value, json};
use support::readme::{Group, marked_blocks};
use support::{Sub, TempDir, assert_exactly_once, log_of, pg::Db, skip_on_postgres, workspace_bin};
use tokio::process::{Child, Command};
use tonic::transport::Endpoint;

const MARK: &str = "<!-- readme-test: example -->";
const ENTITY: i32 = EventKind::Entity as i32;
/// Bound for the server and the product to start (the product bundles its client first).
const START: Duration = Duration::from_secs(60);

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Whether PostgreSQL, node and the root's node_modules are there; without one, under `CI=true` a
/// panic, else false after saying why the test is skipped.
fn prerequisites_or_skip() -> bool {
    let node = std::process::Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let missing = if std::net::TcpStream::connect("127.0.0.1:5432").is_err() {
        "PostgreSQL is not accepting connections at 127.0.0.1:5432"
    } else if !node {
        "node is not installed"
    } else if !repo().join("node_modules/express").exists() {
        "node_modules is missing (npm ci at the repository root)"
    } else {
        return true;
    };
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "the example README test: {missing}"
    );
    eprintln!("skipped: {missing}");
    false
}

/// A clean checkout of the example: its tracked files under `root`, with the node_modules the
/// README's `npm ci` at the root installed (linked, so packages resolve as in the repository).
fn copy_example(root: &Path) -> PathBuf {
    let out = std::process::Command::new("git")
        .args(["ls-files", "-z", "examples/express-react"])
        .current_dir(repo())
        .output()
        .expect("git ls-files");
    assert!(out.status.success(), "git ls-files failed");
    for file in out.stdout.split(|b| *b == 0).filter(|f| !f.is_empty()) {
        let file = std::str::from_utf8(file).unwrap();
        let to = root.join(file);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(repo().join(file), &to).unwrap_or_else(|e| panic!("copying {file}: {e}"));
    }
    // What `npm ci` at the root installed, for the workspace and for the example.
    for modules in ["node_modules", "examples/express-react/node_modules"] {
        if repo().join(modules).exists() {
            std::os::unix::fs::symlink(repo().join(modules), root.join(modules)).unwrap();
        }
    }
    root.join("examples/express-react")
}

/// `cargo` for the README's `cargo run --release -p orgpulse-server -- ARGS`: this build's server.
fn cargo_shim(bin: &Path) {
    let script = format!(
        "#!/bin/sh\n\
         # tests/example_readme.rs: the README's command, as this build's orgpulse-server.\n\
         [ \"$1 $2 $3 $4 $5\" = \"run --release -p orgpulse-server --\" ] || {{ echo \"cargo $*: not the README's command\" >&2; exit 2; }}\n\
         shift 5\n\
         exec {} \"$@\"\n",
        workspace_bin("orgpulse-server").display()
    );
    std::fs::create_dir_all(bin).unwrap();
    std::fs::write(bin.join("cargo"), script).unwrap();
    let chmod = std::process::Command::new("chmod")
        .arg("+x")
        .arg(bin.join("cargo"))
        .status()
        .unwrap();
    assert!(chmod.success());
}

/// `bash -euc block` in `dir` with `env`, in a process group of its own, output to `log`.
fn bash(block: &str, dir: &Path, env: &[(&str, String)], log: &Path) -> Child {
    let mut cmd = Command::new("bash");
    cmd.arg("-euc")
        .arg(block)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(log).unwrap())
        .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
        .process_group(0)
        .kill_on_drop(true);
    for (var, _) in std::env::vars().filter(|(v, _)| v.starts_with("ORGPULSE_")) {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)))
        .spawn()
        .expect("bash")
}

/// What a started block wrote so far (for failure messages).
fn output(log: &Path) -> String {
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    format!("{}{}", read(log), read(&log.with_extension("err")))
}

/// The JSON body of `r`.
async fn json_of(r: reqwest::Response) -> Value {
    serde_json::from_str(&r.text().await.unwrap()).expect("a JSON answer")
}

/// POSTs `body` as JSON to `url`, with `token` when given; the answer's JSON (a 2xx answer).
async fn post(url: &str, token: Option<&str>, body: Value) -> Value {
    let mut req = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    json_of(req.send().await.unwrap().error_for_status().unwrap()).await
}

/// Waits until `url` answers 200 (bounded by START), failing early when `child` ends.
async fn answers(url: &str, child: &mut Child, log: &Path) -> reqwest::Response {
    let deadline = Instant::now() + START;
    loop {
        if let Ok(r) = reqwest::get(url).await
            && r.status().is_success()
        {
            return r;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "the block ended ({status}) before {url} answered:\n{}",
                output(log)
            );
        }
        assert!(
            Instant::now() < deadline,
            "{url} did not answer within {START:?}:\n{}",
            output(log)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_readme_as_written() {
    if skip_on_postgres("the README's orgpulse-server keeps its events in its own SQLite file") {
        return;
    }
    if !prerequisites_or_skip() {
        return;
    }
    let blocks = marked_blocks(&repo().join("examples/express-react/README.md"), MARK);
    assert_eq!(blocks.len(), 3, "the setup, orgpulse-server, the product");

    let tmp = TempDir::new("example-readme");
    let dir = copy_example(&tmp.0.join("repo"));
    cargo_shim(&tmp.0.join("bin"));
    let db = Db::create().await;
    let (orgpulse_port, port) = (free_port(), free_port());
    let orgpulse = format!("http://127.0.0.1:{orgpulse_port}");
    let env = [
        (
            "PATH",
            format!(
                "{}:{}",
                tmp.0.join("bin").display(),
                std::env::var("PATH").unwrap()
            ),
        ),
        ("PORT", port.to_string()),
        ("DATABASE_URL", db.url()),
        ("ORGPULSE_LISTEN", format!("127.0.0.1:{orgpulse_port}")),
        ("ORGPULSE_URL", orgpulse.clone()),
        ("ORGPULSE_PUBLIC_URL", orgpulse.clone()),
    ];

    // Once: the setup, to its end; it makes the secret both others read.
    let setup_log = tmp.0.join("setup.log");
    let setup = bash(&blocks[0], &dir, &env, &setup_log)
        .wait()
        .await
        .unwrap();
    assert!(setup.success(), "npm run setup: {}", output(&setup_log));
    assert!(dir.join("secret.txt").exists(), "the setup made secret.txt");

    // Two terminals: orgpulse-server, then the product.
    let server_log = tmp.0.join("server.log");
    let mut server = bash(&blocks[1], &dir, &env, &server_log);
    let _server_group = Group(server.id().unwrap());
    answers(&format!("{orgpulse}/healthz"), &mut server, &server_log).await;
    let product_log = tmp.0.join("product.log");
    let mut product = bash(&blocks[2], &dir, &env, &product_log);
    let _product_group = Group(product.id().unwrap());
    let base = format!("http://127.0.0.1:{port}");
    let config =
        json_of(answers(&format!("{base}/api/config"), &mut product, &product_log).await).await;
    assert_eq!(config["orgpulseUrl"], orgpulse.as_str());
    let page = answers(&format!("{base}/"), &mut product, &product_log)
        .await
        .text()
        .await
        .unwrap();
    assert!(page.contains("app.js"), "the board's page: {page}");

    // Signed in as ann of acme: her token (minted by the product) opens an orgpulse stream.
    let login = post(
        &format!("{base}/api/login"),
        None,
        json!({"user": "ann", "org": "acme"}),
    )
    .await;
    let token = login["token"].as_str().expect("a token").to_string();
    let channel = Endpoint::from_shared(orgpulse.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut sub = Sub::open_on(channel, &token, "acme", "", &[ENTITY])
        .await
        .unwrap();
    sub.caught_up().await;

    // Two tasks through the board's API: each its transaction with its outbox row.
    let mut ids = vec![];
    for title in ["from the README", "and another"] {
        let task = post(
            &format!("{base}/api/tasks"),
            Some(&token),
            json!({ "title": title }),
        )
        .await;
        ids.push(task["id"].to_string().trim_matches('"').to_string());
    }
    let tasks = reqwest::Client::new()
        .get(format!("{base}/api/tasks"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let tasks = json_of(tasks).await;
    assert_eq!(
        tasks.as_array().map(Vec::len),
        Some(2),
        "the board: {tasks}"
    );

    let last = ids.last().unwrap().clone();
    // Bounded as a whole: heartbeats keep each single read short.
    let announced_last =
        sub.until(|e| matches!(&e.payload, Some(Payload::EntityChanged(c)) if c.entity_id == last));
    tokio::time::timeout(START, announced_last)
        .await
        .expect("the tasks reached the subscriber: is orgpulse reading the product's outbox?");
    let announced: Vec<(String, String)> = sub
        .seen
        .iter()
        .filter_map(|e| match &e.payload {
            Some(Payload::EntityChanged(c)) => Some((c.entity_type.clone(), c.entity_id.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        announced,
        ids.iter()
            .map(|id| ("task".to_string(), id.clone()))
            .collect::<Vec<_>>(),
        "each task announced once, in order"
    );
    let log = log_of(&dir.join("orgpulse-data"), "acme");
    assert_exactly_once(&sub.seen, &log, 1..=log.last().unwrap().0, "ann", &[ENTITY]);
}
