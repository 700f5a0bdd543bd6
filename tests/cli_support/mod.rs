//! Helpers for the CLI end-to-end tests: run `orgpulse` one-shot, run `orgpulse watch --json` as a
//! child whose stdout events and stderr states arrive on channels, read an org's event log back
//! with a fresh `Subscribe`, and check a watch's output against that log (each durable event
//! exactly once, in seq order).
#![allow(dead_code)]

use std::{
    path::Path,
    process::{Output, Stdio},
    time::{Duration, Instant},
};

use futures::StreamExt;
use orgpulse::{
    client::{Client, ClientConfig, TokenSource},
    proto::{ListJobsRequest, OrgFilter, event::Payload},
};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::{mpsc, oneshot},
};

use crate::support::{TestServer, workspace_bin};

/// Upper bound of every wait in these tests.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// `orgpulse` with `--server` (each of `servers`) and `--token`, no inherited ORGPULSE_* env.
pub fn orgpulse(servers: &[&str], token: &str) -> Command {
    let mut cmd = Command::new(workspace_bin("orgpulse"));
    for var in ["ORGPULSE_SERVER", "ORGPULSE_TOKEN", "ORGPULSE_TOKEN_FILE"] {
        cmd.env_remove(var);
    }
    for s in servers {
        cmd.arg("--server").arg(s);
    }
    if !token.is_empty() {
        cmd.arg("--token").arg(token);
    }
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

/// Runs `orgpulse ARGS` to completion (bounded by [`PATIENCE`]).
pub async fn run(servers: &[&str], token: &str, args: &[&str]) -> Output {
    let out = orgpulse(servers, token).args(args).output();
    tokio::time::timeout(PATIENCE, out)
        .await
        .expect("orgpulse finished in time")
        .expect("spawn")
}

/// Runs `orgpulse ARGS`, asserts success and returns stdout.
pub async fn ok(servers: &[&str], token: &str, args: &[&str]) -> String {
    let out = run(servers, token, args).await;
    assert!(
        out.status.success(),
        "orgpulse {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A line of the watch's stderr and when it arrived.
pub struct StateLine {
    pub at: Instant,
    pub text: String,
}

/// A running `orgpulse watch --json` (or `poll --follow --json`).
pub struct Watcher {
    pub child: Child,
    events: mpsc::UnboundedReceiver<Value>,
    states: mpsc::UnboundedReceiver<StateLine>,
    /// Every event read so far, in order.
    pub seen: Vec<Value>,
    /// Every stderr line read so far.
    pub stderr: Vec<StateLine>,
}

impl Watcher {
    /// Starts `orgpulse [global...] SUBCOMMAND --json ARGS`; `cmd` comes from [`orgpulse`].
    pub fn spawn(cmd: Command, args: &[&str]) -> Self {
        Self::spawn_gated(cmd, args, None)
    }

    /// Like [`Watcher::spawn`], but its stdout is not read until `gate` fires: a slow consumer.
    pub fn spawn_paused(cmd: Command, args: &[&str]) -> (Self, oneshot::Sender<()>) {
        let (open, gate) = oneshot::channel();
        (Self::spawn_gated(cmd, args, Some(gate)), open)
    }

    fn spawn_gated(mut cmd: Command, args: &[&str], gate: Option<oneshot::Receiver<()>>) -> Self {
        let mut child = cmd
            .args(args)
            .arg("--json")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn orgpulse");
        let (etx, events) = mpsc::unbounded_channel();
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        tokio::spawn(async move {
            if let Some(gate) = gate {
                let _ = gate.await;
            }
            while let Ok(Some(line)) = out.next_line().await {
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {line}"));
                if etx.send(v).is_err() {
                    break;
                }
            }
        });
        let (stx, states) = mpsc::unbounded_channel();
        let mut err = BufReader::new(child.stderr.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(text)) = err.next_line().await {
                eprintln!("[watch] {text}");
                if stx
                    .send(StateLine {
                        at: Instant::now(),
                        text,
                    })
                    .is_err()
                {
                    break;
                }
            }
        });
        Watcher {
            child,
            events,
            states,
            seen: vec![],
            stderr: vec![],
        }
    }

    /// The next stdout event (panics after [`PATIENCE`] or when the process ended).
    pub async fn next(&mut self) -> Value {
        let v = tokio::time::timeout(PATIENCE, self.events.recv())
            .await
            .expect("an event in time")
            .expect("the watch is still running");
        self.seen.push(v.clone());
        v
    }

    /// Reads events until one satisfies `done`; returns it.
    pub async fn until(&mut self, done: impl Fn(&Value) -> bool) -> Value {
        loop {
            let v = self.next().await;
            if done(&v) {
                return v;
            }
        }
    }

    /// Reads events until the durable event `seq` arrived (or one after it).
    pub async fn until_seq(&mut self, seq: u64) {
        if self.seen.iter().any(|v| seq_of(v) >= seq) {
            return;
        }
        self.until(|v| seq_of(v) >= seq).await;
    }

    /// The next stderr line containing `needle`.
    pub async fn state(&mut self, needle: &str) -> StateLine {
        loop {
            let line = tokio::time::timeout(PATIENCE, self.states.recv())
                .await
                .unwrap_or_else(|_| panic!("no stderr line with {needle:?} in time"))
                .unwrap_or_else(|| panic!("the watch ended before printing {needle:?}"));
            let hit = line.text.contains(needle);
            let keep = StateLine {
                at: line.at,
                text: line.text.clone(),
            };
            self.stderr.push(keep);
            if hit {
                return line;
            }
        }
    }

    /// Drains the stderr lines received so far.
    pub fn drain_states(&mut self) {
        while let Ok(line) = self.states.try_recv() {
            self.stderr.push(line);
        }
    }

    /// The durable events seen so far (seq > 0).
    pub fn durable(&self) -> Vec<Value> {
        self.seen
            .iter()
            .filter(|v| seq_of(v) > 0)
            .cloned()
            .collect()
    }

    /// SIGKILL and reap.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// `seq` of a JSON event (0 when absent: ephemeral).
pub fn seq_of(v: &Value) -> u64 {
    v["seq"]
        .as_str()
        .map(|s| s.parse().expect("seq is a string of digits"))
        .unwrap_or(0)
}

/// The payload case of a JSON event (`jobCreated`, `caughtUp`, ...).
pub fn kind_of(v: &Value) -> &str {
    const KINDS: &[&str] = &[
        "jobCreated",
        "jobUpdated",
        "jobDeleted",
        "notificationNew",
        "userOnline",
        "userOffline",
        "heartbeat",
        "caughtUp",
        "resync",
        "entityChanged",
        "presenceState",
        "broadcast",
    ];
    KINDS
        .iter()
        .find(|k| v.get(**k).is_some())
        .copied()
        .unwrap_or("?")
}

/// A library client for `server` with a long retry budget (writers that must ride out restarts).
pub fn patient_client(servers: &[&str], token: &str) -> Client {
    Client::new(ClientConfig {
        endpoints: servers.iter().map(|s| s.to_string()).collect(),
        token: TokenSource::Static(token.into()),
        call_attempts: 200,
        backoff: orgpulse::client::BackoffConfig {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
        },
        call_timeout: Duration::from_secs(10),
        ..Default::default()
    })
    .unwrap()
}

/// The org's log position now (ListJobs' snapshot cursor).
pub async fn head_cursor(client: &Client) -> String {
    client
        .list_jobs(ListJobsRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .cursor
}

/// One durable event of the log: (seq, cursor, a summary of its payload).
#[derive(Debug, PartialEq, Eq, Clone)]
pub struct Entry {
    pub seq: u64,
    pub cursor: String,
    pub what: String,
}

/// Replays the org's durable events after `from` with a fresh `Subscribe`, up to `caught_up`.
pub async fn log_after(server: &TestServer, token: &str, from: &str) -> Vec<Entry> {
    let client = patient_client(&[&server.url], token);
    let filter = OrgFilter {
        after_cursor: from.into(),
        ..Default::default()
    };
    let mut stream = client.subscribe(filter).await.expect("subscribe");
    let mut log = vec![];
    loop {
        let ev = tokio::time::timeout(PATIENCE, stream.next())
            .await
            .expect("replay in time")
            .expect("replay stream open")
            .expect("replay event");
        let what = match ev.payload {
            Some(Payload::JobCreated(j)) => format!("jobCreated {} v{}", j.id, j.version),
            Some(Payload::JobUpdated(j)) => format!("jobUpdated {} v{}", j.id, j.version),
            Some(Payload::JobDeleted(d)) => format!("jobDeleted {}", d.job_id),
            Some(Payload::NotificationNew(n)) => format!("notificationNew {}", n.id),
            Some(Payload::CaughtUp(_)) => return log,
            Some(Payload::Resync(r)) => {
                panic!("replay from {from:?} asked to resync: {}", r.reason)
            }
            _ => continue,
        };
        log.push(Entry {
            seq: ev.seq,
            cursor: ev.cursor,
            what,
        });
    }
}

/// Asserts that `log` (a replay from the org's first position) is exactly the org's event log as
/// stored in the server's database.
pub fn assert_log_is_the_store(server: &TestServer, org: &str, log: &[Entry]) {
    let stored: Vec<u64> = crate::support::log_of(&server.dir, org)
        .iter()
        .map(|e| e.0)
        .collect();
    let replayed: Vec<u64> = log.iter().map(|e| e.seq).collect();
    assert_eq!(
        replayed, stored,
        "a replay from the start (left) differs from the store (right)"
    );
}

/// The same summary of a JSON event from `watch --json`.
pub fn entry_of(v: &Value) -> Entry {
    let kind = kind_of(v);
    let p = &v[kind];
    let what = match kind {
        "jobCreated" | "jobUpdated" => format!(
            "{kind} {} v{}",
            p["id"].as_str().unwrap(),
            p["version"].as_str().unwrap_or("0")
        ),
        "jobDeleted" => format!("{kind} {}", p["jobId"].as_str().unwrap()),
        "notificationNew" => format!("{kind} {}", p["id"].as_str().unwrap()),
        other => panic!("not a durable event: {other}: {v}"),
    };
    Entry {
        seq: seq_of(v),
        cursor: v["cursor"].as_str().unwrap().into(),
        what,
    }
}

/// Asserts that `watched` (JSON events from a watch) holds every event of `log` exactly once, in
/// seq order, and nothing else durable.
pub fn assert_exactly_once(watched: &[Value], log: &[Entry]) {
    let got: Vec<Entry> = watched
        .iter()
        .filter(|v| seq_of(v) > 0)
        .map(entry_of)
        .collect();
    for w in got.windows(2) {
        assert!(
            w[0].seq < w[1].seq,
            "seq not strictly increasing: {:?} then {:?}",
            w[0],
            w[1]
        );
    }
    assert_eq!(
        got.len(),
        log.len(),
        "the watch saw {} durable events, the log has {}",
        got.len(),
        log.len()
    );
    for (g, l) in got.iter().zip(log) {
        assert_eq!(g, l, "the watch's event differs from the log's");
    }
}

/// A local address nothing listens on.
pub fn dead_endpoint() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

/// Writes `token` to `path` atomically (so a reader never sees half a token).
pub fn write_token(path: &Path, token: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, token).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Waits (bounded) until the file at `path` holds `content` (surrounding whitespace ignored).
pub async fn wait_for_file(path: &Path, content: &str) {
    let landed = async {
        while std::fs::read_to_string(path).unwrap_or_default().trim() != content {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(PATIENCE, landed)
        .await
        .unwrap_or_else(|_| panic!("{} never held {content:?}", path.display()));
}
