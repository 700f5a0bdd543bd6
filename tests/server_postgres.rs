//! What only the PostgreSQL store has: several nodes on one database (migrated once, one log
//! epoch, one gapless seq per org across nodes, so a cursor taken on one node resumes on another)
//! and a database that goes away while the server runs (calls fail with UNAVAILABLE, open streams
//! stay open, writes after recovery arrive). These run in CI's PostgreSQL pass
//! (`ORGPULSE_TEST_STORE=postgres`) and say they are skipped otherwise.
mod support;

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
