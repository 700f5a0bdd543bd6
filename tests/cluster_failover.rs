//! End-to-end node death: `orgpulse watch --server A,B,C --json` against three real nodes on one
//! PostgreSQL database and NATS while 300 writes go through all of them; the node the watch is
//! connected to is killed (SIGKILL, or SIGTERM), twice, or hangs (SIGSTOP). The watch prints each
//! event exactly once, in seq order, as the database holds them.
mod cli_support;
mod cluster_support;
mod support;

use cli_support::*;
use cluster_support::{Cluster, services_or_skip};
use std::time::{Duration, Instant};

use orgpulse::proto::CreateJobRequest;
use support::token;
use tokio::sync::watch;

const ORG: &str = "failover";

#[derive(Clone, Copy, Debug)]
enum Death {
    Kill,
    Terminate,
}

/// The index of the node whose URL the watch's "connected to URL" line names.
fn node_of(cluster: &Cluster, line: &StateLine) -> usize {
    cluster
        .nodes
        .iter()
        .position(|n| line.text.trim_end().ends_with(&n.url))
        .unwrap_or_else(|| panic!("the watch connected to none of the nodes: {}", line.text))
}

async fn watch_survives_node_deaths(death: Death) {
    if !services_or_skip(false) {
        return;
    }
    let mut cluster = Cluster::start(3, &["--heartbeat-interval", "1s"]).await;
    let urls: Vec<String> = cluster.nodes.iter().map(|n| n.url.clone()).collect();
    let admin = token(ORG, "writer", "admin");
    // Writer i starts at node i and fails over to the others.
    let writers: Vec<_> = (0..3)
        .map(|i| {
            let order: Vec<&str> = (0..3).map(|k| urls[(i + k) % 3].as_str()).collect();
            patient_client(&order, &admin)
        })
        .collect();
    let begin = head_cursor(&writers[0]).await;
    let all: Vec<&str> = urls.iter().map(String::as_str).collect();
    let mut w = Watcher::spawn(orgpulse(&all, &token(ORG, "watcher", "viewer")), &["watch"]);
    let mut connected = node_of(&cluster, &w.state("connected to").await);
    w.until(|v| kind_of(v) == "caughtUp").await;

    let (progress_tx, mut progress) = watch::channel(0u64);
    let writing = tokio::spawn(async move {
        for i in 0..300u64 {
            writers[i as usize % 3]
                .create_job(CreateJobRequest {
                    title: format!("job {i}"),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("write {i}: {e}"));
            let _ = progress_tx.send(i + 1);
        }
    });
    let mut dead = vec![];
    for at in [100, 200] {
        tokio::time::timeout(PATIENCE, progress.wait_for(|n| *n >= at))
            .await
            .unwrap()
            .unwrap();
        match death {
            Death::Kill => cluster.nodes[connected].kill().await,
            Death::Terminate => {
                cluster.nodes[connected].terminate().await;
            }
        }
        dead.push(connected);
        connected = node_of(&cluster, &w.state("connected to").await);
        assert!(
            !dead.contains(&connected),
            "the watch connected to a dead node"
        );
    }
    tokio::time::timeout(PATIENCE * 2, writing)
        .await
        .expect("writer finished")
        .unwrap();
    let survivor = &cluster.nodes[connected];
    let log = log_after(survivor, &admin, &begin).await;
    assert_eq!(log.len(), 300, "300 creates, each committed exactly once");
    assert_log_is_the_store(survivor, ORG, &log);
    w.until_seq(log.last().unwrap().seq).await;
    assert_exactly_once(&w.seen, &log);
    assert!(
        w.child.try_wait().unwrap().is_none(),
        "the watch never exits"
    );
    eprintln!("{death:?}: the watch ended on node {connected} after nodes {dead:?} died");
    w.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_survives_sigkill_of_its_node_twice() {
    watch_survives_node_deaths(Death::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_survives_sigterm_of_its_node_twice() {
    watch_survives_node_deaths(Death::Terminate).await;
}

/// The watch's node hangs (SIGSTOP: its sockets stay open, the kernel still accepts connections
/// on its port): the watch notices the silence after `--idle-timeout` and moves to the next
/// endpoint at once, rather than reconnecting to the hung node and waiting there. Events written
/// through the other node reach it within idle-timeout + 3 s of the hang, each exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_leaves_a_hung_node_within_its_idle_timeout() {
    if !services_or_skip(false) {
        return;
    }
    const IDLE: Duration = Duration::from_secs(3);
    let cluster = Cluster::start(2, &["--heartbeat-interval", "1s"]).await;
    let (hung, healthy) = (&cluster.nodes[0], &cluster.nodes[1]);
    let admin = token(ORG, "writer", "admin");
    let writer = patient_client(&[&healthy.url], &admin);
    let begin = head_cursor(&writer).await;
    let mut w = Watcher::spawn(
        orgpulse(&[&hung.url, &healthy.url], &token(ORG, "watcher", "viewer")),
        &["watch", "--idle-timeout", &format!("{}s", IDLE.as_secs())],
    );
    assert_eq!(node_of(&cluster, &w.state("connected to").await), 0);
    w.until(|v| kind_of(v) == "caughtUp").await;
    let write = |i: u64| {
        writer.create_job(CreateJobRequest {
            title: format!("job {i}"),
            ..Default::default()
        })
    };
    for i in 0..5 {
        write(i).await.unwrap();
    }
    let before = log_after(healthy, &admin, &begin).await;
    w.until_seq(before.last().unwrap().seq).await;

    let paused = hung.pause();
    let hang = Instant::now();
    for i in 5..10 {
        write(i).await.unwrap();
    }
    let log = log_after(healthy, &admin, &begin).await;
    assert_eq!(log.len(), 10);
    w.until_seq(log.last().unwrap().seq).await;
    let took = hang.elapsed();
    drop(paused);
    eprintln!("events written during the hang reached the watch {took:?} after it began");
    assert!(
        took <= IDLE + Duration::from_secs(3),
        "the watch took {took:?} to get events from the healthy node (idle timeout {IDLE:?})"
    );
    w.drain_states();
    let last_connected = w
        .stderr
        .iter()
        .rev()
        .find(|l| l.text.contains("connected to"))
        .unwrap();
    assert_eq!(node_of(&cluster, last_connected), 1, "the watch moved on");
    assert_log_is_the_store(healthy, ORG, &log);
    assert_exactly_once(&w.seen, &log);
    w.kill().await;
}
