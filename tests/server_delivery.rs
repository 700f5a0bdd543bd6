//! Delivery end to end: every durable event exactly once and in seq order, checked against the
//! log in the server's store, across live streaming, resume, restart, resync, snapshots,
//! slow consumers and token expiry.
mod support;

use orgpulse::proto::{
    DeleteJobRequest, JobStatus, ListJobsRequest, UpdateJobRequest, event::Payload,
};
use support::*;
use tonic::Code;

const ORG: &str = "acme";

#[tokio::test]
async fn changes_reach_every_subscriber_in_order_and_notifications_only_their_user() {
    let server = TestServer::start().await;
    let admin = token(ORG, "alice", "admin");
    let bob = token(ORG, "bob", "member");
    let mut alice_sub = Sub::open(&server, &admin, "", "", &[]).await.unwrap();
    let start = alice_sub.caught_up().await.cursor;
    let mut bob_sub = Sub::open(&server, &bob, "", "", &[]).await.unwrap();
    bob_sub.caught_up().await;
    let mut jobs_only = Sub::open(&server, &bob, "", "", &[1]).await.unwrap();
    jobs_only.caught_up().await;

    let job = create_job(&server, &admin, "", "build").await;
    let mut jobs = server.jobs(&admin).await;
    let running = jobs
        .update_job(UpdateJobRequest {
            job_id: job.id.clone(),
            status: Some(JobStatus::Running as i32),
            progress: Some(40),
            message: Some("compiling".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(running.version, 2);
    notify(&server, &admin, "bob", "for bob").await;
    notify(&server, &admin, "carol", "for carol").await;
    notify(&server, &admin, "", "for all").await;
    jobs.delete_job(DeleteJobRequest {
        org_id: "".into(),
        job_id: job.id.clone(),
    })
    .await
    .unwrap();

    let a = alice_sub.durable(4).await;
    let names: Vec<String> = a.iter().map(payload_name).collect();
    assert_eq!(
        names,
        [
            "job_created",
            "job_updated",
            "notification_new",
            "job_deleted"
        ]
    );
    match &a[1].payload {
        Some(Payload::JobUpdated(j)) => {
            assert_eq!(
                (j.status(), j.progress, j.message.as_str()),
                (JobStatus::Running, 40, "compiling")
            );
            assert_eq!(a[1].actor, "alice");
        }
        p => panic!("{p:?}"),
    }
    let b = bob_sub.durable(5).await;
    let names: Vec<String> = b.iter().map(payload_name).collect();
    assert_eq!(
        names,
        [
            "job_created",
            "job_updated",
            "notification_new",
            "notification_new",
            "job_deleted"
        ]
    );
    let titles: Vec<&str> = b
        .iter()
        .filter_map(|e| match &e.payload {
            Some(Payload::NotificationNew(n)) => Some(n.title.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(titles, ["for bob", "for all"]);
    let j = jobs_only.durable(3).await;
    assert!(
        j.iter()
            .all(|e| !matches!(e.payload, Some(Payload::NotificationNew(_))))
    );

    let log = log_of(&server.dir, ORG);
    assert_eq!(log.len(), 6);
    assert_exactly_once(&a, &log, 1..=6, "alice", &[]);
    assert_exactly_once(&b, &log, 1..=6, "bob", &[]);
    assert_exactly_once(&j, &log, 1..=6, "bob", &[1]);
    assert!(!start.is_empty());
}

/// Writes `n` job changes in ORG; returns nothing (the log is the record).
async fn write_n(server: &TestServer, token: &str, n: usize) {
    let mut jobs = server.jobs(token).await;
    let job = create_job(server, token, "", "counter").await;
    for i in 1..n {
        jobs.update_job(UpdateJobRequest {
            job_id: job.id.clone(),
            progress: Some((i % 101) as u32),
            ..Default::default()
        })
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn resume_after_disconnect_and_after_restart() {
    let mut server = TestServer::start().await;
    let t = token(ORG, "alice", "member");
    let mut sub = Sub::open(&server, &t, "", "", &[]).await.unwrap();
    sub.caught_up().await;
    write_n(&server, &t, 5).await;
    let first = sub.durable(5).await;
    let cursor = first.last().unwrap().cursor.clone();
    drop(sub);

    write_n(&server, &t, 100).await;
    let mut resumed = Sub::open(&server, &t, "", &cursor, &[]).await.unwrap();
    let replay = resumed.durable(100).await;
    let next = resumed.next().await.unwrap();
    assert_eq!(
        payload_name(&next),
        "caught_up",
        "caught_up right after the 100"
    );
    let log = log_of(&server.dir, ORG);
    assert_exactly_once(&replay, &log, 6..=105, "alice", &[]);
    // then live
    create_job(&server, &t, "", "live").await;
    let live = resumed.until(|e| e.seq > 0).await;
    assert_eq!(live.seq, 106);
    let resume_from = live.cursor.clone();
    drop(resumed);

    // The log is durable: restart and resume again.
    server.terminate().await;
    server.restart().await;
    write_n(&server, &t, 20).await;
    let mut after = Sub::open(&server, &t, "", &resume_from, &[]).await.unwrap();
    let got = after.durable(20).await;
    after.caught_up().await;
    assert_exactly_once(&got, &log_of(&server.dir, ORG), 107..=126, "alice", &[]);
}

#[tokio::test]
async fn a_replay_comes_framed_together_exactly_once() {
    // A resume's replay is handed to HTTP/2 a page at a time, many events to a DATA frame (a
    // frame per event made a 100,000-event catch-up three times slower).
    let server = TestServer::start().await;
    let t = token(ORG, "alice", "member");
    let before = snapshot(&server, &t).await.cursor;
    write_n(&server, &t, 300).await;
    let tcp = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!(
        "http://{}/orgpulse.v1.EventService/Subscribe",
        server.addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("authorization", format!("Bearer {t}"))
    .body(())
    .unwrap();
    let (res, mut body) = send
        .ready()
        .await
        .unwrap()
        .send_request(req, false)
        .unwrap();
    let filter = orgpulse::proto::OrgFilter {
        org_id: ORG.into(),
        after_cursor: before,
        ..Default::default()
    };
    let mut msg = vec![0u8];
    msg.extend((prost::Message::encoded_len(&filter) as u32).to_be_bytes());
    msg.extend(prost::Message::encode_to_vec(&filter));
    body.send_data(msg.into(), true).unwrap();
    let mut stream = res.await.unwrap().into_body();
    let (mut frames, mut buf, mut replay) = (0, Vec::new(), Vec::new());
    'read: while let Some(data) = tokio::time::timeout(WAIT, stream.data()).await.unwrap() {
        let data = data.unwrap();
        let _ = stream.flow_control().release_capacity(data.len());
        frames += 1;
        buf.extend_from_slice(&data);
        while buf.len() >= 5 {
            let len = u32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize;
            if buf.len() < 5 + len {
                break;
            }
            let ev: orgpulse::proto::Event = prost::Message::decode(&buf[5..5 + len]).unwrap();
            buf.drain(..5 + len);
            match payload_name(&ev).as_str() {
                "caught_up" => break 'read,
                _ if ev.seq > 0 => replay.push(ev),
                _ => {}
            }
        }
    }
    assert_exactly_once(&replay, &log_of(&server.dir, ORG), 1..=300, "alice", &[]);
    assert!(
        frames <= 30,
        "300 replayed events (~60 KB) came in {frames} DATA frames"
    );
}

#[tokio::test]
async fn stale_or_foreign_cursors_get_resync_and_malformed_is_invalid() {
    let server = TestServer::start_args(&["--retention", "1s"]).await;
    let t = token(ORG, "alice", "member");
    write_n(&server, &t, 3).await;
    let old = cursor_at(&snapshot(&server, &t).await.cursor, 1);
    // Wait until retention trimmed the log (the server trims on its own timer).
    let deadline = std::time::Instant::now() + WAIT;
    while !log_of(&server.dir, ORG).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "retention never trimmed the log"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let mut sub = Sub::open(&server, &t, "", &old, &[]).await.unwrap();
    let first = sub.next().await.unwrap();
    assert_eq!(payload_name(&first), "resync", "{first:?}");
    assert_eq!(first.seq, 0);
    let caught = sub.caught_up().await;
    create_job(&server, &t, "", "after resync").await;
    let live = sub.until(|e| e.seq > 0).await;
    assert_eq!(live.seq, 4, "live from now, no partial replay");
    assert_eq!(sub.durable_seen().len(), 1);
    assert!(!caught.cursor.is_empty());

    // A cursor of another database (another epoch).
    let other = TestServer::start().await;
    write_n(&other, &t, 2).await;
    let foreign = snapshot(&other, &t).await.cursor;
    let mut sub = Sub::open(&server, &t, "", &foreign, &[]).await.unwrap();
    assert_eq!(payload_name(&sub.next().await.unwrap()), "resync");

    let err = Sub::open(&server, &t, "", "garbage!", &[])
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// Retention trims the log while a replay is held between pages (the client stopped reading, so
/// flow control holds the server): the rest of the replay is a `resync` to the head, never a
/// silent jump from the events already sent to live.
#[tokio::test]
async fn retention_trimming_a_paused_replay_yields_resync_not_a_gap() {
    use futures::StreamExt;
    // Retention long enough that writing the events below cannot outlast it on a loaded machine
    // (they must all be in the log when the replay starts).
    let retention = std::time::Duration::from_secs(30);
    let server = TestServer::start_args(&["--retention", "30s"]).await;
    let t = token(ORG, "alice", "admin");
    let start = snapshot(&server, &t).await.cursor;
    // 3000 events (~500 KB): several replay pages, far more than the windows below hold.
    let n = 3000u64;
    let jobs = server.jobs(&t).await;
    futures::stream::iter(0..n)
        .map(|i| {
            let mut jobs = jobs.clone();
            async move {
                jobs.create_job(orgpulse::proto::CreateJobRequest {
                    title: format!("job {i}"),
                    ..Default::default()
                })
                .await
                .unwrap()
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let log = log_of(&server.dir, ORG);
    assert_eq!(log.len() as u64, n);
    // A 64 KiB stream window: the server can send only a few hundred events ahead of the reader.
    let channel = tonic::transport::Endpoint::from_shared(server.url.clone())
        .unwrap()
        .initial_stream_window_size(64 * 1024)
        .connect()
        .await
        .unwrap();
    let mut sub = Sub::open_on(channel, &t, "", &start, &[]).await.unwrap();
    assert_eq!(sub.next().await.unwrap().seq, 1, "the cursor was served");
    // Meanwhile retention trims the whole log.
    let deadline = std::time::Instant::now() + retention + WAIT;
    while !log_of(&server.dir, ORG).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "retention never trimmed the log"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let control = sub.until(|e| e.seq == 0).await;
    assert_eq!(payload_name(&control), "resync", "{control:?}");
    let sent = sub.durable_seen().len() as u64;
    assert!(sent < n, "the replay was not held mid-way ({sent} sent)");
    // What came before the resync is seamless, and the resync resumes from the head.
    assert_exactly_once(&sub.seen, &log, 1..=sent, "alice", &[]);
    assert_eq!(control.cursor, cursor_at(&start, n));
    assert_eq!(payload_name(&sub.next().await.unwrap()), "caught_up");
    create_job(&server, &t, "", "live").await;
    assert_eq!(
        sub.until(|e| e.seq > 0).await.seq,
        n + 1,
        "live from the head"
    );
}

/// Every job of the org (the test keeps them under one 500-job page).
async fn one_page(server: &TestServer, token: &str) -> orgpulse::proto::ListJobsResponse {
    let page = server
        .jobs(token)
        .await
        .list_jobs(ListJobsRequest {
            page_size: 500,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(page.next_page_token.is_empty(), "all jobs fit one page");
    page
}

#[tokio::test]
async fn snapshot_then_stream_loses_and_duplicates_nothing_under_concurrent_writes() {
    let server = TestServer::start().await;
    let t = token(ORG, "alice", "admin");
    for i in 0..20 {
        create_job(&server, &t, "", &format!("seed {i}")).await;
    }
    // Writers keep changing jobs while we take the snapshot and subscribe.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = vec![];
    for w in 0..3 {
        let (url_server, t, stop) = (server.url.clone(), t.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut jobs = jobs_at(url_server, &t).await;
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 400 {
                let j = jobs
                    .create_job(orgpulse::proto::CreateJobRequest {
                        title: format!("w{w}-{n}"),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner();
                jobs.update_job(UpdateJobRequest {
                    job_id: j.id.clone(),
                    progress: Some(50),
                    ..Default::default()
                })
                .await
                .unwrap();
                if n.is_multiple_of(3) {
                    jobs.delete_job(DeleteJobRequest {
                        org_id: "".into(),
                        job_id: j.id,
                    })
                    .await
                    .unwrap();
                }
                n += 1;
            }
        }));
    }
    // Wait until the writers are demonstrably running (the log grows), then snapshot.
    while log_of(&server.dir, ORG).len() < 60 {
        tokio::task::yield_now().await;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let snap = one_page(&server, &t).await;
    let mut state: std::collections::BTreeMap<String, orgpulse::proto::Job> =
        snap.jobs.into_iter().map(|j| (j.id.clone(), j)).collect();
    let mut sub = Sub::open(&server, &t, "", &snap.cursor, &[]).await.unwrap();
    sub.caught_up().await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let head = log_of(&server.dir, ORG).last().unwrap().0;
    let marker = create_job(&server, &t, "", "marker").await;
    sub.until(|e| matches!(&e.payload, Some(Payload::JobCreated(j)) if j.id == marker.id))
        .await;
    let got = sub.durable_seen();
    let from = got.first().map(|e| e.seq).unwrap_or(head + 1);
    assert_exactly_once(
        &got,
        &log_of(&server.dir, ORG),
        from..=head + 1,
        "alice",
        &[],
    );
    // Nothing before the snapshot's position, nothing missing after it.
    let snap_seq = from - 1;
    assert_eq!(
        cursor_at(&snap.cursor, snap_seq),
        snap.cursor,
        "stream starts right after the snapshot"
    );
    for e in &got {
        match &e.payload {
            Some(Payload::JobCreated(j)) | Some(Payload::JobUpdated(j)) => {
                state.insert(j.id.clone(), j.clone());
            }
            Some(Payload::JobDeleted(d)) => {
                state.remove(&d.job_id);
            }
            _ => {}
        }
    }
    let now = one_page(&server, &t).await;
    let mut final_state: Vec<_> = now.jobs;
    final_state.sort_by(|a, b| a.id.cmp(&b.id));
    let rebuilt: Vec<_> = state.into_values().collect();
    assert_eq!(rebuilt, final_state, "snapshot + stream == current state");
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_is_cut_off_and_others_keep_up() {
    let server = TestServer::start_args(&["--subscriber-queue", "16"]).await;
    let t = token(ORG, "alice", "member");
    // The stalled client grants the server only the minimum HTTP/2 window.
    let small = tonic::transport::Endpoint::from_shared(server.url.clone())
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let mut stalled = Sub::open_on(small, &t, "", "", &[]).await.unwrap();
    stalled.caught_up().await;
    let mut reader = Sub::open(&server, &t, "", "", &[]).await.unwrap();
    reader.caught_up().await;
    // ~10 KB events, enough to fill the stalled stream's HTTP/2 window, the server's send buffer
    // and its queue many times over.
    let n = 400;
    let writer = {
        let url = server.url.clone();
        let t = t.clone();
        tokio::spawn(async move {
            let mut jobs = jobs_at(url, &t).await;
            for i in 0..n {
                let labels = (0..32)
                    .map(|l| (format!("label-{l}"), "v".repeat(256)))
                    .collect();
                jobs.create_job(orgpulse::proto::CreateJobRequest {
                    title: format!("padding {i}"),
                    labels,
                    ..Default::default()
                })
                .await
                .unwrap();
            }
        })
    };
    let got = reader.durable(n).await;
    writer.await.unwrap();
    assert_exactly_once(&got, &log_of(&server.dir, ORG), 1..=n as u64, "alice", &[]);
    // The stalled one: whatever it had buffered, then UNAVAILABLE "too slow".
    let err = stalled.error().await;
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("too slow"), "{err:?}");
    let before_cut = stalled.durable_seen();
    assert!(
        before_cut.len() < n,
        "the stalled subscriber was cut before the end"
    );
    assert_exactly_once(
        &before_cut,
        &log_of(&server.dir, ORG),
        1..=before_cut.len() as u64,
        "alice",
        &[],
    );
    let metrics = get_text(&server, "/metrics").await;
    assert!(
        metrics.contains("orgpulse_slow_subscriber_disconnects_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn token_expiry_ends_the_stream_and_a_fresh_token_resumes_losslessly() {
    let server = TestServer::start().await;
    let writer = token(ORG, "w", "member");
    let short = token_ttl(ORG, "alice", "viewer", 2);
    let mut sub = Sub::open(&server, &short, "", "", &[]).await.unwrap();
    sub.caught_up().await;
    write_n(&server, &writer, 3).await;
    let err = sub.error().await;
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(err.message(), "token expired");
    assert_token_expired_marker(&err);
    let got = sub.durable_seen();
    assert_eq!(got.len(), 3);
    write_n(&server, &writer, 10).await;
    let mut again = Sub::open(
        &server,
        &token(ORG, "alice", "viewer"),
        "",
        &got[2].cursor,
        &[],
    )
    .await
    .unwrap();
    let more = again.durable(10).await;
    let mut all = got.clone();
    all.extend(more);
    assert_exactly_once(&all, &log_of(&server.dir, ORG), 1..=13, "alice", &[]);
}

/// Concurrent updates of the same jobs share the store's group commits (on PostgreSQL a batch
/// reads all its rows ahead in one round trip): each update must still see the ones committed
/// or batched before it, so every version is handed out once and the last wins, while deletes
/// mixed in are seen by the updates after them.
#[tokio::test]
async fn concurrent_updates_of_one_job_each_see_the_previous_one() {
    let server = TestServer::start().await;
    let admin = token(ORG, "alice", "admin");
    let mut sub = Sub::open(&server, &admin, "", "", &[]).await.unwrap();
    sub.caught_up().await;
    let hot = create_job(&server, &admin, "", "hot").await;
    let doomed = create_job(&server, &admin, "", "doomed").await;
    let (writers, updates) = (8u32, 40u32);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut jobs = server.jobs(&admin).await;
        let (hot, doomed) = (hot.id.clone(), doomed.id.clone());
        tasks.push(tokio::spawn(async move {
            let mut versions = Vec::new();
            for i in 0..updates {
                let job = jobs
                    .update_job(UpdateJobRequest {
                        job_id: hot.clone(),
                        message: Some(format!("hot {w}.{i}")),
                        ..Default::default()
                    })
                    .await
                    .expect("update of the hot job")
                    .into_inner();
                versions.push(job.version);
                if w == 0 && i == updates / 2 {
                    jobs.delete_job(DeleteJobRequest {
                        org_id: "".into(),
                        job_id: doomed.clone(),
                    })
                    .await
                    .expect("delete");
                } else {
                    let after_delete = jobs
                        .update_job(UpdateJobRequest {
                            job_id: doomed.clone(),
                            message: Some(format!("{w}.{i}")),
                            ..Default::default()
                        })
                        .await;
                    if let Err(status) = after_delete {
                        assert_eq!(status.code(), Code::NotFound, "{status:?}");
                    }
                }
            }
            versions
        }));
    }
    let mut versions = Vec::new();
    for t in tasks {
        versions.extend(t.await.unwrap());
    }
    versions.sort_unstable();
    let expected: Vec<u64> = (2..2 + u64::from(writers * updates)).collect();
    assert_eq!(versions, expected, "every update saw the one before it");
    // The stream agrees with the log (each event once, in seq order), and in seq order the hot
    // job's versions are 1, 2, 3, ... and nothing updated the doomed job after its deletion.
    let log = log_of(&server.dir, ORG);
    let received = sub.durable(log.len()).await;
    assert_exactly_once(&received, &log, 1..=u64::MAX, "alice", &[]);
    let mut hot_versions = Vec::new();
    let mut doomed_deleted = false;
    for ev in received {
        match ev.payload {
            Some(Payload::JobCreated(j)) | Some(Payload::JobUpdated(j)) if j.id == hot.id => {
                hot_versions.push(j.version)
            }
            Some(Payload::JobUpdated(j)) if j.id == doomed.id => {
                assert!(!doomed_deleted, "an update after the delete: {j:?}")
            }
            Some(Payload::JobDeleted(d)) if d.job_id == doomed.id => doomed_deleted = true,
            _ => {}
        }
    }
    assert!(doomed_deleted);
    let in_order: Vec<u64> = (1..=1 + u64::from(writers * updates)).collect();
    assert_eq!(hot_versions, in_order);
}
