//! The Poll fallback (answers at once, waits for the first event, times out empty) and presence
//! (user_online / user_offline with the grace period, ListOnline), end to end.
mod support;

use std::time::{Duration, Instant};

use orgpulse::proto::{PollRequest, event::Payload};
use support::*;

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
