//! `--demo`: the workload in org `demo` leaves no job queued or running once it stops, and what it
//! wrote replays exactly once, in seq order, from its log.
mod support;

use orgpulse::proto::{JobStatus, event::Payload};
use support::*;

#[tokio::test]
async fn demo_jobs_are_finished_when_the_demo_stops() {
    let mut demo = TestServer::start_args(&["--demo"]).await;
    let admin = token("demo", "alice", "admin");
    let mut sub = Sub::open(&demo, &admin, "", "", &[]).await.unwrap();
    let start = sub.caught_up().await.cursor;
    sub.until(|e| match &e.payload {
        Some(Payload::JobUpdated(j)) => j.status() == JobStatus::Running,
        _ => false,
    })
    .await;
    demo.terminate().await;

    // The same data directory, without the demo.
    let after = TestServer::start_with(ServerOpts {
        dir: Some(demo.dir.clone()),
        ..Default::default()
    })
    .await;
    let jobs = snapshot(&after, &admin).await.jobs;
    assert!(!jobs.is_empty());
    for job in &jobs {
        assert!(
            !matches!(job.status(), JobStatus::Queued | JobStatus::Running),
            "left {:?}: {job:?}",
            job.status()
        );
    }
    assert!(
        jobs.iter()
            .any(|j| j.status() == JobStatus::Cancelled && j.message == "demo stopped"),
        "{jobs:?}"
    );

    let from = cursor_at(&start, 0);
    let mut replay = Sub::open(&after, &admin, "", &from, &[]).await.unwrap();
    replay.caught_up().await;
    let log = log_of(&after.dir, "demo");
    assert_exactly_once(&replay.seen, &log, 1..=u64::MAX, "alice", &[]);
}
