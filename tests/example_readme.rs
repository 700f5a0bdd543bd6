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
//! log; those of the private project only the subscriber in its group (the row's audience). Needs PostgreSQL, node and `npm ci` at the root: under `CI=true` a missing one fails, else
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
use support::{
    Sub, TempDir, assert_exactly_once, log_of, log_rows, pg::Db, skip_on_postgres, workspace_bin,
};
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

    // Signed in, both of acme: ann on the launch team (the private project's group), ben not.
    // Each token (minted by the product) opens an orgpulse stream of the org's entity events.
    let mut tokens = vec![];
    let mut subs = vec![];
    for (user, launch_team) in [("ann", true), ("ben", false)] {
        let login = post(
            &format!("{base}/api/login"),
            None,
            json!({"user": user, "org": "acme", "launchTeam": launch_team}),
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
        tokens.push(token);
        subs.push(sub);
    }
    let [ann, ben] = [&tokens[0], &tokens[1]];

    // Three tasks through the board's API, each its transaction with its outbox row: two in the
    // org-wide project, one between them in the private one.
    let mut ids = vec![];
    for (project, title) in [
        ("general", "from the README"),
        ("launch", "the launch date"),
        ("general", "and another"),
    ] {
        let url = format!("{base}/api/projects/{project}/tasks");
        let task = post(&url, Some(ann), json!({ "title": title })).await;
        ids.push(task["id"].to_string().trim_matches('"').to_string());
    }
    let board = |token: &str, project: &str| {
        reqwest::Client::new()
            .get(format!("{base}/api/projects/{project}/tasks"))
            .bearer_auth(token)
            .send()
    };
    let general = json_of(board(ann, "general").await.unwrap()).await;
    assert_eq!(general.as_array().map(Vec::len), Some(2), "{general}");
    let private = json_of(board(ann, "launch").await.unwrap()).await;
    assert_eq!(private.as_array().map(Vec::len), Some(1), "{private}");
    let outside = board(ben, "launch").await.unwrap().status();
    assert_eq!(outside, 404, "the private project is no project to ben");

    // ann receives all three, ben the org-wide two: each exactly once, in the log's order.
    let last = ids.last().unwrap().clone();
    for sub in &mut subs {
        // Bounded as a whole: heartbeats keep each single read short.
        let announced_last = sub.until(
            |e| matches!(&e.payload, Some(Payload::EntityChanged(c)) if c.entity_id == last),
        );
        tokio::time::timeout(START, announced_last)
            .await
            .expect("the tasks reached the subscriber: is orgpulse reading the product's outbox?");
    }
    let announced = |sub: &Sub| -> Vec<String> {
        sub.seen
            .iter()
            .filter_map(|e| match &e.payload {
                Some(Payload::EntityChanged(c)) if c.entity_type == "task" => {
                    Some(c.entity_id.clone())
                }
                _ => None,
            })
            .collect()
    };
    assert_eq!(announced(&subs[0]), ids, "ann: each task once, in order");
    let org_wide = [ids[0].clone(), ids[2].clone()];
    assert_eq!(announced(&subs[1]), org_wide, "ben: the org-wide tasks");
    // The private task's row carries the group audience; ann is in it, ben is not.
    let data = dir.join("orgpulse-data");
    let rows = log_rows(&data, "acme");
    let launch_audience = r#"{"groups":["launch"]}"#;
    assert_eq!(
        rows.iter()
            .map(|r| r.audience.as_deref() == Some(launch_audience))
            .collect::<Vec<_>>(),
        [false, true, false],
        "the outbox row's audience in the log"
    );
    let log = log_of(&data, "acme");
    let end = log.last().unwrap().0;
    assert_exactly_once(&subs[1].seen, &log, 1..=end, "ben", &[ENTITY]);
    let as_ann: Vec<_> = log
        .into_iter()
        .map(|(seq, kind, aud)| (seq, kind, aud.filter(|a| a != launch_audience)))
        .collect();
    assert_exactly_once(&subs[0].seen, &as_ann, 1..=end, "ann", &[ENTITY]);
}
