//! Presence state and broadcast across real nodes (one PostgreSQL database, NATS): an entry set
//! through one node is announced once on the others and listed there (also by a node that
//! restarts); a sender's broadcasts arrive in order on another node; a client that moves to
//! another node and refreshes there shows no remove/add flicker when its first node is SIGKILLed;
//! the entries of a client that did not come back are removed everywhere within the TTL.
mod cluster_support;
mod support;

use std::time::{Duration, Instant};

use cluster_support::{Cluster, services_or_skip};
use orgpulse::proto::{
    BroadcastRequest, ListPresenceRequest, OrgFilter, SetPresenceRequest, event::Payload,
    event_service_client::EventServiceClient,
};
use prost_types::{Struct, Value, value::Kind};
use serde_json::json;
use support::{Auth, Sub, TestServer, presence_state_of, token_with};
use tonic::{service::interceptor::InterceptedService, transport::Channel};

const ORG: &str = "cluster";
const TTL_MS: u32 = 2000;

type Events = EventServiceClient<InterceptedService<Channel, Auth>>;

fn member(user: &str) -> String {
    token_with(ORG, user, json!({ "roles": ["member"] }))
}

async fn client(node: &TestServer, user: &str) -> Events {
    EventServiceClient::with_interceptor(node.channel().await, Auth::new(&member(user)))
}

fn state(v: &str) -> Struct {
    Struct {
        fields: [(
            "v".to_string(),
            Value {
                kind: Some(Kind::StringValue(v.into())),
            },
        )]
        .into(),
    }
}

async fn set(c: &mut Events, topic: &str, s: Struct) {
    c.set_presence(SetPresenceRequest {
        org_id: ORG.into(),
        topic: topic.into(),
        state: Some(s),
        ttl_ms: TTL_MS,
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn broadcast(c: &mut Events, topic: &str, v: &str) {
    c.broadcast(BroadcastRequest {
        org_id: ORG.into(),
        topic: topic.into(),
        data: Some(state(v)),
        audience: None,
    })
    .await
    .unwrap();
}

async fn watcher(node: &TestServer) -> Sub {
    let filter = OrgFilter {
        org_id: ORG.into(),
        ..Default::default()
    };
    let mut sub = Sub::open_filter(node.channel().await, &member("watcher"), filter)
        .await
        .unwrap();
    sub.caught_up().await;
    sub
}

fn broadcast_of(e: &orgpulse::proto::Event, topic: &str) -> Option<String> {
    match &e.payload {
        Some(Payload::Broadcast(b)) if b.topic == topic => match &b.data.as_ref()?.fields["v"].kind
        {
            Some(Kind::StringValue(s)) => Some(s.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// Sends a broadcast on topic "marker" through `c` and waits for it on `sub`: everything sent
/// through `c`'s node before it has arrived.
async fn through(sub: &mut Sub, c: &mut Events, v: &str) {
    broadcast(c, "marker", v).await;
    sub.until(|e| broadcast_of(e, "marker").as_deref() == Some(v))
        .await;
}

/// Waits until broadcasts from `from` reach `sub` on another node: a node's NATS connection
/// comes up after it answers /health, and what is sent before is not for it (never stored).
async fn connected(sub: &mut Sub, from: &TestServer) {
    let mut probe = client(from, "probe").await;
    for i in 0.. {
        let v = format!("probe{i}");
        broadcast(&mut probe, "probe", &v).await;
        let arrived = sub.until(|e| broadcast_of(e, "probe").as_deref() == Some(&v));
        if tokio::time::timeout(Duration::from_millis(200), arrived)
            .await
            .is_ok()
        {
            return;
        }
        assert!(i < 100, "broadcasts never crossed the cluster");
    }
}

fn states(sub: &Sub) -> Vec<(String, String, String)> {
    sub.seen.iter().filter_map(presence_state_of).collect()
}

fn s(user: &str, topic: &str, v: &str) -> (String, String, String) {
    (user.into(), topic.into(), v.into())
}

/// (user, topic) of every entry `node` lists.
async fn listed(node: &TestServer) -> Vec<(String, String)> {
    let mut c = client(node, "x").await;
    let req = ListPresenceRequest {
        org_id: ORG.into(),
        topic: String::new(),
    };
    let entries = c.list_presence(req).await.unwrap().into_inner().entries;
    entries.into_iter().map(|e| (e.user_id, e.topic)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_and_broadcasts_cross_nodes_once_in_order_and_a_restarted_node_lists_them() {
    if !services_or_skip(false) {
        return;
    }
    let mut cluster = Cluster::start(2, &[]).await;
    let mut on_b = watcher(&cluster.nodes[1]).await;
    connected(&mut on_b, &cluster.nodes[0]).await;
    let mut ann = client(&cluster.nodes[0], "ann").await;
    set(&mut ann, "job:1", state("viewing")).await;
    set(&mut ann, "job:1", state("viewing")).await;
    set(&mut ann, "job:1", state("typing")).await;
    // Within the 20 per second of a user, with the marker below.
    for i in 0..15 {
        broadcast(&mut ann, "job:1", &i.to_string()).await;
    }
    set(&mut ann, "job:2", state("viewing")).await;
    set(&mut ann, "job:1", Struct::default()).await;
    through(&mut on_b, &mut ann, "a").await;
    assert_eq!(
        states(&on_b),
        [
            s("ann", "job:1", "viewing"),
            s("ann", "job:1", "typing"),
            s("ann", "job:2", "viewing"),
            s("ann", "job:1", "")
        ]
    );
    let sent: Vec<String> = on_b
        .seen
        .iter()
        .filter_map(|e| broadcast_of(e, "job:1"))
        .collect();
    assert_eq!(sent, (0..15).map(|i| i.to_string()).collect::<Vec<_>>());
    let want = vec![("ann".to_string(), "job:2".to_string())];
    assert_eq!(listed(&cluster.nodes[1]).await, want);
    // A node that starts again asks the others for their entries.
    cluster.nodes[1].kill().await;
    cluster.nodes[1].restart().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while listed(&cluster.nodes[1]).await != want {
        assert!(
            Instant::now() < deadline,
            "the restarted node never listed ann's entry"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_between_nodes_shows_no_flicker_and_a_dead_nodes_entries_expire_everywhere() {
    if !services_or_skip(false) {
        return;
    }
    let mut cluster = Cluster::start(2, &[]).await;
    let mut on_b = watcher(&cluster.nodes[1]).await;
    connected(&mut on_b, &cluster.nodes[0]).await;
    let mut ann_a = client(&cluster.nodes[0], "ann").await;
    let mut bob_a = client(&cluster.nodes[0], "bob").await;
    set(&mut ann_a, "job:1", state("viewing")).await;
    set(&mut bob_a, "job:1", state("viewing")).await;
    through(&mut on_b, &mut ann_a, "a").await;
    // Ann's client moves to node B and refreshes there; node A dies; Bob's client is gone.
    let mut ann_b = client(&cluster.nodes[1], "ann").await;
    set(&mut ann_b, "job:1", state("viewing")).await;
    cluster.nodes[0].kill().await;
    let killed = Instant::now();
    // Ann keeps refreshing on B (as the SDK does, every half TTL) for two TTLs.
    while killed.elapsed() < Duration::from_millis(2 * TTL_MS as u64) {
        tokio::time::sleep(Duration::from_millis(TTL_MS as u64 / 2)).await;
        set(&mut ann_b, "job:1", state("viewing")).await;
    }
    through(&mut on_b, &mut ann_b, "b").await;
    assert_eq!(
        states(&on_b),
        [
            s("ann", "job:1", "viewing"),
            s("bob", "job:1", "viewing"),
            s("bob", "job:1", "")
        ],
        "bob expired once, ann never flickered"
    );
    let bob_left = on_b
        .seen
        .iter()
        .position(|e| presence_state_of(e) == Some(s("bob", "job:1", "")))
        .unwrap();
    assert!(bob_left > 0);
    // Ann stops refreshing: her entry expires within the TTL.
    let stopped = Instant::now();
    on_b.until(|e| presence_state_of(e) == Some(s("ann", "job:1", "")))
        .await;
    let took = stopped.elapsed();
    assert!(
        took <= Duration::from_millis(TTL_MS as u64 + 1000),
        "ann's entry left after {took:?}"
    );
}
