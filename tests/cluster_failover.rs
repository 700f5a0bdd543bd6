//! End-to-end node death: `orgpulse watch --server A,B,C --json` against three real nodes on one
//! PostgreSQL database and NATS while 300 writes go through all of them; the node the watch is
//! connected to is killed (SIGKILL, or SIGTERM), twice. The watch prints each of the 300 events
//! exactly once, in seq order, as the database holds them.
mod cli_support;
mod cluster_support;
mod support;

use cli_support::*;
use cluster_support::{Cluster, services_or_skip};
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
