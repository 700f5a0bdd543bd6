//! End-to-end tests of the client library itself (`orgpulse::client`) against the real server:
//! resync when the server's log is recreated, backoff growth and reset, token sources, the
//! errors that must end a watch instead of looping, calls leaving a hung endpoint, and a
//! `Broadcast` (at most once) that does not.
mod cli_support;
mod support;

use std::time::{Duration, Instant};

use cli_support::{PATIENCE, patient_client};
use futures::StreamExt;
use orgpulse::{
    client::{
        BackoffConfig, Client, ClientConfig, ConnState, ErrorClass, HUNG_AFTER, TokenSource, Watch,
        WatchFilter, WatchItem,
    },
    proto::{
        BroadcastRequest, CreateJobRequest, Event, EventKind, ListJobsRequest, ListPresenceRequest,
        SetPresenceRequest, event::Payload,
    },
};
use support::{Claims, ServerOpts, TempDir, TestServer, mint_claims, now_secs, token};

const ORG: &str = "lib";

fn client(url: &str, token: TokenSource, backoff: BackoffConfig) -> Client {
    Client::new(ClientConfig {
        endpoints: vec![url.into()],
        token,
        backoff,
        ..Default::default()
    })
    .unwrap()
}

async fn next(w: &mut Watch) -> WatchItem {
    tokio::time::timeout(PATIENCE, w.next())
        .await
        .expect("an item in time")
        .expect("the watch goes on")
        .expect("no error")
}

/// Reads until an event matches `done`.
async fn event_until(w: &mut Watch, done: impl Fn(&Event) -> bool) -> Event {
    loop {
        if let WatchItem::Event(ev) = next(w).await
            && done(&ev)
        {
            return *ev;
        }
    }
}

/// Reads until a state matches `done`.
async fn state_until(w: &mut Watch, done: impl Fn(&ConnState) -> bool) -> ConnState {
    loop {
        if let WatchItem::State(s) = next(w).await
            && done(&s)
        {
            return s;
        }
    }
}

fn is_caught_up(ev: &Event) -> bool {
    matches!(ev.payload, Some(Payload::CaughtUp(_)))
}

async fn create(c: &Client, title: &str) {
    c.create_job(CreateJobRequest {
        title: title.into(),
        ..Default::default()
    })
    .await
    .unwrap();
}

/// A new server with a new database behind the same address: the old cursor belongs to another
/// log, so the watch reports `resynced`, yields the `resync` event, and then accepts the new
/// log's seqs although they restart at 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resyncs_when_the_log_is_recreated() {
    let mut first = TestServer::start().await;
    let admin = token(ORG, "alice", "admin");
    let mut w = client(
        &first.url,
        TokenSource::Static(admin.clone()),
        BackoffConfig::default(),
    )
    .watch(WatchFilter::default(), None);
    assert!(matches!(
        next(&mut w).await,
        WatchItem::State(ConnState::Connected { .. })
    ));
    event_until(&mut w, is_caught_up).await;
    let writer = patient_client(&[&first.url], &admin);
    for i in 0..3 {
        create(&writer, &format!("old {i}")).await;
    }
    let third = event_until(&mut w, |e| e.seq >= 3).await;
    assert_eq!(third.seq, 3);

    first.kill().await;
    let second = TestServer::start_with(ServerOpts {
        listen: Some(first.addr.clone()),
        ..Default::default()
    })
    .await;
    let resynced = state_until(&mut w, |s| matches!(s, ConnState::Resynced { .. })).await;
    eprintln!("{resynced}");
    let resync = event_until(&mut w, |_| true).await;
    assert!(
        matches!(resync.payload, Some(Payload::Resync(_))),
        "{resync:?}"
    );
    let writer = patient_client(&[&second.url], &admin);
    create(&writer, "new").await;
    let fresh = event_until(&mut w, |e| e.seq > 0).await;
    assert_eq!(
        fresh.seq, 1,
        "the new log's first event is not dropped as a duplicate"
    );
}

/// While the server is down the delays grow (full jitter under a doubling bound, capped); the
/// first failure after a healthy connection starts again at attempt 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backoff_grows_while_down_and_resets_after_a_healthy_connection() {
    let mut server = TestServer::start().await;
    let cfg = BackoffConfig {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(160),
    };
    let mut w = client(
        &server.url,
        TokenSource::Static(token(ORG, "bob", "viewer")),
        cfg,
    )
    .watch(WatchFilter::default(), None);
    event_until(&mut w, is_caught_up).await;
    server.kill().await;
    for expected in 1..=6u32 {
        let ConnState::Reconnecting { delay, attempt, .. } =
            state_until(&mut w, |s| matches!(s, ConnState::Reconnecting { .. })).await
        else {
            unreachable!()
        };
        assert_eq!(attempt, expected);
        let bound = (cfg.initial * 2u32.pow(expected - 1)).min(cfg.max);
        assert!(delay <= bound, "attempt {attempt}: {delay:?} > {bound:?}");
    }
    server.restart().await;
    event_until(&mut w, is_caught_up).await;
    server.kill().await;
    let again = state_until(&mut w, |s| matches!(s, ConnState::Reconnecting { .. })).await;
    assert!(
        matches!(again, ConnState::Reconnecting { attempt: 1, .. }),
        "{again:?}"
    );
}

/// A token command is run again when the token it gave has expired; a failing command is an
/// auth error.
#[tokio::test]
async fn token_command_is_rerun_when_the_token_expired() {
    let server = TestServer::start().await;
    let dir = TempDir::new("tokcmd");
    let expired = mint_claims(&Claims {
        sub: "carol".into(),
        org: Some(ORG.into()),
        roles: vec!["member".into()],
        exp: now_secs() - 5,
        nbf: None,
    });
    std::fs::write(dir.0.join("next"), &expired).unwrap();
    std::fs::write(dir.0.join("fresh"), token(ORG, "carol", "member")).unwrap();
    // First run prints the expired token and puts the fresh one in its place.
    let cmd = format!("cd {} && cat next && cp fresh next", dir.0.display());
    let c = client(
        &server.url,
        TokenSource::Command(cmd),
        BackoffConfig::default(),
    );
    let listed = c
        .list_jobs(ListJobsRequest::default())
        .await
        .expect("refreshed once");
    assert!(!listed.cursor.is_empty());

    let failing = client(
        &server.url,
        TokenSource::Command("exit 3".into()),
        BackoffConfig::default(),
    );
    let err = failing
        .list_jobs(ListJobsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.class(), ErrorClass::Auth, "{err}");
}

/// Errors another attempt cannot fix end the watch: a badly signed token, an expired token that
/// cannot be replaced, an org the token may not see.
#[tokio::test]
async fn unfixable_errors_end_the_watch() {
    let server = TestServer::start().await;
    let expired = mint_claims(&Claims {
        sub: "dave".into(),
        org: Some(ORG.into()),
        roles: vec!["viewer".into()],
        exp: now_secs() - 5,
        nbf: None,
    });
    let forged = format!("{}x", token(ORG, "dave", "viewer"));
    let cases = [
        (TokenSource::Static(forged), String::new()),
        (TokenSource::Static(expired), String::new()),
        (
            TokenSource::Static(token(ORG, "dave", "viewer")),
            "other-org".to_string(),
        ),
        (TokenSource::None, String::new()),
    ];
    for (source, org_id) in cases {
        let c = client(&server.url, source.clone(), BackoffConfig::default());
        let mut w = c.watch(
            WatchFilter {
                org_id,
                ..Default::default()
            },
            None,
        );
        let err = loop {
            match tokio::time::timeout(Duration::from_secs(5), w.next()).await {
                Ok(Some(Err(e))) => break e,
                Ok(Some(Ok(WatchItem::State(ConnState::Reconnecting { .. })))) => {
                    panic!("{source:?}: retried instead of stopping")
                }
                Ok(Some(Ok(_))) => {}
                Ok(None) => panic!("{source:?}: ended without an error"),
                Err(_) => panic!("{source:?}: no error within 5 s"),
            }
        };
        assert_eq!(err.class(), ErrorClass::Auth, "{source:?}: {err}");
        assert!(w.next().await.is_none(), "the watch ends after its error");
    }
}

/// The first endpoint hangs (SIGSTOP: its connections stay open, and the kernel still completes
/// new TCP handshakes on its port). A read, on a connection opened before the hang or on a new
/// one, is answered by the second endpoint after at most 2 x HUNG_AFTER (an HTTP/2 PING left
/// unanswered), not after the 30 s call deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_leave_a_hung_endpoint() {
    let hung = TestServer::start().await;
    let healthy = TestServer::start().await;
    let admin = token(ORG, "reader", "admin");
    let client = || {
        Client::new(ClientConfig {
            endpoints: vec![hung.url.clone(), healthy.url.clone()],
            token: TokenSource::Static(admin.clone()),
            ..Default::default()
        })
        .unwrap()
    };
    let connected = client();
    create(&connected, "only on the first endpoint").await;
    let _paused = hung.pause();
    let bound = HUNG_AFTER * 2 + Duration::from_secs(2);
    for (what, c) in [
        ("a connection opened before the hang", connected),
        ("a new connection", client()),
    ] {
        let t0 = Instant::now();
        let page = c.list_jobs(ListJobsRequest::default()).await.unwrap();
        let took = t0.elapsed();
        eprintln!("{what}: answered by the next endpoint after {took:?}");
        assert!(page.jobs.is_empty(), "{what}: the hung endpoint answered");
        assert!(took <= bound, "{what}: took {took:?}, more than {bound:?}");
    }
}

/// `{"n": n}`.
fn numbered(n: f64) -> prost_types::Struct {
    prost_types::Struct {
        fields: [(
            "n".to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::NumberValue(n)),
            },
        )]
        .into(),
    }
}

/// `Broadcast` is at most once: sent to a hung first endpoint (which may process it when it
/// wakes up) it fails instead of going to the second, where it would be a second delivery;
/// `SetPresence` and `ListPresence`, safe to repeat, move on to the second endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_is_not_retried_once_a_server_may_have_it() {
    let hung = TestServer::start().await;
    let healthy = TestServer::start().await;
    let c = Client::new(ClientConfig {
        endpoints: vec![hung.url.clone(), healthy.url.clone()],
        token: TokenSource::Static(token(ORG, "alice", "viewer")),
        ..Default::default()
    })
    .unwrap();
    let watcher = client(
        &healthy.url,
        TokenSource::Static(token(ORG, "vic", "viewer")),
        BackoffConfig::default(),
    );
    let filter = WatchFilter {
        kinds: vec![EventKind::Broadcast],
        ..Default::default()
    };
    let mut w = watcher.watch(filter, None);
    event_until(&mut w, |e| matches!(e.payload, Some(Payload::CaughtUp(_)))).await;
    let broadcast = |n| BroadcastRequest {
        topic: "doc:1".into(),
        data: Some(numbered(n)),
        ..Default::default()
    };

    let paused = hung.pause();
    let err = c.broadcast(broadcast(1.0)).await.unwrap_err();
    assert_eq!(err.class(), ErrorClass::Unavailable, "{err}");
    c.set_presence(SetPresenceRequest {
        topic: "doc:1".into(),
        state: Some(numbered(2.0)),
        ..Default::default()
    })
    .await
    .expect("moved on to the second endpoint");
    let listed = c
        .list_presence(ListPresenceRequest {
            topic: "doc:1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.entries.len(), 1, "{listed:?}");
    assert_eq!(listed.entries[0].user_id, "alice");
    drop(paused);

    // Now on the second endpoint: the watch's first broadcast is this one, so broadcast 1 never
    // reached it (a sender's broadcasts arrive in order).
    c.broadcast(broadcast(3.0)).await.unwrap();
    let ev = event_until(&mut w, |e| matches!(e.payload, Some(Payload::Broadcast(_)))).await;
    let Some(Payload::Broadcast(b)) = ev.payload else {
        unreachable!()
    };
    assert_eq!(b.data, Some(numbered(3.0)));
}
