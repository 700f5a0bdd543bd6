//! End-to-end: `orgpulse watch --json` against the real server while it is killed, restarted,
//! unreachable on one endpoint, or rotating tokens. Every test checks the watch's output against
//! the org's log: each durable event exactly once, in seq order.
mod cli_support;
mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use cli_support::*;
use orgpulse::{
    client::Client,
    proto::{CreateJobRequest, JobStatus, UpdateJobRequest},
};
use support::{TempDir, TestServer, token, token_ttl};
use tokio::sync::watch;

const ORG: &str = "chaos";

/// How the server goes down between bursts of writes.
#[derive(Clone, Copy, Debug)]
enum Outage {
    Kill,
    Terminate,
}

/// One write: every third a new job, else an update of the latest job (status, then progress).
/// Updates are sent once by the library; on a transport failure the writer tries again (an update
/// applied twice is still a committed event, which the log check accounts for).
async fn write(client: &Client, i: u64, job: &mut String) {
    for _ in 0..200 {
        let result = if i.is_multiple_of(3) {
            client
                .create_job(CreateJobRequest {
                    title: format!("job {i}"),
                    ..Default::default()
                })
                .await
                .map(|j| *job = j.id)
        } else {
            let status = (i % 3 == 1 && i % 6 != 1).then_some(JobStatus::Running as i32);
            client
                .update_job(UpdateJobRequest {
                    job_id: job.clone(),
                    progress: Some((i % 100) as u32),
                    status,
                    ..Default::default()
                })
                .await
                .map(drop)
        };
        match result {
            Ok(()) => return,
            Err(e) if e.class() == orgpulse::client::ErrorClass::Conflict => return,
            Err(e)
                if e.class() == orgpulse::client::ErrorClass::Unavailable
                    || e.class() == orgpulse::client::ErrorClass::Other =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("write {i}: {e}"),
        }
    }
    panic!("write {i} kept failing");
}

/// The acceptance scenario: a watch runs while a writer makes 300 changes and the server goes
/// down 3 times during the writes; `first_down` puts a dead endpoint first in both the watch's and
/// the writer's endpoint lists.
async fn survive_outages(outage: Outage, first_down: bool) {
    let mut server = TestServer::start_args(&["--heartbeat-interval", "1s"]).await;
    let admin = token(ORG, "writer", "admin");
    let dead = dead_endpoint();
    let servers: Vec<&str> = if first_down {
        vec![&dead, &server.url]
    } else {
        vec![&server.url]
    };
    let writer = patient_client(&servers, &admin);
    let begin = head_cursor(&writer).await;

    let mut w = Watcher::spawn(
        orgpulse(&servers, &token(ORG, "watcher", "viewer")),
        &["watch"],
    );
    w.until(|v| kind_of(v) == "caughtUp").await;

    let done = Arc::new(AtomicU64::new(0));
    let (progress_tx, mut progress) = watch::channel(0u64);
    let writing = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut job = String::new();
            for i in 0..300 {
                write(&writer, i, &mut job).await;
                done.store(i + 1, Ordering::SeqCst);
                let _ = progress_tx.send(i + 1);
            }
        })
    };
    let mut reconnects = vec![];
    for at in [75, 150, 225] {
        tokio::time::timeout(PATIENCE, progress.wait_for(|n| *n >= at))
            .await
            .unwrap()
            .unwrap();
        // Every stderr line so far is from before the outage: the first "connected to" after it
        // is the reconnect (the watch may connect before `restart` returns, so draining after the
        // restart could swallow it).
        w.drain_states();
        match outage {
            Outage::Kill => server.kill().await,
            Outage::Terminate => {
                let took = server.terminate().await;
                assert!(
                    took < Duration::from_secs(10),
                    "graceful shutdown took {took:?}"
                );
            }
        }
        server.restart().await;
        let up = Instant::now();
        let connected = w.state("connected to").await;
        reconnects.push(connected.at.saturating_duration_since(up));
    }
    tokio::time::timeout(PATIENCE * 2, writing)
        .await
        .expect("writer finished")
        .unwrap();
    assert_eq!(done.load(Ordering::SeqCst), 300);

    let log = log_after(&server, &admin, &begin).await;
    assert!(
        log.len() >= 300,
        "the log holds {} events for 300 writes",
        log.len()
    );
    assert_log_is_the_store(&server, ORG, &log);
    // Creates retried across the kills (a reply lost with the server) carry one request_id each:
    // never a second job.
    let creates = log
        .iter()
        .filter(|e| e.what.starts_with("jobCreated"))
        .count();
    assert_eq!(creates, 100, "100 creates, each committed exactly once");
    let head = log.last().unwrap().cursor.clone();
    w.until_seq(log.last().unwrap().seq).await;
    // The watch ends live at the head: a caught_up (or a heartbeat, sent only once caught up) at
    // the last event's position.
    w.until(|v| matches!(kind_of(v), "caughtUp" | "heartbeat") && v["cursor"] == head.as_str())
        .await;
    assert_exactly_once(&w.seen, &log);
    let caught_up = w.seen.iter().filter(|v| kind_of(v) == "caughtUp").count();
    assert!(
        caught_up >= 2,
        "caught_up at the start and after the last restart, got {caught_up}"
    );
    assert!(
        w.child.try_wait().unwrap().is_none(),
        "the watch never exits"
    );
    eprintln!(
        "{outage:?} first_down={first_down}: reconnected {reconnects:?} after the server was back"
    );
    w.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_survives_sigkill_restarts() {
    survive_outages(Outage::Kill, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_survives_graceful_restarts() {
    survive_outages(Outage::Terminate, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_rotates_past_a_dead_first_endpoint() {
    survive_outages(Outage::Kill, true).await;
}

/// Tokens live 3 s and the token file is rewritten every second: streams end with "token expired",
/// the watch re-reads the file and resumes at once, never exits, loses and repeats nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_rotates_short_lived_tokens_from_a_file() {
    let server = TestServer::start_args(&["--heartbeat-interval", "1s"]).await;
    let admin = token(ORG, "writer", "admin");
    let writer = patient_client(&[&server.url], &admin);
    let begin = head_cursor(&writer).await;
    let dir = TempDir::new("tokens");
    let file = dir.0.join("token");
    write_token(&file, &token_ttl(ORG, "rotating", "viewer", 3));
    let rotating = tokio::spawn({
        let file = file.clone();
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                write_token(&file, &token_ttl(ORG, "rotating", "viewer", 3));
            }
        }
    });

    let mut cmd = orgpulse(&[&server.url], "");
    cmd.arg("--token-file").arg(&file);
    let mut w = Watcher::spawn(cmd, &["watch"]);
    w.until(|v| kind_of(v) == "caughtUp").await;
    // ~10 s of writes: at least three token lifetimes.
    let mut pace = tokio::time::interval(Duration::from_millis(100));
    let mut job = String::new();
    for i in 0..100 {
        pace.tick().await;
        write(&writer, i, &mut job).await;
    }
    let log = log_after(&server, &admin, &begin).await;
    assert_log_is_the_store(&server, ORG, &log);
    w.until_seq(log.last().unwrap().seq).await;
    rotating.abort();
    w.drain_states();
    assert_exactly_once(&w.seen, &log);
    let expiries = w
        .stderr
        .iter()
        .filter(|l| l.text.contains("expired"))
        .count();
    assert!(
        expiries >= 2,
        "expected the stream to end with 'token expired' repeatedly, saw {expiries}"
    );
    let resumed: Vec<Duration> = w
        .stderr
        .windows(2)
        .filter(|p| p[0].text.contains("expired") && p[1].text.contains("connected"))
        .map(|p| p[1].at - p[0].at)
        .collect();
    eprintln!("{expiries} token expiries, resumed after {resumed:?}");
    assert!(
        w.child.try_wait().unwrap().is_none(),
        "the watch never exits"
    );
    w.kill().await;
}

/// A token signed with another secret: exit code 3 (auth) after one attempt, no retry loop.
#[tokio::test]
async fn watch_stops_on_an_invalid_token() {
    let server = TestServer::start().await;
    let bad = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": "mallory", "org": ORG, "roles": ["admin"], "exp": support::now_secs() + 600}),
        &jsonwebtoken::EncodingKey::from_secret(b"not-the-server-secret"),
    )
    .unwrap();
    let t0 = Instant::now();
    let out = run(&[&server.url], &bad, &["watch", "--json"]).await;
    let took = t0.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "stderr: {stderr}");
    assert!(
        stderr.contains("unauthenticated"),
        "a clear message: {stderr}"
    );
    assert!(!stderr.contains("reconnecting"), "no retry loop: {stderr}");
    assert!(!stderr.contains(&bad), "the token is never echoed");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(out.stdout.is_empty());
}

/// `--cursor-file`: kill the watch, write 50 events, start it again: exactly those 50.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_from_its_cursor_file() {
    let server = TestServer::start().await;
    let admin = token(ORG, "writer", "admin");
    let writer = patient_client(&[&server.url], &admin);
    let dir = TempDir::new("cursor");
    let file = dir.0.join("cursor");
    let file_arg = file.to_str().unwrap();
    let viewer = token(ORG, "watcher", "viewer");

    let mut w = Watcher::spawn(
        orgpulse(&[&server.url], &viewer),
        &["watch", "--cursor-file", file_arg],
    );
    let caught_up = w.until(|v| kind_of(v) == "caughtUp").await;
    // The missing cursor file is created on the first event.
    wait_for_file(&file, caught_up["cursor"].as_str().unwrap()).await;
    let mut job = String::new();
    for i in 0..10 {
        write(&writer, i, &mut job).await;
    }
    let first = log_after(&server, &admin, caught_up["cursor"].as_str().unwrap()).await;
    assert_eq!(first.len(), 10);
    w.until_seq(first[9].seq).await;
    // The cursor is saved right after the event is printed: wait for it to land.
    wait_for_file(&file, &first[9].cursor).await;
    w.kill().await;
    assert_exactly_once(&w.seen, &first);

    for i in 10..60 {
        write(&writer, i, &mut job).await;
    }
    let second = log_after(&server, &admin, &first[9].cursor).await;
    assert_eq!(second.len(), 50);
    let mut w = Watcher::spawn(
        orgpulse(&[&server.url], &viewer),
        &["watch", "--cursor-file", file_arg],
    );
    w.until(|v| kind_of(v) == "caughtUp").await;
    assert_exactly_once(&w.seen, &second);
    w.kill().await;
}

/// A server that stops answering without closing its connections (SIGSTOP): the watch notices the
/// missing heartbeats after `--idle-timeout`, reconnects once the server runs again, and still
/// loses and repeats nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reconnects_when_the_server_hangs() {
    let server = TestServer::start_args(&["--heartbeat-interval", "500ms"]).await;
    let admin = token(ORG, "writer", "admin");
    let writer = patient_client(&[&server.url], &admin);
    let begin = head_cursor(&writer).await;
    let mut w = Watcher::spawn(
        orgpulse(&[&server.url], &token(ORG, "watcher", "viewer")),
        &["watch", "--idle-timeout", "2s", "--timeout", "2s"],
    );
    w.until(|v| kind_of(v) == "caughtUp").await;
    let mut job = String::new();
    write(&writer, 0, &mut job).await;

    let signal = |sig: &str| {
        let pid = server.pid().to_string();
        assert!(
            std::process::Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    signal("-STOP");
    let stuck = w.state("no event or heartbeat").await;
    signal("-CONT");
    w.state("connected to").await;
    eprintln!(
        "reconnected {:?} after the hang was detected",
        stuck.at.elapsed()
    );
    write(&writer, 1, &mut job).await;
    let log = log_after(&server, &admin, &begin).await;
    w.until_seq(log.last().unwrap().seq).await;
    assert_exactly_once(&w.seen, &log);
    w.kill().await;
}

/// A watch whose stdout nobody reads for a while: the server cuts its stream off as too slow,
/// and once the reader catches up the watch resumes from its cursor, losing and repeating nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_recovers_from_being_a_slow_consumer() {
    let server = TestServer::start_args(&["--subscriber-queue", "8"]).await;
    let admin = token(ORG, "writer", "admin");
    let writer = patient_client(&[&server.url], &admin);
    let begin = head_cursor(&writer).await;
    let (mut w, open) = Watcher::spawn_paused(
        orgpulse(&[&server.url], &token(ORG, "watcher", "viewer")),
        &["watch"],
    );
    w.state("connected to").await;
    // ~8 KB per event: 500 of them overflow the pipe, the HTTP/2 windows and the server's queue.
    let labels: std::collections::HashMap<String, String> = (0..30)
        .map(|k| (format!("label{k}"), "x".repeat(250)))
        .collect();
    for i in 0..500 {
        let req = CreateJobRequest {
            title: format!("big {i}"),
            labels: labels.clone(),
            ..Default::default()
        };
        writer.create_job(req).await.unwrap();
    }
    let _ = open.send(());
    let log = log_after(&server, &admin, &begin).await;
    w.until_seq(log.last().unwrap().seq).await;
    assert_exactly_once(&w.seen, &log);
    w.drain_states();
    assert!(
        w.stderr.iter().any(|l| l.text.contains("reconnecting")),
        "the stream was cut off at least once"
    );
    w.kill().await;
}
