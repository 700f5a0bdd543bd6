//! What only the PostgreSQL store has: several nodes on one database (migrated once, one log
//! epoch, one gapless seq per org across nodes, so a cursor taken on one node resumes on another)
//! and a database that goes away while the server runs (calls fail with UNAVAILABLE, open streams
//! stay open, writes after recovery arrive), or whose connections are killed while writes flow
//! (refused writes are UNAVAILABLE, the stream gets every committed event once). These run in
//! CI's PostgreSQL pass
//! (`ORGPULSE_TEST_STORE=postgres`) and say they are skipped otherwise.
mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use orgpulse::proto::{CreateJobRequest, ListJobsRequest};
use support::*;
use tonic::Code;

const ORG: &str = "acme";

#[tokio::test]
async fn two_nodes_on_one_database_migrate_once_share_the_log_and_its_cursors() {
    if skip_unless_postgres() {
        return;
    }
    let dir = TempDir::new("two-nodes");
    database_url(&dir.0);
    let node = |dir: std::path::PathBuf| {
        TestServer::start_with(ServerOpts {
            dir: Some(dir),
            ..Default::default()
        })
    };
    // Both start on the fresh database at once: the migration runs once.
    let (a, b) = tokio::join!(node(dir.0.clone()), node(dir.0.clone()));
    let versions: i64 = on_database(&dir.0, |c| async move {
        Ok(c.query_one("SELECT COUNT(*) FROM schema_version", &[])
            .await?
            .get(0))
    });
    assert_eq!(versions, 1, "one row per schema version");

    let admin = token(ORG, "alice", "admin");
    let mut on_a = Sub::open(&a, &admin, "", "", &[]).await.unwrap();
    let from = on_a.caught_up().await.cursor;
    // Concurrent writes through both nodes: one gapless seq for the org.
    let writes = (0..40).map(|i| {
        let (url, admin) = (if i % 2 == 0 { &a } else { &b }.url.clone(), admin.clone());
        tokio::spawn(async move {
            jobs_at(url, &admin)
                .await
                .create_job(CreateJobRequest {
                    title: format!("job {i}"),
                    ..Default::default()
                })
                .await
                .expect("create_job")
        })
    });
    for w in futures::future::join_all(writes).await {
        w.unwrap();
    }
    let log = log_of(&dir.0, ORG);
    let seqs: Vec<u64> = log.iter().map(|e| e.0).collect();
    assert_eq!(seqs, (1..=40).collect::<Vec<u64>>(), "no gap, no repeat");

    // A cursor from node A resumes on node B: same epoch, same log.
    let mut on_b = Sub::open(&b, &admin, "", &from, &[]).await.unwrap();
    on_b.caught_up().await;
    assert_exactly_once(&on_b.durable_seen(), &log, 1..=40, "alice", &[]);
}

#[tokio::test]
async fn while_the_database_is_gone_calls_are_unavailable_and_streams_stay_open() {
    if skip_unless_postgres() {
        return;
    }
    let server = TestServer::start().await;
    let admin = token(ORG, "alice", "admin");
    let mut sub = Sub::open(&server, &admin, "", "", &[]).await.unwrap();
    sub.caught_up().await;
    create_job(&server, &admin, "", "before").await;
    sub.durable(1).await;

    let outage = StoreOutage::start(&server.dir);
    let mut jobs = server.jobs(&admin).await;
    for _ in 0..3 {
        let err = jobs
            .create_job(CreateJobRequest {
                title: "during".into(),
                ..Default::default()
            })
            .await
            .expect_err("no database, no write");
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    }
    let err = jobs
        .list_jobs(ListJobsRequest::default())
        .await
        .expect_err("no database, no read");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    drop(outage);
    create_job(&server, &admin, "", "after").await;
    // The same stream, still open, gets the write made after recovery.
    let got = sub.durable(2).await;
    assert_exactly_once(&got, &log_of(&server.dir, ORG), 1..=2, "alice", &[]);
}

/// Waits (bounded) until `counter` is above `floor`.
async fn grows(counter: &AtomicU64, floor: u64, what: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while counter.load(Relaxed) <= floor {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn killed_connections_refuse_writes_as_unavailable_and_the_stream_gets_each_commit_once() {
    if skip_unless_postgres() {
        return;
    }
    let server = TestServer::start().await;
    let admin = token(ORG, "alice", "admin");
    let mut sub = Sub::open(&server, &admin, "", "", &[]).await.unwrap();
    sub.caught_up().await;
    // One job after another until told to stop; a refusal must be UNAVAILABLE (retryable).
    let (stop, ok, refused) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let writer = tokio::spawn({
        let mut jobs = server.jobs(&admin).await;
        let (stop, ok, refused) = (stop.clone(), ok.clone(), refused.clone());
        async move {
            while !stop.load(Relaxed) {
                let write = jobs.create_job(CreateJobRequest {
                    title: "while killed".into(),
                    ..Default::default()
                });
                match write.await {
                    Ok(_) => ok.fetch_add(1, Relaxed),
                    Err(e) if e.code() == Code::Unavailable => refused.fetch_add(1, Relaxed),
                    Err(e) => panic!("a write failed otherwise than UNAVAILABLE: {e:?}"),
                };
            }
        }
    });
    // Kill every backend of the database (the server's pool and writer) while writes flow,
    // again each time a write has committed since, until writes were refused in at least three
    // rounds (bounded: 200 rounds).
    let mut rounds = 0;
    while refused.load(Relaxed) < 3 {
        rounds += 1;
        assert!(rounds <= 200, "200 rounds of kills refused no write");
        grows(&ok, ok.load(Relaxed), "a write commits between the kills").await;
        let dir = server.dir.clone();
        tokio::task::spawn_blocking(move || terminate_backends(&dir))
            .await
            .unwrap();
    }
    // Recovered without a restart: writes commit again.
    grows(&ok, ok.load(Relaxed), "a write commits after the kills").await;
    stop.store(true, Relaxed);
    writer.await.unwrap();
    for i in 0..20 {
        create_job(&server, &admin, "", &format!("after {i}")).await;
    }
    // The same stream, never ended, has each committed event (refused writes whose COMMIT went
    // through included) once, in seq order.
    let log = log_of(&server.dir, ORG);
    assert!(
        log.len() as u64 >= ok.load(Relaxed) + 20,
        "every answered write is in the log"
    );
    let got = sub.durable(log.len()).await;
    let head = log.last().unwrap().0;
    assert_exactly_once(&got, &log, 1..=head, "alice", &[]);
    assert_eq!(head, log.len() as u64, "no gap in the log");
    // The pool is in /metrics.
    let metrics = get_text(&server, "/metrics").await;
    assert!(
        metrics.contains("orgpulse_store_pool_max_connections 8"),
        "{metrics}"
    );
    for m in ["connections", "available", "waiting"] {
        let name = format!("orgpulse_store_pool_{m} ");
        assert!(
            metrics.lines().any(|l| l.starts_with(&name)),
            "{name} in {metrics}"
        );
    }
}

/// The `IF NOT EXISTS` of the migration makes PostgreSQL send a NOTICE on every start but the
/// first; logged, it read like an error.
#[tokio::test]
async fn a_second_start_on_a_migrated_database_logs_no_notice() {
    if skip_unless_postgres() {
        return;
    }
    let dir = TempDir::new("second-start");
    let secret = dir.0.join("jwt-secret");
    std::fs::write(&secret, SECRET).unwrap();
    let args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--database",
        &database_url(&dir.0),
        "--jwt-secret-file",
        secret.to_str().unwrap(),
    ]
    .map(String::from)
    .into();
    let info = vec![("RUST_LOG".to_string(), "info".to_string())];
    for _first_then_second in 0..2 {
        let logs = TestServer::spawn_in_env(args.clone(), dir.0.clone(), true, info.clone())
            .await
            .stop_and_read_stderr()
            .await;
        assert!(
            logs.contains("engines ready"),
            "info logs were read: {logs}"
        );
        assert!(!logs.contains("NOTICE"), "{logs}");
    }
}
