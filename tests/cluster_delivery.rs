//! End-to-end cluster delivery: real nodes on one PostgreSQL database and NATS. A subscriber on
//! one node receives writes made through others exactly once, in seq order, checked against the
//! `events` rows in PostgreSQL; also across a snapshot taken on another node, and while NATS is
//! killed and restarted.
mod cluster_support;
mod support;

use std::time::{Duration, Instant};

use cluster_support::{Cluster, NatsServer, services_or_skip};
use orgpulse::proto::{UpdateJobRequest, event::Payload};
use support::{
    Sub, WAIT, assert_exactly_once, create_job, cursor_at, get_text, jobs_at, log_of, snapshot,
    token,
};

const ORG: &str = "cluster";

#[tokio::test]
async fn a_subscriber_on_one_node_gets_writes_through_another_exactly_once_in_order() {
    if !services_or_skip(false) {
        return;
    }
    let cluster = Cluster::start(2, &[]).await;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let t = token(ORG, "alice", "admin");
    let mut sub = Sub::open(a, &t, ORG, "", &[]).await.unwrap();
    sub.caught_up().await;
    for i in 0..100 {
        let job = create_job(b, &t, ORG, &format!("job {i}")).await;
        if i % 2 == 0 {
            b.jobs(&t)
                .await
                .update_job(UpdateJobRequest {
                    job_id: job.id,
                    progress: Some(i),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    }
    let got = sub.durable(150).await;
    let log = log_of(cluster.db_dir(), ORG);
    assert_eq!(log.len(), 150);
    assert_exactly_once(&got, &log, 1..=150, "alice", &[]);
}

/// `ListJobs.cursor` on node A, `Subscribe` from it on node B, writers on both nodes all along:
/// snapshot + stream is the current state, nothing lost, nothing twice.
#[tokio::test]
async fn snapshot_on_one_node_then_stream_on_another_loses_and_duplicates_nothing() {
    if !services_or_skip(false) {
        return;
    }
    let cluster = Cluster::start(2, &[]).await;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let t = token(ORG, "alice", "admin");
    for i in 0..20 {
        create_job(a, &t, ORG, &format!("seed {i}")).await;
    }
    // Each writer creates a few jobs, then keeps updating them (the org stays within one
    // snapshot page).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = vec![];
    for (w, node) in [a, b, a, b].into_iter().enumerate() {
        let (url, t, stop) = (node.url.clone(), t.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut jobs = jobs_at(url, &t).await;
            let mut mine = vec![];
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 300 {
                if n < 5 {
                    let j = jobs
                        .create_job(orgpulse::proto::CreateJobRequest {
                            org_id: ORG.into(),
                            title: format!("w{w}-{n}"),
                            ..Default::default()
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    mine.push(j.id);
                } else {
                    jobs.update_job(UpdateJobRequest {
                        job_id: mine[n as usize % mine.len()].clone(),
                        progress: Some(n % 100),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                }
                n += 1;
            }
        }));
    }
    while log_of(cluster.db_dir(), ORG).len() < 80 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let snap = snapshot(a, &t).await;
    assert!(snap.next_page_token.is_empty(), "all jobs fit one page");
    let mut state: std::collections::BTreeMap<String, orgpulse::proto::Job> =
        snap.jobs.into_iter().map(|j| (j.id.clone(), j)).collect();
    let mut sub = Sub::open(b, &t, ORG, &snap.cursor, &[]).await.unwrap();
    sub.caught_up().await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let marker = create_job(a, &t, ORG, "marker").await;
    sub.until(|e| matches!(&e.payload, Some(Payload::JobCreated(j)) if j.id == marker.id))
        .await;
    let log = log_of(cluster.db_dir(), ORG);
    let head = log.last().unwrap().0;
    let got = sub.durable_seen();
    let from = got.first().unwrap().seq;
    assert_eq!(
        cursor_at(&snap.cursor, from - 1),
        snap.cursor,
        "the stream starts right after the snapshot"
    );
    assert_exactly_once(&got, &log, from..=head, "alice", &[]);
    for e in &got {
        if let Some(Payload::JobCreated(j) | Payload::JobUpdated(j)) = &e.payload {
            state.insert(j.id.clone(), j.clone());
        }
    }
    let rebuilt: Vec<_> = state.into_values().collect();
    let mut current = snapshot(b, &t).await.jobs;
    current.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(rebuilt, current, "snapshot + stream == current state");
}

/// How long one write through `writer` takes to reach `sub` (on another node).
async fn cross_node_latency(writer: &support::TestServer, t: &str, sub: &mut Sub) -> Duration {
    let t0 = Instant::now();
    let job = create_job(writer, t, ORG, "probe").await;
    sub.until(|e| matches!(&e.payload, Some(Payload::JobCreated(j)) if j.id == job.id))
        .await;
    t0.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn bus_connected(node: &support::TestServer) -> bool {
    get_text(node, "/metrics")
        .await
        .lines()
        .any(|l| l == "orgpulse_bus_connected 1")
}

/// NATS killed while events flow and restarted later: the subscriber on A gets every write made
/// through B (during the outage from the store), exactly once, in order; once NATS is back the
/// nodes reconnect by themselves and cross-node latency is back on the fast path.
#[tokio::test]
async fn nats_killed_mid_stream_and_restarted_loses_and_duplicates_nothing() {
    if !services_or_skip(true) {
        return;
    }
    let mut nats = NatsServer::start().await;
    let cluster = Cluster::start_on(&nats.url(), 2, &[]).await;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let t = token(ORG, "alice", "admin");
    let mut sub = Sub::open(a, &t, ORG, "", &[]).await.unwrap();
    sub.caught_up().await;
    let mut before = vec![];
    for _ in 0..10 {
        before.push(cross_node_latency(b, &t, &mut sub).await);
    }
    let fast = median(before);

    // Writes in flight while NATS dies, and more during the outage.
    let writer = {
        let (url, t) = (b.url.clone(), t.clone());
        tokio::spawn(async move {
            let mut jobs = jobs_at(url, &t).await;
            for i in 0..200 {
                jobs.create_job(orgpulse::proto::CreateJobRequest {
                    org_id: ORG.into(),
                    title: format!("during {i}"),
                    ..Default::default()
                })
                .await
                .unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    nats.kill().await;
    let deadline = Instant::now() + WAIT;
    while bus_connected(a).await || bus_connected(b).await {
        assert!(
            Instant::now() < deadline,
            "the nodes never noticed NATS died: A {}, B {}",
            bus_connected(a).await,
            bus_connected(b).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        get_text(a, "/metrics")
            .await
            .contains("bus_state=\"degraded\"")
    );
    writer.await.unwrap();
    let head = log_of(cluster.db_dir(), ORG).last().unwrap().0;
    // Delivered from the store while NATS is down.
    let degraded = cross_node_latency(b, &t, &mut sub).await;
    sub.durable(head as usize + 1).await;
    // The store path's bound: a tail check every 200 ms while degraded (2 s when connected).
    assert!(
        degraded < Duration::from_secs(1),
        "latency while NATS is down: {degraded:?}"
    );

    nats.restart().await;
    while !(bus_connected(a).await && bus_connected(b).await) {
        assert!(
            Instant::now() < deadline + WAIT,
            "the nodes never reconnected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut after = vec![];
    for _ in 0..10 {
        after.push(cross_node_latency(b, &t, &mut sub).await);
    }
    let back = median(after);
    eprintln!("cross-node latency median: {fast:?} before, {degraded:?} degraded, {back:?} after");
    // The fast path, not the tail check (every 2 s while connected).
    assert!(
        back < Duration::from_millis(300),
        "latency after NATS came back: {back:?}"
    );
    let log = log_of(cluster.db_dir(), ORG);
    let got = sub.durable(log.len()).await;
    assert_exactly_once(&got, &log, 1..=log.last().unwrap().0, "alice", &[]);
}

/// `--nats` with an SQLite store is refused at start, with one line that says what to do.
#[tokio::test]
async fn nats_with_sqlite_is_refused_at_start_with_one_clear_line() {
    let dir = support::TempDir::new("nats-sqlite");
    let out = tokio::process::Command::new(support::workspace_bin("orgpulse-server"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--dev",
            "--nats",
            "nats://127.0.0.1:4222",
        ])
        .arg("--database")
        .arg(format!("sqlite://{}", dir.0.join("o.db").display()))
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains("--nats needs") && lines[0].contains("postgres://"),
        "{stderr}"
    );
}
