//! Presence state and broadcast on one node (API.md "Presence state and broadcast"): each set,
//! change, removal and expiry of an entry is announced exactly once to every subscriber its
//! audience and their topics filter allow, and never to the others; `ListPresence` after
//! `Subscribe` misses nothing; broadcasts reach the streams of the moment only (never a replay,
//! never a Poll), in order per sender; every limit answers with its status.
mod support;

use orgpulse::proto::{
    Audience, BroadcastRequest, EventKind, ListPresenceRequest, OrgFilter, PollRequest,
    SetPresenceRequest, event::Payload, event_service_client::EventServiceClient,
};
use prost_types::{Struct, Value, value::Kind};
use serde_json::json;
use support::*;
use tonic::{Code, service::interceptor::InterceptedService, transport::Channel};

const ORG: &str = "acme";

type Events = EventServiceClient<InterceptedService<Channel, Auth>>;

fn member(user: &str, groups: &[&str]) -> String {
    token_with(ORG, user, json!({ "roles": ["member"], "groups": groups }))
}

async fn client(server: &TestServer, token: &str) -> Events {
    EventServiceClient::with_interceptor(server.channel().await, Auth::new(token))
}

/// `{"k": v}`
fn state(k: &str, v: &str) -> Struct {
    Struct {
        fields: [(
            k.to_string(),
            Value {
                kind: Some(Kind::StringValue(v.into())),
            },
        )]
        .into(),
    }
}

fn set(topic: &str, s: Struct, ttl_ms: u32, audience: Option<Audience>) -> SetPresenceRequest {
    SetPresenceRequest {
        org_id: ORG.into(),
        topic: topic.into(),
        state: Some(s),
        audience,
        ttl_ms,
    }
}

async fn subscribe(server: &TestServer, token: &str, topics: &[&str], kinds: &[EventKind]) -> Sub {
    let filter = OrgFilter {
        org_id: ORG.into(),
        topics: topics.iter().map(|t| t.to_string()).collect(),
        kinds: kinds.iter().map(|k| *k as i32).collect(),
        ..Default::default()
    };
    let mut sub = Sub::open_filter(server.channel().await, token, filter)
        .await
        .unwrap();
    sub.caught_up().await;
    sub
}

/// The presence_state events seen so far: (user, topic, state's "v" or "" for left).
fn states(sub: &Sub) -> Vec<(String, String, String)> {
    sub.seen.iter().filter_map(presence_state_of).collect()
}

fn is_marker(e: &orgpulse::proto::Event) -> bool {
    matches!(&e.payload, Some(Payload::Broadcast(b)) if b.topic == "marker")
}

/// A broadcast on topic "marker" every subscriber sees (for knowing all before it arrived).
async fn marker(events: &mut Events) {
    events
        .broadcast(BroadcastRequest {
            org_id: ORG.into(),
            topic: "marker".into(),
            data: Some(state("v", "m")),
            audience: None,
        })
        .await
        .unwrap();
}

fn t(user: &str, topic: &str, v: &str) -> (String, String, String) {
    (user.into(), topic.into(), v.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_change_remove_and_expiry_are_announced_once_to_exactly_the_allowed_subscribers() {
    let server = TestServer::start().await;
    let ann = member("ann", &["g42"]);
    let mut in_group = subscribe(&server, &member("bob", &["g42"]), &[], &[]).await;
    let mut outside = subscribe(&server, &member("cat", &[]), &[], &[]).await;
    let mut on_topic =
        subscribe(&server, &member("dan", &["g42"]), &["job:1", "marker"], &[]).await;
    let mut jobs_only = subscribe(&server, &member("eve", &["g42"]), &[], &[EventKind::Job]).await;
    let mut events = client(&server, &ann).await;
    let private = || {
        Some(Audience {
            groups: vec!["g42".into()],
            ..Default::default()
        })
    };
    events
        .set_presence(set("job:1", state("v", "viewing"), 0, None))
        .await
        .unwrap();
    // The same state again (a refresh) announces nothing.
    events
        .set_presence(set("job:1", state("v", "viewing"), 0, None))
        .await
        .unwrap();
    events
        .set_presence(set("job:1", state("v", "typing"), 0, None))
        .await
        .unwrap();
    events
        .set_presence(set("job:2", state("v", "viewing"), 0, private()))
        .await
        .unwrap();
    events
        .set_presence(set("job:1", Struct::default(), 0, None))
        .await
        .unwrap();
    events
        .set_presence(set("job:3", state("v", "short"), 1000, private()))
        .await
        .unwrap();
    // Expiry: the entry's "left" comes by itself after its TTL.
    in_group
        .until(|e| {
            matches!(&e.payload, Some(Payload::PresenceState(p))
                if p.topic == "job:3" && p.state.as_ref().is_some_and(|s| s.fields.is_empty()))
        })
        .await;
    marker(&mut events).await;
    for sub in [&mut in_group, &mut outside, &mut on_topic] {
        sub.until(is_marker).await;
    }
    let everything = vec![
        t("ann", "job:1", "viewing"),
        t("ann", "job:1", "typing"),
        t("ann", "job:2", "viewing"),
        t("ann", "job:1", ""),
        t("ann", "job:3", "short"),
        t("ann", "job:3", ""),
    ];
    assert_eq!(states(&in_group), everything);
    assert_eq!(
        states(&outside),
        vec![
            t("ann", "job:1", "viewing"),
            t("ann", "job:1", "typing"),
            t("ann", "job:1", "")
        ]
    );
    assert_eq!(
        states(&on_topic),
        vec![
            t("ann", "job:1", "viewing"),
            t("ann", "job:1", "typing"),
            t("ann", "job:1", "")
        ]
    );
    // A subscriber that did not ask for presence gets none of it (nor the marker broadcast).
    events
        .set_presence(set("job:9", state("v", "x"), 0, None))
        .await
        .unwrap();
    let job = create_job(&server, &token(ORG, "ann", "member"), ORG, "after").await;
    let ev = jobs_only.until(|e| e.seq > 0).await;
    assert!(matches!(ev.payload, Some(Payload::JobCreated(j)) if j.id == job.id));
    assert!(states(&jobs_only).is_empty() && !jobs_only.seen.iter().any(is_marker));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_presence_after_subscribe_misses_nothing_while_sets_go_on() {
    let server = TestServer::start().await;
    let watcher = member("watcher", &[]);
    let mut sub = subscribe(&server, &watcher, &["doc:1", "marker"], &[]).await;
    let mut writers = Vec::new();
    for w in 0..4 {
        let mut c = client(&server, &member(&format!("w{w}"), &[])).await;
        writers.push(tokio::spawn(async move {
            for i in 0..8 {
                // Within the 10 per second of a user.
                c.set_presence(set("doc:1", state("v", &format!("{i}")), 0, None))
                    .await
                    .unwrap();
            }
        }));
    }
    let mut events = client(&server, &watcher).await;
    let snapshot = events
        .list_presence(ListPresenceRequest {
            org_id: ORG.into(),
            topic: "doc:1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    for w in writers {
        w.await.unwrap();
    }
    marker(&mut events).await;
    sub.until(is_marker).await;
    // The snapshot, then the events after the Subscribe, last write wins: each writer's last.
    let mut view: std::collections::BTreeMap<String, String> = snapshot
        .iter()
        .map(|e| (e.user_id.clone(), format!("{:?}", e.state)))
        .collect();
    for (user, _, v) in states(&sub) {
        view.insert(user, format!("{:?}", Some(state("v", &v))));
    }
    let want: std::collections::BTreeMap<String, String> = (0..4)
        .map(|w| (format!("w{w}"), format!("{:?}", Some(state("v", "7")))))
        .collect();
    assert_eq!(view, want);
    let listed = events
        .list_presence(ListPresenceRequest {
            org_id: ORG.into(),
            topic: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(listed.len(), 4);
    assert!(
        listed
            .iter()
            .all(|e| e.topic == "doc:1" && e.updated_at.is_some())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcasts_reach_current_streams_only_in_order_and_never_a_replay_or_a_poll() {
    let server = TestServer::start().await;
    let (ann, bob, cat) = (
        member("ann", &["g42"]),
        member("bob", &["g42"]),
        member("cat", &[]),
    );
    let start = snapshot(&server, &ann).await.cursor;
    let mut bob_sub = subscribe(&server, &bob, &[], &[EventKind::Broadcast]).await;
    let mut cat_sub = subscribe(&server, &cat, &[], &[]).await;
    let mut events = client(&server, &ann).await;
    for i in 0..15 {
        let audience = (i % 3 == 0).then(|| Audience {
            groups: vec!["g42".into()],
            ..Default::default()
        });
        events
            .broadcast(BroadcastRequest {
                org_id: ORG.into(),
                topic: "job:1".into(),
                data: Some(state("v", &format!("{i}"))),
                audience,
            })
            .await
            .unwrap();
    }
    marker(&mut events).await;
    let data = |sub: &Sub| -> Vec<String> {
        sub.seen
            .iter()
            .filter_map(|e| match &e.payload {
                Some(Payload::Broadcast(b)) if b.topic == "job:1" => {
                    assert_eq!((b.user_id.as_str(), e.seq), ("ann", 0));
                    match &b.data.as_ref()?.fields.get("v")?.kind {
                        Some(Kind::StringValue(s)) => Some(s.clone()),
                        _ => None,
                    }
                }
                _ => None,
            })
            .collect()
    };
    bob_sub.until(is_marker).await;
    cat_sub.until(is_marker).await;
    assert_eq!(
        data(&bob_sub),
        (0..15).map(|i| i.to_string()).collect::<Vec<_>>()
    );
    let not_private: Vec<String> = (0..15)
        .filter(|i| i % 3 != 0)
        .map(|i| i.to_string())
        .collect();
    assert_eq!(data(&cat_sub), not_private);
    // Nothing durable: a resumed stream replays none of it, and Poll returns none of it.
    let mut replay = Sub::open(&server, &bob, ORG, &start, &[]).await.unwrap();
    replay.caught_up().await;
    assert!(
        replay
            .seen
            .iter()
            .all(|e| !matches!(e.payload, Some(Payload::Broadcast(_))))
    );
    let polled = events
        .poll(PollRequest {
            after_cursor: start,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(polled.events.is_empty());
}

#[tokio::test]
async fn rates_sizes_ttls_and_entry_counts_are_limited() {
    let server = TestServer::start().await;
    let mut events = client(&server, &member("ann", &[])).await;
    let b = |data: Struct| BroadcastRequest {
        org_id: ORG.into(),
        topic: "t".into(),
        data: Some(data),
        audience: None,
    };
    // 20 Broadcast per second per user: the burst of 20 passes, more is refused.
    let mut refused = None;
    for i in 0..40 {
        if let Err(s) = events.broadcast(b(state("v", &i.to_string()))).await {
            refused = Some((i, s));
            break;
        }
    }
    let (i, status) = refused.expect("a broadcast was refused");
    assert!(i >= 20, "refused after {i}");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("Broadcast"), "{status:?}");
    let big = state("v", &"x".repeat(4100));
    let status = client(&server, &member("bob", &[]))
        .await
        .broadcast(b(big))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("data is"), "{status:?}");

    let mut cat = client(&server, &member("cat", &[])).await;
    for (req, field) in [
        (set("t", state("v", &"x".repeat(1030)), 0, None), "state is"),
        (set("t", state("v", "x"), 999, None), "ttl_ms"),
        (set("t", state("v", "x"), 120_001, None), "ttl_ms"),
        (set("no spaces", state("v", "x"), 0, None), "topic"),
        (set("", state("v", "x"), 0, None), "topic"),
    ] {
        let status = cat.set_presence(req).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().starts_with(field), "{field}: {status:?}");
    }
    // 10 SetPresence per second per user.
    let mut dan = client(&server, &member("dan", &[])).await;
    let mut refused = None;
    for i in 0..30 {
        if let Err(s) = dan
            .set_presence(set(&format!("t{i}"), state("v", "x"), 0, None))
            .await
        {
            refused = Some((i, s));
            break;
        }
    }
    let (i, status) = refused.expect("a set was refused");
    assert!(i >= 10, "refused after {i}");
    assert_eq!(status.code(), Code::ResourceExhausted);
    // At most 32 live entries per user: users with many, each within the rate by using time.
    let mut eve = client(&server, &member("eve", &[])).await;
    let mut n = 0;
    let status = loop {
        match eve
            .set_presence(set(&format!("e{n}"), state("v", "x"), 60_000, None))
            .await
        {
            Ok(_) => n += 1,
            Err(s) if s.message().contains("SetPresence") => {
                // The rate limit: wait for the bucket to refill (a second holds 10).
                tokio::time::sleep(std::time::Duration::from_millis(200)).await
            }
            Err(s) => break s,
        }
        assert!(n <= 32, "took a 33rd entry");
    };
    assert_eq!(n, 32);
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("presence entries"), "{status:?}");
}
