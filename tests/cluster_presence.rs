//! End-to-end cluster presence: three real nodes on one PostgreSQL database and NATS, with a
//! short grace, heartbeat and node timeout. A user with streams on two nodes is one member with
//! two connections on every node; SIGKILL of one of them keeps them online via the other, with no
//! flicker; SIGKILL of the other takes them offline exactly once, within 30 s plus the grace. A
//! Poll waiting on one node keeps its user online on every node; after it they go offline within
//! the grace plus 5 s. A node with thousands of users sends its set in parts, and the others list
//! every one of them.
mod cluster_support;
mod support;

use std::time::{Duration, Instant};

use cluster_support::{Cluster, services_or_skip};
use orgpulse::proto::{PollRequest, event::Payload, event_service_client::EventServiceClient};
use support::{Auth, Sub, TestServer, WAIT, online, snapshot, token};

const ORG: &str = "cluster";
const GRACE: Duration = Duration::from_secs(1);
const NODE_TIMEOUT: Duration = Duration::from_secs(1);
const FLAGS: &[&str] = &[
    "--presence-grace",
    "1s",
    "--presence-heartbeat",
    "200ms",
    "--presence-node-timeout",
    "1s",
];

fn presence(e: &orgpulse::proto::Event) -> Option<(bool, String)> {
    match &e.payload {
        Some(Payload::UserOnline(p)) => Some((true, p.user_id.clone())),
        Some(Payload::UserOffline(p)) => Some((false, p.user_id.clone())),
        _ => None,
    }
}

async fn next_presence(sub: &mut Sub) -> (bool, String) {
    presence(&sub.until(|e| presence(e).is_some()).await).unwrap()
}

/// A presence subscriber on `node` that has seen itself come online.
async fn observer_on(node: &TestServer) -> Sub {
    let mut observer = Sub::open(node, &token(ORG, "observer", "viewer"), ORG, "", &[3])
        .await
        .unwrap();
    observer.caught_up().await;
    assert_eq!(
        next_presence(&mut observer).await,
        (true, "observer".into())
    );
    observer
}

/// Alice's connections in `ListOnline` on `node` (0: not listed).
async fn connections(node: &TestServer, who: &str) -> u32 {
    online(node, &token(ORG, "observer", "viewer"))
        .await
        .iter()
        .find(|m| m.user_id == who)
        .map_or(0, |m| m.connections)
}

/// Waits until `node` lists `who` with `n` connections.
async fn until_connections(node: &TestServer, who: &str, n: u32) {
    let deadline = Instant::now() + WAIT;
    while connections(node, who).await != n {
        assert!(
            Instant::now() < deadline,
            "{} never listed {who} with {n} connections",
            node.addr
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_user_on_two_nodes_is_one_member_and_goes_offline_once_when_both_die() {
    if !services_or_skip(false) {
        return;
    }
    let mut cluster = Cluster::start(3, FLAGS).await;
    let alice_t = token(ORG, "alice", "member");
    let mut observer = observer_on(&cluster.nodes[2]).await;

    let mut on_a = Sub::open(&cluster.nodes[0], &alice_t, ORG, "", &[1])
        .await
        .unwrap();
    on_a.caught_up().await;
    let mut on_b = Sub::open(&cluster.nodes[1], &alice_t, ORG, "", &[1])
        .await
        .unwrap();
    on_b.caught_up().await;
    assert_eq!(next_presence(&mut observer).await, (true, "alice".into()));
    for node in &cluster.nodes {
        until_connections(node, "alice", 2).await;
    }

    // A dies: alice stays online through B, without an offline/online flicker.
    cluster.nodes[0].kill().await;
    for node in &cluster.nodes[1..] {
        until_connections(node, "alice", 1).await;
    }
    tokio::time::sleep(GRACE + Duration::from_millis(500)).await;
    let c = &cluster.nodes[2];
    let mut carol = Sub::open(c, &token(ORG, "carol", "viewer"), ORG, "", &[1])
        .await
        .unwrap();
    carol.caught_up().await;
    assert_eq!(
        next_presence(&mut observer).await,
        (true, "carol".into()),
        "alice flickered when A died"
    );
    assert_eq!(connections(&cluster.nodes[1], "alice").await, 1);

    // B dies too: alice goes offline, once, within the node timeout plus the grace.
    let t0 = Instant::now();
    cluster.nodes[1].kill().await;
    assert_eq!(next_presence(&mut observer).await, (false, "alice".into()));
    let took = t0.elapsed();
    eprintln!(
        "offline {took:?} after the last node died (timeout {NODE_TIMEOUT:?}, grace {GRACE:?})"
    );
    assert!(took < Duration::from_secs(30) + GRACE, "{took:?}");
    assert!(
        took >= GRACE,
        "offline before the grace period passed: {took:?}"
    );
    let c = &cluster.nodes[2];
    let mut dave = Sub::open(c, &token(ORG, "dave", "viewer"), ORG, "", &[1])
        .await
        .unwrap();
    dave.caught_up().await;
    assert_eq!(
        next_presence(&mut observer).await,
        (true, "dave".into()),
        "a second announcement for alice"
    );
    assert_eq!(connections(c, "alice").await, 0);
    drop((on_a, on_b));
}

/// A node stopped with SIGTERM tells the others it is leaving: its users go offline after the
/// grace period, not after the (here long) node timeout.
#[tokio::test]
async fn a_stopped_node_says_it_leaves_and_its_users_go_offline_after_the_grace() {
    if !services_or_skip(false) {
        return;
    }
    let flags = [
        "--presence-grace",
        "1s",
        "--presence-heartbeat",
        "200ms",
        "--presence-node-timeout",
        "60s",
    ];
    let mut cluster = Cluster::start(2, &flags).await;
    let mut observer = observer_on(&cluster.nodes[1]).await;
    let mut on_a = Sub::open(
        &cluster.nodes[0],
        &token(ORG, "alice", "member"),
        ORG,
        "",
        &[1],
    )
    .await
    .unwrap();
    on_a.caught_up().await;
    assert_eq!(next_presence(&mut observer).await, (true, "alice".into()));
    until_connections(&cluster.nodes[1], "alice", 1).await;

    let t0 = Instant::now();
    cluster.nodes[0].terminate().await;
    assert_eq!(next_presence(&mut observer).await, (false, "alice".into()));
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "offline {took:?} after SIGTERM: the node timeout, not a leave"
    );
    drop(on_a);
}

/// A poll-only user: a Poll waiting on node A (longer than 5 s + the grace) keeps them online
/// for the observer on node C, since A's heartbeats carry its waiting Polls; once it ended they
/// go offline within the grace plus 5 s (plus a heartbeat), not earlier than 5 s.
#[tokio::test]
async fn a_poll_waiting_on_one_node_keeps_its_user_online_and_offline_within_grace_plus_5s() {
    if !services_or_skip(false) {
        return;
    }
    const POLL_ONLINE: Duration = Duration::from_secs(5);
    const HEARTBEAT: Duration = Duration::from_millis(200);
    let cluster = Cluster::start(3, FLAGS).await;
    let mut observer = observer_on(&cluster.nodes[2]).await;
    let paula = token(ORG, "paula", "viewer");
    let a = &cluster.nodes[0];
    let head = snapshot(a, &paula).await.cursor;
    let mut events = a.events(&paula).await;
    let poll = tokio::spawn(async move {
        let req = PollRequest {
            org_id: ORG.into(),
            after_cursor: head,
            wait_ms: 8_000,
            ..Default::default()
        };
        let answer = events.poll(req).await.expect("poll").into_inner();
        (answer, Instant::now())
    });
    assert_eq!(next_presence(&mut observer).await, (true, "paula".into()));
    assert_eq!(next_presence(&mut observer).await, (false, "paula".into()));
    let offline_at = Instant::now();
    let (answer, poll_ended) = poll.await.unwrap();
    assert!(answer.events.is_empty());
    let took = offline_at.saturating_duration_since(poll_ended);
    eprintln!("offline on another node {took:?} after the last Poll ended (grace {GRACE:?})");
    assert!(
        took >= POLL_ONLINE,
        "offline {took:?} after the Poll ended (0: while it waited)"
    );
    assert!(
        took <= GRACE + POLL_ONLINE + HEARTBEAT + Duration::from_millis(500),
        "offline {took:?} after the Poll ended"
    );
}

/// A node holding more users than one presence message carries (2,000) sends its set in parts:
/// the other node lists every one of them.
#[tokio::test]
async fn a_set_of_thousands_of_users_reaches_the_other_node_whole() {
    if !services_or_skip(false) {
        return;
    }
    // Three parts.
    const USERS: usize = 4_500;
    let mut flags = FLAGS.to_vec();
    flags.extend(["--max-concurrent-streams", "5000"]);
    let cluster = Cluster::start(2, &flags).await;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let observer = token(ORG, "observer", "viewer");
    let head = snapshot(a, &observer).await.cursor;
    // Each user waits in a Poll on A, which keeps them online while it waits.
    let channel = a.channel().await;
    let polls: Vec<_> = (0..USERS)
        .map(|i| {
            let user = token(ORG, &format!("u{i}"), "viewer");
            let mut events =
                EventServiceClient::with_interceptor(channel.clone(), Auth::new(&user));
            let req = PollRequest {
                org_id: ORG.into(),
                after_cursor: head.clone(),
                wait_ms: 30_000,
                ..Default::default()
            };
            tokio::spawn(async move { events.poll(req).await })
        })
        .collect();
    let deadline = Instant::now() + WAIT;
    loop {
        let members = online(b, &observer).await;
        let listed = members
            .iter()
            .filter(|m| m.user_id.starts_with('u'))
            .count();
        if listed == USERS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B lists {listed} of the {USERS} users waiting on A"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for poll in polls {
        poll.abort();
    }
}
