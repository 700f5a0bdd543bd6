//! A stuck peer costs the others bounded time: three real nodes on one PostgreSQL database and
//! NATS, writes to one org through all of them, and the node that writes hardest is paused
//! (SIGSTOP) for 8 s, mostly while its writer holds the org's log lock. The two healthy nodes keep
//! committing: no gap between two acknowledged writes on either is longer than 3 s. A subscriber on
//! a healthy node then holds every event of the log exactly once, in seq order.
mod cluster_support;
mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use cluster_support::{Cluster, services_or_skip};
use orgpulse::proto::{CreateJobRequest, UpdateJobRequest};
use support::*;
use tokio::{sync::watch, time::Instant};

const ORG: &str = "paused";
const PAUSE: Duration = Duration::from_secs(8);
/// The longest the healthy nodes may go without an acknowledged write.
const MAX_GAP: Duration = Duration::from_secs(3);
/// Bound of one write call, so a write stuck on the paused node cannot hang the test.
const CALL: Duration = Duration::from_secs(20);

fn signal(server: &TestServer, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &server.pid().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

/// The longest stretch within `from..to` without an acknowledgement in `acks` (sorted).
fn longest_gap(acks: &[Instant], from: Instant, to: Instant) -> Duration {
    let mut last = from;
    let mut longest = Duration::ZERO;
    for &t in acks.iter().filter(|t| **t > from && **t <= to) {
        longest = longest.max(t - last);
        last = t;
    }
    longest.max(to.saturating_duration_since(last))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_does_not_stall_the_writes_of_the_others() {
    if !services_or_skip(false) {
        return;
    }
    let cluster = Cluster::start(3, &["--heartbeat-interval", "1s"]).await;
    let admin = token(ORG, "writer", "admin");
    let begin = cluster.nodes[0]
        .jobs(&admin)
        .await
        .list_jobs(orgpulse::proto::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .cursor;
    let mut sub = Sub::open(
        &cluster.nodes[0],
        &token(ORG, "watcher", "viewer"),
        "",
        &begin,
        &[],
    )
    .await
    .unwrap();
    sub.caught_up().await;

    let stop = Arc::new(AtomicBool::new(false));
    // The node to pause updates 8 jobs concurrently: its writer is nearly always inside a
    // transaction that holds the org's counter row while it reads the jobs it updates.
    let paused_url = cluster.nodes[2].url.clone();
    let mut tasks = vec![];
    for i in 0..8 {
        let mut jobs = jobs_at(paused_url.clone(), &admin).await;
        let job = jobs
            .create_job(CreateJobRequest {
                title: format!("updated {i}"),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let update = UpdateJobRequest {
                    job_id: job.id.clone(),
                    title: Some(format!("update {n}")),
                    ..Default::default()
                };
                // Refused or cut off around the pause: the next one goes on.
                let _ = tokio::time::timeout(CALL, jobs.update_job(update)).await;
            }
        }));
    }
    // Each healthy node: two writers creating jobs, every acknowledgement timed.
    let acks: Vec<Arc<watch::Sender<Vec<Instant>>>> =
        (0..2).map(|_| Arc::new(watch::Sender::default())).collect();
    for (node, acks) in acks.iter().enumerate() {
        for _ in 0..2 {
            let mut jobs = jobs_at(cluster.nodes[node].url.clone(), &admin).await;
            let (stop, acks) = (stop.clone(), acks.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let create = CreateJobRequest {
                        title: "created".into(),
                        ..Default::default()
                    };
                    match tokio::time::timeout(CALL, jobs.create_job(create)).await {
                        Ok(Ok(_)) => acks.send_modify(|a| a.push(Instant::now())),
                        // UNAVAILABLE ("database busy, retry") is an answer; try again.
                        Ok(Err(status)) => assert_eq!(
                            status.code(),
                            tonic::Code::Unavailable,
                            "a healthy node's write failed: {status}"
                        ),
                        Err(_) => panic!("a healthy node's write took over {CALL:?}"),
                    }
                }
            }));
        }
    }
    let acked = |node: usize| acks[node].borrow().len();
    let reach = async |counts: [usize; 2]| {
        for (node, n) in counts.into_iter().enumerate() {
            let mut rx = acks[node].subscribe();
            let reached = tokio::time::timeout(WAIT, rx.wait_for(|a| a.len() >= n)).await;
            assert!(reached.is_ok(), "node{node} acknowledged {n} writes");
        }
    };
    reach([20, 20]).await;

    // Pause node2 at a moment its writer holds the org's counter row (checked in pg_locks: its
    // connections show as orgpulse-node2), so the test always exercises the stall.
    let mut tries = 0;
    let paused_at = loop {
        signal(&cluster.nodes[2], "-STOP");
        let paused_at = Instant::now();
        if holds_org_log(&cluster, "orgpulse-node2") {
            break paused_at;
        }
        signal(&cluster.nodes[2], "-CONT");
        tries += 1;
        assert!(
            tries < 50,
            "node2's writer never held the org's log row when paused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("node2 paused holding the org's log row (after {tries} misses)");
    tokio::time::sleep(PAUSE).await;
    signal(&cluster.nodes[2], "-CONT");
    let resumed_at = Instant::now();
    reach([acked(0) + 20, acked(1) + 20]).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }

    for (node, acks) in acks.iter().enumerate() {
        let acks = acks.borrow();
        let gap = longest_gap(&acks, paused_at, resumed_at);
        eprintln!(
            "node{node}: {} writes acknowledged in all, longest gap while node2 was paused {gap:?}",
            acks.len()
        );
        assert!(
            gap <= MAX_GAP,
            "node{node} acknowledged no write for {gap:?} while node2 was paused"
        );
    }

    let log = log_of(cluster.db_dir(), ORG);
    let last = log.last().expect("the log has the writes").0;
    let first = cursor_seq(&begin) + 1;
    while sub.durable_seen().last().map(|e| e.seq) < Some(last) {
        sub.next()
            .await
            .expect("the stream on a healthy node stays open");
    }
    assert_exactly_once(&sub.seen, &log, first..=last, "watcher", &[]);
}

/// Whether a connection named `node` holds a lock on `org_log` (it is in a write transaction).
fn holds_org_log(cluster: &Cluster, node: &str) -> bool {
    let node = node.to_string();
    on_database(cluster.db_dir(), move |c| async move {
        let row = c
            .query_one(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                 WHERE a.application_name = $1 AND l.granted
                   AND l.relation = 'org_log'::regclass",
                &[&node],
            )
            .await?;
        Ok(row.get::<_, i64>(0) > 0)
    })
}

/// The seq a cursor points at (tests know the layout: base64url of 8 bytes epoch + 8 bytes seq).
fn cursor_seq(cursor: &str) -> u64 {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    let b = URL_SAFE_NO_PAD.decode(cursor).expect("cursor");
    u64::from_be_bytes(b[8..16].try_into().unwrap())
}
