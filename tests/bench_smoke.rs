//! Smoke run of `orgpulse bench` at tiny sizes, so the benchmark cannot rot: the real CLI starts
//! the real server (and, in the second case, targets one started by the test harness) and must
//! print one JSON line with every delivery (or, for `orgs`, every idle stream) accounted for (for
//! `hundredk`, streams on connections of their own and multiplexed ones); the
//! `outbox` run commits rows in a PostgreSQL database of its own on 127.0.0.1:5432 and drops it;
//! the `--nodes 2` run starts a cluster on such a database and the machine's NATS; the `presence`
//! run broadcasts on one topic (nothing stored); the `audience` run addresses each event to one
//! group and the admins, and its `--rooms` baseline puts each group in an org of its own; the `idle-pg` run counts the transactions an idle
//! node runs in a PostgreSQL database of its own; the `floor` run starts no server at all; the
//! `storm` run kills one of two cluster nodes under its subscribers, which all resume on the other.
//! The full runs are in BENCHMARKS.md.
mod cluster_support;
mod support;

use std::{process::Stdio, time::Duration};

use serde_json::Value;
use support::{SECRET, TestServer, pg, workspace_bin};
use tokio::process::Command;

/// Runs `orgpulse bench ARGS` unpinned with short bounds; returns its one JSON line.
async fn bench(args: &[&str]) -> Value {
    let mut cmd = Command::new(workspace_bin("orgpulse"));
    cmd.arg("bench")
        .args(["--server-cpus", "", "--client-cpus", ""])
        .args(["--settle", "0s", "--stall", "5s", "--phase-timeout", "30s"])
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("bench finished within 60 s")
        .expect("bench ran");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "bench {args:?} failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line expected: {stdout}");
    serde_json::from_str(lines[0]).expect("valid JSON")
}

/// The bench database named in `v[field]` is gone.
async fn assert_dropped(v: &Value, field: &str) {
    let name = v[field]
        .as_str()
        .unwrap_or_else(|| panic!("no {field} in {v}"));
    assert!(name.starts_with("orgpulse_bench_"), "{name}");
    let left: i64 = pg::connect("postgres://postgres@127.0.0.1:5432/test")
        .await
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            &[&name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the bench dropped its database {name}");
}

fn number(v: &Value, field: &str) -> f64 {
    v[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} is not a number in {v}"))
}

#[tokio::test]
async fn fan_out_run_accounts_for_every_delivery() {
    let server = workspace_bin("orgpulse-server");
    let v = bench(&[
        "--scenario",
        "a",
        "--subscribers",
        "5",
        "--events",
        "20",
        "--server-bin",
        server.to_str().unwrap(),
    ])
    .await;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["connected"], 5);
    assert_eq!(v["deliveriesExpected"], 100);
    assert_eq!(v["deliveriesReceived"], 100);
    assert_eq!(v["lost"], 0);
    assert_eq!(v["outOfOrder"], 0);
    assert!(number(&v, "deliveriesPerSec") > 0.0);
    assert!(number(&v, "serverCpuUsPerDelivery") >= 0.0);
    assert!(number(&v, "rssPerConnKB").is_finite());
    for q in ["p50", "p90", "p99", "max"] {
        let ms = v["latencyMs"][q].as_f64().expect("latency quantile");
        assert!((0.0..30_000.0).contains(&ms), "{q} = {ms} ms");
    }
    assert!(number(&v["serverRssMB"], "afterConnect") > 0.0);
}

/// The audience run with 4 groups over 200 subscribers (2 admins, at 99 and 199, both of
/// group 3's share), and the same groups as orgs (`--rooms`): each delivery expected exactly.
#[tokio::test]
async fn audience_run_and_its_rooms_baseline_reach_exactly_their_groups() {
    let server = workspace_bin("orgpulse-server");
    let server = server.to_str().unwrap();
    let shape = [
        "--scenario",
        "audience",
        "--subscribers",
        "200",
        "--audience-groups",
        "4",
        "--writers",
        "4",
        "--events",
        "40",
        "--rate",
        "0",
        "--server-bin",
        server,
    ];
    let audiences = bench(&shape).await;
    let rooms = bench(&[&shape[..], &["--rooms"]].concat()).await;
    // 10 events per writer; writer n's for group n and the 2 admins; group 3 has 48 members.
    for (v, rooms, expected) in [
        (audiences, false, 10 * (3 * 52 + 50)),
        (rooms, true, 10 * 200),
    ] {
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(v["rooms"], rooms, "{v}");
        assert_eq!(v["connected"], 200, "{v}");
        assert_eq!(v["deliveriesExpected"], expected, "{v}");
        assert_eq!(v["deliveriesReceived"], expected, "{v}");
        assert_eq!(v["lost"], 0, "{v}");
        assert_eq!(v["outOfOrder"], 0, "{v}");
    }
}

#[tokio::test]
async fn presence_run_delivers_every_broadcast_in_order_per_sender() {
    let server = workspace_bin("orgpulse-server");
    // 3 senders (subscribers 0-2 themselves) at 10/s each, 5 subscribers on the topic.
    let v = bench(&[
        "--scenario",
        "presence",
        "--subscribers",
        "5",
        "--writers",
        "3",
        "--events",
        "30",
        "--rate",
        "30",
        "--server-bin",
        server.to_str().unwrap(),
    ])
    .await;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["label"], "presence");
    assert_eq!(v["connected"], 5);
    assert_eq!(
        v["deliveriesExpected"], 150,
        "every broadcast to every subscriber: {v}"
    );
    assert_eq!(v["deliveriesReceived"], 150);
    assert_eq!(v["lost"], 0);
    assert_eq!(v["outOfOrder"], 0);
    assert_eq!(v["storeCommits"], 0, "broadcasts are never stored: {v}");
    assert!(
        number(&v["callLatencyMs"], "p99") >= 0.0,
        "Broadcast calls timed: {v}"
    );
    assert!(number(&v, "serverCpuUsPerDelivery") >= 0.0);
    for field in ["latencyMs", "fanOutLatencyMs"] {
        for q in ["p50", "p99", "max"] {
            let ms = v[field][q].as_f64().expect("latency quantile");
            assert!((0.0..5_000.0).contains(&ms), "{field} {q} = {ms} ms");
        }
    }

    // Above the server's 20 broadcasts/s per user: refused before anything starts.
    let out = Command::new(workspace_bin("orgpulse"))
        .args([
            "bench",
            "--scenario",
            "presence",
            "--writers",
            "2",
            "--rate",
            "50",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[tokio::test]
async fn catchup_against_a_running_server() {
    let server = TestServer::start().await;
    let secret = server.dir.join("jwt-secret");
    assert!(std::fs::read_to_string(&secret).unwrap().contains(SECRET));
    let v = bench(&[
        "--scenario",
        "catchup",
        "--events",
        "300",
        "--writers",
        "3",
        "--server",
        &server.url,
        "--secret-file",
        secret.to_str().unwrap(),
    ])
    .await;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["server"], server.url.as_str());
    assert_eq!(v["deliveriesExpected"], 300);
    assert_eq!(v["deliveriesReceived"], 300);
    assert!(number(&v, "catchupEventsPerSec") > 0.0);
    assert!(number(&v, "backlogWritesPerSec") > 0.0);
}

#[tokio::test]
async fn idle_orgs_run_keeps_every_stream_open() {
    let server = workspace_bin("orgpulse-server");
    // 600 orgs: six shared HTTP/2 connections of at most 100 streams (the server's
    // --max-concurrent-streams).
    let v = bench(&[
        "--scenario",
        "orgs",
        "--orgs",
        "600",
        "--seconds",
        "1s",
        "--server-bin",
        server.to_str().unwrap(),
    ])
    .await;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["orgs"], 600);
    assert_eq!(v["connections"], 6);
    assert_eq!(v["connected"], 600);
    assert_eq!(v["streamsOpen"], 600);
    assert_eq!(v["brokenStreams"], 0);
    assert!(number(&v, "idleSeconds") >= 1.0);
    assert!(
        (0.0..=200.0).contains(&number(&v, "serverCpuPctOfCore")),
        "{v}"
    );
    assert!(number(&v["serverRssMB"], "afterIdle") > 0.0);
}

#[tokio::test]
async fn idle_pg_run_counts_the_idle_nodes_transactions() {
    let server = workspace_bin("orgpulse-server");
    let v = bench(&[
        "--scenario",
        "idle-pg",
        "--orgs",
        "3",
        "--seconds",
        "1s",
        "--server-bin",
        server.to_str().unwrap(),
    ])
    .await;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["label"], "idle-pg");
    assert_eq!(v["jobsWritten"], 3);
    assert_eq!(v["connected"], 3);
    assert_eq!(v["streamsOpen"], 3);
    assert!(number(&v, "pgTransactionsPerSec") >= 0.0, "{v}");
    assert_dropped(&v, "storeDatabase").await;
}

#[tokio::test]
async fn floor_run_accounts_for_every_frame_without_a_server() {
    let v = bench(&[
        "--scenario",
        "floor",
        "--subscribers",
        "5",
        "--events",
        "20",
    ])
    .await;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["label"], "floor");
    assert_eq!(v["connected"], 5);
    assert_eq!(v["deliveriesExpected"], 100);
    assert_eq!(v["deliveriesReceived"], 100);
    assert_eq!(v["outOfOrder"], 0);
    assert!(number(&v, "serverCpuUsPerDelivery") >= 0.0, "{v}");
    assert!(number(&v, "frameBytes") > 100.0, "{v}");
}

#[tokio::test]
async fn hundredk_run_holds_own_and_multiplexed_streams_and_reaches_all() {
    let server = workspace_bin("orgpulse-server");
    // 50 subscribers on connections of their own, 250 over three shared connections (100, 100,
    // 50 streams), from two source addresses; two events to all.
    let v = bench(&[
        "--scenario",
        "hundredk",
        "--subscribers",
        "300",
        "--own-connections",
        "50",
        "--source-addrs",
        "2",
        "--events",
        "2",
        "--seconds",
        "1s",
        "--server-bin",
        server.to_str().unwrap(),
    ])
    .await;
    assert_eq!(v["ok"], true, "{v}");
    for (field, want) in [
        ("ownConnections", 50),
        ("sharedConnections", 3),
        ("connected", 300),
        ("streamsHeld", 300),
        ("deliveriesExpected", 600),
        ("deliveriesReceived", 600),
        ("lost", 0),
        ("outOfOrder", 0),
    ] {
        assert_eq!(v[field], want, "{field} in {v}");
    }
    assert!(number(&v["latencyMs"], "max") > 0.0, "{v}");
    assert!(number(&v, "idleSeconds") >= 1.0);
    assert!(v["onPaper16vCpu"]["vcpus"].is_number(), "{v}");
}

#[tokio::test]
async fn outbox_run_delivers_every_committed_row_through_notify() {
    let server = workspace_bin("orgpulse-server");
    let v = bench(&[
        "--scenario",
        "outbox",
        "--subscribers",
        "3",
        "--events",
        "30",
        "--rate",
        "100",
        "--server-bin",
        server.to_str().unwrap(),
    ])
    .await;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["connected"], 3);
    assert_eq!(v["deliveriesExpected"], 90);
    assert_eq!(v["deliveriesReceived"], 90);
    assert_eq!(v["lost"], 0);
    assert_eq!(v["outOfOrder"], 0);
    assert_eq!(v["rejectedRows"], 0);
    // The server polls only every 10 s, and the run gives up after 5 s without a delivery: every
    // row came through the NOTIFY wake-up.
    assert_eq!(v["outboxPoll"], "10s");
    for q in ["p50", "p90", "p99", "max"] {
        let ms = v["latencyMs"][q].as_f64().expect("latency quantile");
        assert!((0.0..5_000.0).contains(&ms), "{q} = {ms} ms");
    }
    assert_dropped(&v, "outboxDatabase").await;
}

#[tokio::test]
async fn two_node_run_delivers_across_nodes() {
    if !cluster_support::services_or_skip(false) {
        return;
    }
    let server = workspace_bin("orgpulse-server");
    let v = bench(&[
        "--scenario",
        "e",
        "--nodes",
        "2",
        "--subscribers",
        "6",
        "--events",
        "40",
        "--rate",
        "200",
        "--server-bin",
        server.to_str().unwrap(),
    ])
    .await;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["nodes"], 2);
    assert_eq!(v["writers"], 2, "a writer on each node: {v}");
    assert_eq!(v["connected"], 6);
    assert_eq!(v["streamsPerNode"], serde_json::json!([3, 3]), "{v}");
    assert_eq!(v["deliveriesExpected"], 240);
    assert_eq!(v["deliveriesReceived"], 240);
    assert_eq!(v["lost"], 0);
    assert_eq!(v["outOfOrder"], 0);
    // Each subscriber gets half of the events from the other node's writer.
    assert_eq!(v["crossNodeDeliveries"], 120, "{v}");
    for q in ["p50", "p99", "max"] {
        let ms = v["crossNodeLatencyMs"][q]
            .as_f64()
            .expect("cross-node quantile");
        assert!((0.0..5_000.0).contains(&ms), "{q} = {ms} ms");
    }
    assert_dropped(&v, "storeDatabase").await;
}

#[tokio::test]
async fn storm_run_resumes_every_stream_on_the_surviving_node() {
    if !cluster_support::services_or_skip(false) {
        return;
    }
    let server = workspace_bin("orgpulse-server");
    // The mixed layout of the 100,000 run: 20 subscribers on connections of their own, 140 over
    // two shared connections (100 and 40 streams), from two source addresses.
    let v = bench(&[
        "--scenario",
        "storm",
        "--subscribers",
        "160",
        "--own-connections",
        "20",
        "--source-addrs",
        "2",
        "--orgs",
        "4",
        "--events",
        "80",
        "--rate",
        "40",
        "--server-bin",
        server.to_str().unwrap(),
    ])
    .await;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["nodes"], 2);
    for (field, want) in [
        ("connected", 160),
        ("ownConnections", 20),
        ("sharedConnections", 2),
        ("connections", 22),
        ("caughtUpOnB", 160),
        ("resumeFailures", 0),
        ("lost", 0),
        ("outOfOrder", 0),
        // Each stream got every write of its org after the job was created (seq 1), and so did
        // B's own subscriber of each org (there from before the kill).
        ("deliveriesExpected", (160 + 4) * 80 / 4),
        ("deliveriesReceived", (160 + 4) * 80 / 4),
    ] {
        assert_eq!(v[field], want, "{field} in {v}");
    }
    for (field, want) in [
        ("streams", 4),
        ("lost", 0),
        ("outOfOrder", 0),
        ("broken", 0),
    ] {
        assert_eq!(
            v["residentsOnB"][field], want,
            "residentsOnB.{field} in {v}"
        );
    }
    assert!(number(&v["residentsOnB"]["latencyMs"], "max") > 0.0, "{v}");
    assert!(number(&v["writerCallsMs"], "max") > 0.0, "{v}");
    assert!(number(&v, "allCaughtUpMs") > 0.0, "{v}");
    assert!(number(&v, "replayStoreReadsPerOrg") >= 0.0, "{v}");
    assert!(number(&v["serverB"], "peakRssMB") > 0.0, "{v}");
    assert_dropped(&v, "storeDatabase").await;
}
