//! The Poll fallback (answers at once, waits for the first event, times out empty; at most
//! `--max-polls-per-user` waiting per user; no thread, descriptor or connection kept for a waiting
//! or ended Poll) and presence (user_online / user_offline with the grace period, ListOnline; a
//! poll-only or stream-only user offline within the grace period plus 5 s), end to end.
mod support;

use std::time::{Duration, Instant};

use orgpulse::proto::{PollRequest, PollResponse, event::Payload};
use support::*;
use tonic::{Code, transport::Channel};

const ORG: &str = "acme";

#[tokio::test]
async fn poll_answers_at_once_waits_for_the_first_event_and_times_out_empty() {
    let server = TestServer::start().await;
    let t = token(ORG, "alice", "member");
    let start = snapshot(&server, &t).await.cursor;
    for i in 0..3 {
        create_job(&server, &t, "", &format!("j{i}")).await;
    }
    let mut events = server.events(&t).await;
    // Pending events: at once (wait_ms is long, the answer must not wait for it).
    let t0 = Instant::now();
    let r = events
        .poll(PollRequest {
            after_cursor: start.clone(),
            wait_ms: 30_000,
            max_events: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "pending events are returned without waiting"
    );
    assert_eq!(r.events.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
    assert!(!r.resync);
    let r = events
        .poll(PollRequest {
            after_cursor: r.cursor,
            wait_ms: 30_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.events.iter().map(|e| e.seq).collect::<Vec<_>>(), [3]);
    // Nothing pending: waits, and answers as soon as an event commits.
    let cursor = r.cursor.clone();
    let waiting = {
        let mut events = server.events(&t).await;
        let cursor = cursor.clone();
        tokio::spawn(async move {
            events
                .poll(PollRequest {
                    after_cursor: cursor,
                    wait_ms: 30_000,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
        })
    };
    // The poll is parked once its caller shows as online (a Poll marks the user present).
    while online(&server, &t).await.is_empty() {
        tokio::task::yield_now().await;
    }
    let job = create_job(&server, &t, "", "wakes the poll").await;
    let woke = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("poll answered")
        .unwrap();
    assert_eq!(woke.events.len(), 1);
    assert!(matches!(&woke.events[0].payload, Some(Payload::JobCreated(j)) if j.id == job.id));
    // Times out empty with the same cursor after wait_ms.
    let t0 = Instant::now();
    let r = events
        .poll(PollRequest {
            after_cursor: woke.cursor.clone(),
            wait_ms: 300,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert!(r.events.is_empty());
    assert_eq!(r.cursor, woke.cursor);
    // A stale cursor: resync.
    let bad = cursor_at(&start, 10_000);
    let r = events
        .poll(PollRequest {
            after_cursor: bad,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.resync);
    let log = log_of(&server.dir, ORG);
    assert_eq!(log.len(), 4);
}

fn presence(e: &orgpulse::proto::Event) -> Option<(bool, String)> {
    match &e.payload {
        Some(Payload::UserOnline(p)) => Some((true, p.user_id.clone())),
        Some(Payload::UserOffline(p)) => Some((false, p.user_id.clone())),
        _ => None,
    }
}

#[tokio::test]
async fn presence_online_offline_with_grace_and_list_online() {
    let server = TestServer::start_args(&["--presence-grace", "1s"]).await;
    let observer_t = token(ORG, "observer", "viewer");
    let bob_t = token(ORG, "bob", "member");
    let mut observer = Sub::open(&server, &observer_t, "", "", &[3]).await.unwrap();
    observer.caught_up().await;
    let ev = observer.until(|e| presence(e).is_some()).await;
    assert_eq!(presence(&ev), Some((true, "observer".into())));

    let mut bob1 = Sub::open(&server, &bob_t, "", "", &[1]).await.unwrap();
    bob1.caught_up().await;
    let ev = observer.until(|e| presence(e).is_some()).await;
    assert_eq!(presence(&ev), Some((true, "bob".into())));
    let mut bob2 = Sub::open(&server, &bob_t, "", "", &[1]).await.unwrap();
    bob2.caught_up().await;
    let members = online(&server, &observer_t).await;
    let bob = members
        .iter()
        .find(|m| m.user_id == "bob")
        .expect("bob online");
    assert_eq!(bob.connections, 2);
    assert!(bob.online_since.is_some());

    // Close both and reopen within the grace period: no offline, no second online.
    drop(bob1);
    drop(bob2);
    let mut bob3 = Sub::open(&server, &bob_t, "", "", &[1]).await.unwrap();
    bob3.caught_up().await;
    // Let the grace period pass (the subject of this test), then a marker from a new user: it
    // must be the next presence event the observer sees.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut carol = Sub::open(&server, &token(ORG, "carol", "viewer"), "", "", &[1])
        .await
        .unwrap();
    carol.caught_up().await;
    let ev = observer.until(|e| presence(e).is_some()).await;
    assert_eq!(
        presence(&ev),
        Some((true, "carol".into())),
        "no flicker for bob"
    );

    // Closing for longer than the grace period: offline.
    drop(bob3);
    let ev = observer.until(|e| presence(e).is_some()).await;
    assert_eq!(presence(&ev), Some((false, "bob".into())));
    let members = online(&server, &observer_t).await;
    let names: Vec<&str> = members.iter().map(|m| m.user_id.as_str()).collect();
    assert_eq!(names, ["carol", "observer"]);
    // A user of another org never shows up.
    let mut other = Sub::open(&server, &token("globex", "gina", "viewer"), "", "", &[])
        .await
        .unwrap();
    other.caught_up().await;
    let members = online(&server, &observer_t).await;
    assert!(members.iter().all(|m| m.user_id != "gina"));
}

/// A Poll of `token`'s org on `channel` after `cursor`, waiting up to `wait_ms`.
async fn poll_on(
    channel: Channel,
    token: &str,
    cursor: &str,
    wait_ms: u32,
) -> Result<PollResponse, tonic::Status> {
    let mut events = orgpulse::proto::event_service_client::EventServiceClient::with_interceptor(
        channel,
        Auth::new(token),
    );
    let req = PollRequest {
        after_cursor: cursor.into(),
        wait_ms,
        ..Default::default()
    };
    events.poll(req).await.map(tonic::Response::into_inner)
}

/// Polls of `token` waiting on the server (nothing to answer), as tasks.
fn waiting_polls(
    channel: &Channel,
    token: &str,
    cursor: &str,
    n: usize,
) -> Vec<tokio::task::JoinHandle<Result<PollResponse, tonic::Status>>> {
    (0..n)
        .map(|_| {
            let (channel, token, cursor) = (channel.clone(), token.to_string(), cursor.to_string());
            tokio::spawn(async move { poll_on(channel, &token, &cursor, 30_000).await })
        })
        .collect()
}

/// The server's `orgpulse_waiting_polls` (Poll calls in progress).
async fn waiting_on_server(server: &TestServer) -> i64 {
    let metrics = get_text(server, "/metrics").await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("orgpulse_waiting_polls "))
        .and_then(|n| n.parse().ok())
        .expect("orgpulse_waiting_polls in /metrics")
}

/// Waits until the server counts `n` Polls in progress.
async fn until_waiting(server: &TestServer, n: i64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let waiting = waiting_on_server(server).await;
        if waiting == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{waiting} Polls in progress on the server, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `--max-polls-per-user` (default 10): of 11 Polls of a user sent at once, one is
/// RESOURCE_EXHAUSTED "too many polls for this user" and ten wait; another user and the same user
/// in another org are not affected; a Poll that answered, or whose client went away, frees its
/// place.
#[tokio::test]
async fn waiting_polls_per_user_are_limited() {
    let server = TestServer::start().await;
    let channel = server.channel().await;
    let alice = token(ORG, "alice", "member");
    let head = snapshot(&server, &alice).await.cursor;
    let polls = waiting_polls(&channel, &alice, &head, 11);
    let (first, _, mut waiting) = tokio::time::timeout(WAIT, futures::future::select_all(polls))
        .await
        .expect("one of 11 waiting Polls of a user is refused at once");
    let refused = first.unwrap().expect_err("the 11th Poll is refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(refused.message(), "too many polls for this user");
    until_waiting(&server, 10).await;
    for other in [
        token(ORG, "bob", "viewer"),
        token("globex", "alice", "viewer"),
    ] {
        poll_on(channel.clone(), &other, "", 0)
            .await
            .expect("another user polls");
    }
    let err = poll_on(channel.clone(), &alice, "", 0).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // A client that goes away frees its place (once the server noticed).
    waiting.pop().unwrap().abort();
    until_waiting(&server, 9).await;
    poll_on(channel.clone(), &alice, "", 0)
        .await
        .expect("a place is free");
    // An event answers the nine: each gets it once; then alice polls again.
    create_job(&server, &alice, "", "wakes them").await;
    let log = log_of(&server.dir, ORG);
    for poll in waiting {
        let r = tokio::time::timeout(WAIT, poll)
            .await
            .expect("answered")
            .unwrap();
        assert_exactly_once(&r.expect("poll").events, &log, 1..=1, "alice", &[]);
    }
    let r = poll_on(channel.clone(), &alice, &head, 30_000).await;
    assert_exactly_once(
        &r.expect("alice polls again").events,
        &log,
        1..=1,
        "alice",
        &[],
    );
}

/// The delivery invariant for a polling client: while three writers create 300 jobs, a client
/// that long-polls with a small `max_events` (so Polls woken by the room's events stop part-way)
/// gets each event exactly once, in seq order.
#[tokio::test]
async fn a_polling_client_gets_each_event_once_in_order_while_writers_write() {
    const WRITERS: usize = 3;
    const JOBS: usize = 100;
    let server = TestServer::start().await;
    let viewer = token(ORG, "paula", "viewer");
    let mut cursor = snapshot(&server, &viewer).await.cursor;
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let url = server.url.clone();
            tokio::spawn(async move {
                let mut jobs = jobs_at(url, &token(ORG, &format!("w{w}"), "member")).await;
                for i in 0..JOBS {
                    let req = orgpulse::proto::CreateJobRequest {
                        title: format!("w{w} j{i}"),
                        ..Default::default()
                    };
                    jobs.create_job(req).await.expect("create");
                }
            })
        })
        .collect();
    let channel = server.channel().await;
    let mut events = orgpulse::proto::event_service_client::EventServiceClient::with_interceptor(
        channel,
        Auth::new(&viewer),
    );
    let mut received = vec![];
    let deadline = tokio::time::Instant::now() + WAIT;
    while received.len() < WRITERS * JOBS {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {} events by polling",
            received.len(),
            WRITERS * JOBS
        );
        let req = PollRequest {
            after_cursor: cursor,
            wait_ms: 2_000,
            max_events: 7,
            ..Default::default()
        };
        let r = events.poll(req).await.expect("poll").into_inner();
        assert!(!r.resync);
        assert!(r.events.len() <= 7);
        received.extend(r.events);
        cursor = r.cursor;
    }
    for w in writers {
        w.await.unwrap();
    }
    let log = log_of(&server.dir, ORG);
    assert_eq!(log.len(), WRITERS * JOBS);
    assert_exactly_once(&received, &log, 1..=(WRITERS * JOBS) as u64, "paula", &[]);
}

/// The server's own descriptors and threads (`/proc/<pid>`).
fn fds_and_threads(server: &TestServer) -> (usize, usize) {
    let pid = server.pid();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("Threads in /proc/<pid>/status");
    (fds, threads)
}

/// The names of the server's threads, for a failure message.
fn thread_names(server: &TestServer) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{}/task", server.pid())).unwrap();
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect()
}

/// 5,000 waiting Polls (500 users, 10 each, on 50 connections): while they wait the server holds
/// no thread and no database connection per Poll (only the read pool's few); once they answered
/// and their clients left, its descriptors and threads are back to what they were before.
#[tokio::test]
async fn five_thousand_waiting_polls_hold_no_thread_or_connection() {
    const USERS: usize = 500;
    const PER_USER: usize = 10;
    const CONNECTIONS: usize = 50;
    /// The database connections the store may open on demand up to its fixed number (SQLite:
    /// four readers, three descriptors each at most (file, WAL, shared memory); PostgreSQL: a
    /// pool of eight).
    const POOL_FDS: usize = 4 * 3;
    /// The blocking threads that ran the Polls' first reads (SQLite: at most four at once; the
    /// runtime may start a new one before a finished one is idle, and lets idle ones go after
    /// 10 s).
    const READ_THREADS: usize = 2 * 4;
    let server = TestServer::start().await;
    let viewer = token(ORG, "u0", "viewer");
    let head = snapshot(&server, &viewer).await.cursor;
    poll_on(server.channel().await, &viewer, &head, 0)
        .await
        .unwrap();
    let (fds0, threads0) = fds_and_threads(&server);
    let mut channels = vec![];
    for _ in 0..CONNECTIONS {
        channels.push(server.channel().await);
    }
    // In waves of 500 (each Poll starts with one Store read; 5,000 at once on PostgreSQL can
    // wait longer than the pool's 5 s on a busy machine), until all wait (none refused: each
    // user is at their limit, not beyond)...
    let mut polls = vec![];
    for wave in (0..USERS).collect::<Vec<_>>().chunks(USERS / 10) {
        for &u in wave {
            let t = token(ORG, &format!("u{u}"), "viewer");
            let channel = &channels[u % CONNECTIONS];
            polls.extend(waiting_polls(channel, &t, &head, PER_USER));
        }
        until_waiting(&server, polls.len() as i64).await;
    }
    // ... and the server holds nothing per waiting Poll beyond the connections' sockets.
    let (fds, threads) = fds_and_threads(&server);
    eprintln!(
        "5,000 waiting polls: {fds} descriptors (before {fds0}), {threads} threads (before {threads0})"
    );
    assert!(
        fds <= fds0 + CONNECTIONS + POOL_FDS,
        "{fds} descriptors while 5,000 polls wait (before: {fds0})"
    );
    assert!(
        threads <= threads0 + READ_THREADS,
        "{threads} threads while 5,000 polls wait (before: {threads0}): {:?}",
        thread_names(&server)
    );
    create_job(
        &server,
        &token(ORG, "writer", "member"),
        "",
        "answers them all",
    )
    .await;
    let log = log_of(&server.dir, ORG);
    for (i, poll) in polls.into_iter().enumerate() {
        let r = tokio::time::timeout(WAIT, poll)
            .await
            .expect("answered")
            .unwrap();
        let user = format!("u{}", i / PER_USER);
        assert_exactly_once(&r.expect("poll").events, &log, 1..=1, &user, &[]);
    }
    drop(channels);
    // Back to what it was once the clients left and the idle blocking threads went.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (fds, threads) = fds_and_threads(&server);
        if fds <= fds0 + POOL_FDS && threads <= threads0 {
            eprintln!(
                "after: {fds} descriptors (before {fds0}), {threads} threads (before {threads0})"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "after 5,000 polls: {fds} descriptors (before {fds0}), {threads} threads (before {threads0})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The user's next presence change seen by `observer`, with when it came.
async fn next_presence(observer: &mut Sub) -> (bool, String, Instant) {
    let ev = observer.until(|e| presence(e).is_some()).await;
    let (online, user) = presence(&ev).unwrap();
    (online, user, Instant::now())
}

/// Presence after the last Poll and after the last stream (grace 1 s): a waiting Poll keeps its
/// user online however long it waits; a user goes offline within the grace period plus 5 s of
/// their last Poll ending or their last stream closing, whatever the transport.
#[tokio::test]
async fn a_poll_only_user_and_a_stream_user_go_offline_within_grace_plus_5s() {
    const GRACE: Duration = Duration::from_secs(1);
    const POLL_ONLINE: Duration = Duration::from_secs(5);
    let server = TestServer::start_args(&["--presence-grace", "1s"]).await;
    let observer_t = token(ORG, "observer", "viewer");
    let mut observer = Sub::open(&server, &observer_t, "", "", &[3]).await.unwrap();
    observer.caught_up().await;
    assert!(
        next_presence(&mut observer).await.0,
        "the observer is online"
    );

    // Paula only polls: one Poll waiting 8 s (longer than 5 s + grace), then nothing.
    let paula = token(ORG, "paula", "viewer");
    let head = snapshot(&server, &paula).await.cursor;
    let poll = tokio::spawn({
        let channel = server.channel().await;
        async move {
            let r = poll_on(channel, &paula, &head, 8_000).await;
            (r, Instant::now())
        }
    });
    let (online, user, _) = next_presence(&mut observer).await;
    assert_eq!((online, user.as_str()), (true, "paula"));
    // Sam only streams: opens, then closes while Paula's Poll waits.
    let mut sam = Sub::open(&server, &token(ORG, "sam", "viewer"), "", "", &[1])
        .await
        .unwrap();
    sam.caught_up().await;
    let (online, user, _) = next_presence(&mut observer).await;
    assert_eq!((online, user.as_str()), (true, "sam"));
    drop(sam);
    let sam_closed = Instant::now();
    let (online, user, at) = next_presence(&mut observer).await;
    assert_eq!(
        (online, user.as_str()),
        (false, "sam"),
        "paula stays online while her Poll waits"
    );
    let sam_offline = at - sam_closed;
    let (answer, poll_ended) = poll.await.unwrap();
    assert!(answer.unwrap().events.is_empty());
    let (online, user, at) = next_presence(&mut observer).await;
    assert_eq!((online, user.as_str()), (false, "paula"));
    let paula_offline = at.saturating_duration_since(poll_ended);
    eprintln!(
        "offline after: last stream closed {sam_offline:?}, last poll ended {paula_offline:?}"
    );
    assert!(
        sam_offline <= GRACE + POLL_ONLINE,
        "a stream user went offline {sam_offline:?} after closing"
    );
    assert!(
        paula_offline <= GRACE + POLL_ONLINE + Duration::from_millis(500),
        "a poll-only user went offline {paula_offline:?} after their last Poll"
    );
    assert!(
        paula_offline >= POLL_ONLINE,
        "a poll-only user went offline {paula_offline:?} after their last Poll: a Poll that ended less than 5 s ago keeps them online"
    );
}
