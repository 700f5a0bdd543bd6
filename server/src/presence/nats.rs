//! The cluster presence engine: every node tells the others over NATS which users it has streams
//! and waiting or recent Polls for, and every node computes the same cluster-wide presence from the merged
//! state, announcing each transition to its own subscribers only.
//!
//! The shape follows Phoenix Tracker (each node is the only writer of its own entries, broadcasts
//! them on a heartbeat, and a node not heard from for a while is taken as down and its entries
//! dropped) without its CRDT: since no entry has two writers, merging is "replace that node's set
//! with its newest message" (newest by the node's incarnation and version, so NATS reordering or
//! duplicating a heartbeat changes nothing). A node sends its whole set on every heartbeat and soon
//! after every change (in parts of at most 2,000 users, which count once all have come), so one
//! lost message costs at most one heartbeat interval.
//!
//! Transitions: the cluster-wide count of a user's streams and Polls drives the embedded engine
//! (`MemoryPresence::set_connections`), so grace, timers and the order of announcements are the same
//! as on one node. A user moving from a dying node to a live one within the grace period does not
//! flicker: the dead node's streams stop counting after `node_timeout`, the grace starts then, and
//! the live node's heartbeat (sent at once on the new stream) ends it. A node that was SIGKILLed
//! has its users offline after `node_timeout` + one sweep + the grace period; one that is stopped
//! says it leaves as the last step of its shutdown, and its users go offline after the grace.
use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use async_nats::Client;
use futures::StreamExt;
use orgpulse::proto::Member;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::log_limit::LogLimit;

use super::{
    Announce, MemoryPresence, POLL_ONLINE, Presence, PresenceGuard, Via, memory::Connections,
};

type Key = (String, String);

/// How long shutdown waits for NATS to take the leave message.
const LEAVE_FLUSH: Duration = Duration::from_millis(400);
/// The least time changes gather for before the set goes out again.
const MIN_GATHER: Duration = Duration::from_millis(10);
/// A send's cost (its set built and encoded) times this is how long the next changes gather:
/// sending takes at most about a tenth of the node's time, whatever the set's size.
const GATHER_PER_COST: u32 = 10;
/// A set that could not be sent (larger than NATS takes, say).
static NOT_SENT: LogLimit = LogLimit::new();

/// The clocks of cluster presence.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a user stays online after their last stream in the cluster closed.
    pub grace: Duration,
    /// How often a node sends its set when nothing changes.
    pub heartbeat: Duration,
    /// A node silent this long is down: its streams stop counting.
    pub node_timeout: Duration,
}

/// What one node has for one user: open streams, waiting Polls, and how long their last Poll
/// keeps them online.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Held {
    streams: u32,
    /// Absent in the heartbeats of nodes from before Polls were counted while waiting.
    #[serde(default)]
    polls: u32,
    poll_left_ms: u64,
}

/// One node's whole presence set, or one part of it, as sent on the wire (JSON).
#[derive(Debug, Serialize, Deserialize)]
struct Heartbeat {
    node: String,
    /// Random per process: a restarted node's versions start over.
    incarnation: u64,
    version: u64,
    /// The node is shutting down: drop its entries now.
    leaving: bool,
    /// This message is part `part` (from 0) of `parts` of the set at `version`: a set of more than
    /// [`PART_USERS`] users goes in parts (NATS takes 1 MB per message by default), and counts
    /// once all of them are here. Absent in the messages of nodes that sent one message per set.
    #[serde(default)]
    part: u32,
    #[serde(default = "one_part")]
    parts: u32,
    users: Vec<(String, String, Held)>,
}

fn one_part() -> u32 {
    1
}

/// Most users in one message: each entry is at most ~200 bytes of JSON (ids are at most 64
/// characters that JSON does not escape), so a part stays below 400 KB.
const PART_USERS: usize = 2000;

/// The parts of another node's newest set that have come so far.
struct Assembling {
    incarnation: u64,
    version: u64,
    got: Vec<bool>,
    users: Vec<(String, String, Held)>,
}

/// Another node's latest set.
struct Remote {
    incarnation: u64,
    version: u64,
    heard: Instant,
    users: HashMap<Key, Connections>,
}

#[derive(Default)]
struct State {
    local: HashMap<Key, Connections>,
    remote: HashMap<String, Remote>,
    /// Sets sent in parts, per node, until their last part comes.
    assembling: HashMap<String, Assembling>,
    version: u64,
}

impl State {
    /// The whole set once `hb` completes it: `hb` itself when it is a set of one part; None
    /// while parts are missing, or for a part of a set older than one already assembling.
    fn assemble(&mut self, hb: Heartbeat) -> Option<Heartbeat> {
        if hb.parts <= 1 {
            // A whole set: the parts of an older one will not be needed.
            if self
                .assembling
                .get(&hb.node)
                .is_some_and(|a| a.incarnation != hb.incarnation || a.version <= hb.version)
            {
                self.assembling.remove(&hb.node);
            }
            return Some(hb);
        }
        if hb.part >= hb.parts {
            return None;
        }
        let same = |a: &Assembling| (a.incarnation, a.version) == (hb.incarnation, hb.version);
        let older = |a: &Assembling| a.incarnation == hb.incarnation && a.version > hb.version;
        let slot = self.assembling.get(&hb.node);
        if slot.is_some_and(older) {
            return None;
        }
        if !slot.is_some_and(|a| same(a) && a.got.len() == hb.parts as usize) {
            let fresh = Assembling {
                incarnation: hb.incarnation,
                version: hb.version,
                got: vec![false; hb.parts as usize],
                users: Vec::new(),
            };
            self.assembling.insert(hb.node.clone(), fresh);
        }
        let a = self.assembling.get_mut(&hb.node)?;
        if std::mem::replace(&mut a.got[hb.part as usize], true) {
            return None;
        }
        a.users.extend(hb.users);
        if a.got.iter().any(|got| !got) {
            return None;
        }
        let a = self.assembling.remove(&hb.node)?;
        Some(Heartbeat {
            users: a.users,
            part: 0,
            parts: 1,
            ..hb
        })
    }

    /// The user's streams and waiting Polls on every live node, and their latest Poll deadline.
    fn cluster_wide(&self, key: &Key) -> Connections {
        let nodes = self.local.get(key).into_iter();
        let nodes = nodes.chain(self.remote.values().filter_map(|r| r.users.get(key)));
        nodes.fold(Connections::default(), |sum, c| Connections {
            streams: sum.streams + c.streams,
            polls: sum.polls + c.polls,
            poll_until: sum.poll_until.max(c.poll_until),
        })
    }
}

pub struct NatsPresence {
    node: String,
    /// How this node's own messages begin (NATS hands them back to it): `{"node":"<node>",`.
    own_prefix: Vec<u8>,
    incarnation: u64,
    subject: String,
    client: Client,
    /// The announced (cluster-wide) presence, with the grace timers.
    merged: Arc<MemoryPresence>,
    state: Mutex<State>,
    changed: Notify,
    node_timeout: Duration,
    /// Set by `leave`: no more heartbeats.
    left: AtomicBool,
}

impl NatsPresence {
    /// Cluster presence for node `node` on `client` under `prefix`, with `timing`. Heartbeats
    /// until `stop`; `leave` then tells the other nodes.
    pub async fn start(
        client: Client,
        prefix: &str,
        node: &str,
        announcer: impl Announce,
        timing: Timing,
        stop: CancellationToken,
    ) -> anyhow::Result<Arc<NatsPresence>> {
        let subject = format!("{prefix}.presence");
        let sub = client.subscribe(subject.clone()).await?;
        let presence = Arc::new(NatsPresence {
            node: node.to_string(),
            own_prefix: own_prefix(node),
            incarnation: rand::random(),
            subject,
            client,
            merged: MemoryPresence::new(announcer, timing.grace),
            state: Mutex::default(),
            changed: Notify::new(),
            node_timeout: timing.node_timeout,
            left: AtomicBool::new(false),
        });
        tokio::spawn(presence.clone().receive(sub));
        tokio::spawn(presence.clone().send_heartbeats(timing.heartbeat, stop));
        Ok(presence)
    }

    /// Applies a change of this node's entry for `key` and recomputes the user's presence.
    fn change_local(&self, org: &str, user: &str, change: impl FnOnce(&mut Connections)) {
        let key = (org.to_string(), user.to_string());
        let mut state = self.state.lock();
        let local = state.local.entry(key.clone()).or_default();
        change(local);
        if !local.online(Instant::now()) {
            state.local.remove(&key);
        }
        state.version += 1;
        self.recompute(&state, [&key]);
        drop(state);
        self.changed.notify_one();
    }

    /// Feeds the cluster-wide counts of `keys` to the announced presence, with the state locked
    /// (so transitions are announced in the order of the state).
    fn recompute<'k>(&self, state: &State, keys: impl IntoIterator<Item = &'k Key>) {
        for key in keys {
            let held = state.cluster_wide(key);
            self.merged.set_connections(&key.0, &key.1, held);
        }
    }

    /// This node's set as heartbeat messages, in parts of at most [`PART_USERS`] users; one
    /// message without users when the node is leaving (the others drop all its entries).
    fn heartbeat(&self, leaving: bool) -> Vec<Heartbeat> {
        let state = self.state.lock();
        let now = Instant::now();
        let users = state
            .local
            .iter()
            .filter(|(_, l)| !leaving && l.online(now))
            .map(|((org, user), l)| {
                let poll_left = l.poll_until.map_or(Duration::ZERO, |t| t - now.min(t));
                let held = Held {
                    streams: l.streams,
                    polls: l.polls,
                    poll_left_ms: poll_left.as_millis() as u64,
                };
                (org.clone(), user.clone(), held)
            });
        split(users.collect(), |part, parts, users| Heartbeat {
            node: self.node.clone(),
            incarnation: self.incarnation,
            version: state.version,
            leaving,
            part,
            parts,
            users,
        })
    }

    /// Tells the other nodes this one is leaving (its streams stop counting there at once) and
    /// waits until NATS has it; no heartbeat goes out after it. Part of the shutdown.
    pub async fn leave(&self) {
        self.left.store(true, Ordering::SeqCst);
        self.publish(self.heartbeat(true)).await;
        if tokio::time::timeout(LEAVE_FLUSH, self.client.flush())
            .await
            .is_err()
        {
            tracing::warn!("presence: the leave message may not have reached NATS");
        }
    }

    async fn publish(&self, parts: Vec<Heartbeat>) {
        for hb in parts {
            if !hb.leaving && self.left.load(Ordering::SeqCst) {
                return;
            }
            let payload = serde_json::to_vec(&hb).expect("a heartbeat serializes");
            let bytes = payload.len();
            if let Err(e) = self
                .client
                .publish(self.subject.clone(), payload.into())
                .await
            {
                NOT_SENT.log(|suppressed| {
                    tracing::warn!(error = %e, bytes, users = hb.users.len(), suppressed, "presence heartbeat not sent");
                });
            }
        }
    }

    /// Every `every` and soon after each local change: this node's set. Also drops the nodes not
    /// heard from within `node_timeout`. Ends at `stop`.
    ///
    /// Changes that come together go out together: they gather for [`MIN_GATHER`], or for
    /// [`GATHER_PER_COST`] times what the last send cost. The set goes whole in every message, so
    /// during a storm of connections to a node holding 100,000 users, sending it after every
    /// 10 ms of changes was most of the node's time.
    async fn send_heartbeats(self: Arc<Self>, every: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        let mut gather = MIN_GATHER;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.drop_silent_nodes(),
                _ = self.changed.notified() => tokio::time::sleep(gather).await,
            }
            let started = Instant::now();
            self.publish(self.heartbeat(false)).await;
            gather = (started.elapsed() * GATHER_PER_COST).max(MIN_GATHER);
        }
    }

    fn drop_silent_nodes(&self) {
        let mut state = self.state.lock();
        let now = Instant::now();
        let silent: Vec<String> = state
            .remote
            .iter()
            .filter(|(_, r)| now.duration_since(r.heard) > self.node_timeout)
            .map(|(node, _)| node.clone())
            .collect();
        for node in silent {
            tracing::warn!(node = %node, "presence: node not heard from; its streams no longer count");
            if let Some(gone) = state.remote.remove(&node) {
                self.recompute(&state, gone.users.keys());
            }
        }
    }

    async fn receive(self: Arc<Self>, mut sub: async_nats::Subscriber) {
        while let Some(msg) = sub.next().await {
            // This node's own set comes back too: recognized by its first bytes (`node` is the
            // first field written) rather than parsed, as it can be 100,000 users long.
            if msg.payload.starts_with(&self.own_prefix) {
                continue;
            }
            match serde_json::from_slice::<Heartbeat>(&msg.payload) {
                Ok(hb) if hb.node != self.node => self.merge(hb),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring a presence message that is not a heartbeat")
                }
            }
        }
    }

    /// Replaces the sender's set with `hb` unless an equal or newer one is already here.
    fn merge(&self, hb: Heartbeat) {
        let mut state = self.state.lock();
        let now = Instant::now();
        let Some(hb) = state.assemble(hb) else {
            return;
        };
        let known = state.remote.get(&hb.node);
        let newcomer = known.is_none_or(|r| r.incarnation != hb.incarnation);
        if known.is_some_and(|r| r.incarnation == hb.incarnation && r.version > hb.version) {
            return;
        }
        let users: HashMap<Key, Connections> = hb
            .users
            .into_iter()
            .map(|(org, user, h)| {
                let poll_until =
                    (h.poll_left_ms > 0).then(|| now + Duration::from_millis(h.poll_left_ms));
                let held = Connections {
                    streams: h.streams,
                    polls: h.polls,
                    poll_until,
                };
                ((org, user), held)
            })
            .collect();
        let before = state.remote.remove(&hb.node);
        let mut touched: HashSet<Key> = users.keys().cloned().collect();
        if let Some(before) = before {
            touched.extend(before.users.into_keys());
        }
        if !hb.leaving {
            state.remote.insert(
                hb.node.clone(),
                Remote {
                    incarnation: hb.incarnation,
                    version: hb.version,
                    heard: now,
                    users,
                },
            );
        }
        self.recompute(&state, &touched);
        drop(state);
        if newcomer && !hb.leaving {
            // A node that just (re)started learns everyone's set now, not at the next heartbeat.
            self.changed.notify_one();
        }
    }
}

/// How the messages of node `node` begin: `{"node":"<node>",`.
fn own_prefix(node: &str) -> Vec<u8> {
    let name = serde_json::to_string(node).expect("a string serializes");
    format!("{{\"node\":{name},").into_bytes()
}

/// `users` in parts of at most [`PART_USERS`], each made by `part(index, count, users)`; one
/// part when there are no users.
fn split<T, U>(users: Vec<U>, part: impl Fn(u32, u32, Vec<U>) -> T) -> Vec<T> {
    let parts = users.len().div_ceil(PART_USERS).max(1);
    let mut users = users.into_iter();
    (0..parts)
        .map(|i| {
            part(
                i as u32,
                parts as u32,
                users.by_ref().take(PART_USERS).collect(),
            )
        })
        .collect()
}

impl Presence for NatsPresence {
    fn connect(self: Arc<Self>, org: &Arc<str>, user: &Arc<str>, via: Via) -> PresenceGuard {
        self.change_local(org, user, |l| match via {
            Via::Stream => l.streams += 1,
            Via::Poll => l.polls += 1,
        });
        PresenceGuard::new(self, org, user, via)
    }

    fn members(&self, org: &str) -> Vec<Member> {
        self.merged.members(org)
    }

    fn disconnect(self: Arc<Self>, org: &Arc<str>, user: &Arc<str>, via: Via) {
        self.change_local(org, user, |l| match via {
            Via::Stream => l.streams = l.streams.saturating_sub(1),
            Via::Poll => {
                l.polls = l.polls.saturating_sub(1);
                l.poll_until = l.poll_until.max(Some(Instant::now() + POLL_ONLINE));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(version: u64, part: u32, parts: u32, users: &[&str]) -> Heartbeat {
        let held = Held {
            streams: 1,
            polls: 0,
            poll_left_ms: 0,
        };
        Heartbeat {
            node: "b".into(),
            incarnation: 7,
            version,
            leaving: false,
            part,
            parts,
            users: users
                .iter()
                .map(|u| ("acme".into(), u.to_string(), held))
                .collect(),
        }
    }

    fn names(hb: &Heartbeat) -> Vec<&str> {
        let mut users: Vec<&str> = hb.users.iter().map(|(_, u, _)| u.as_str()).collect();
        users.sort();
        users
    }

    #[test]
    fn a_large_set_goes_in_parts_and_counts_once_all_are_here() {
        let sizes = |n: usize| split((0..n).collect(), |_, _, u: Vec<usize>| u.len());
        assert_eq!(sizes(0), [0]);
        assert_eq!(sizes(PART_USERS), [PART_USERS]);
        assert_eq!(sizes(2 * PART_USERS + 1), [PART_USERS, PART_USERS, 1]);
        let indexes = split(vec![1, 2, 3], |i, n, _| (i, n));
        assert_eq!(indexes, [(0, 1)]);

        let mut state = State::default();
        // Out of order, a part twice: whole once the last one comes.
        assert!(state.assemble(part(5, 2, 3, &["c"])).is_none());
        assert!(state.assemble(part(5, 0, 3, &["a"])).is_none());
        assert!(state.assemble(part(5, 0, 3, &["a"])).is_none());
        let whole = state
            .assemble(part(5, 1, 3, &["b"]))
            .expect("all parts are here");
        assert_eq!((whole.version, whole.parts), (5, 1));
        assert_eq!(names(&whole), ["a", "b", "c"]);
        assert!(state.assembling.is_empty());

        // A newer set's part drops the older one's; the older one's late parts are ignored.
        assert!(state.assemble(part(6, 0, 2, &["a"])).is_none());
        assert!(state.assemble(part(7, 0, 2, &["x"])).is_none());
        assert!(state.assemble(part(6, 1, 2, &["b"])).is_none());
        let whole = state
            .assemble(part(7, 1, 2, &["y"]))
            .expect("set 7 is whole");
        assert_eq!(names(&whole), ["x", "y"]);

        // A set in one message passes through and ends an older assembly; a part out of range
        // is ignored.
        assert!(state.assemble(part(8, 0, 2, &["a"])).is_none());
        assert!(state.assemble(part(9, 0, 1, &["z"])).is_some());
        assert!(state.assembling.is_empty());
        assert!(state.assemble(part(10, 2, 2, &["a"])).is_none());
    }

    #[test]
    fn a_node_knows_its_own_messages_by_their_first_bytes() {
        let message = serde_json::to_vec(&part(1, 0, 1, &["a"])).unwrap();
        assert!(message.starts_with(&own_prefix("b")));
        for other in ["", "bb", "a", "b\"", "\"b"] {
            assert!(!message.starts_with(&own_prefix(other)), "{other}");
        }
    }

    #[test]
    fn cluster_wide_counts_add_every_live_node_and_keep_the_latest_poll() {
        let mut state = State::default();
        let key: Key = ("acme".into(), "alice".into());
        let now = Instant::now();
        let held = |streams, polls, poll_until| Connections {
            streams,
            polls,
            poll_until,
        };
        state.local.insert(key.clone(), held(1, 1, None));
        for (node, c) in [
            ("b", held(2, 0, Some(now))),
            ("c", held(0, 3, Some(now + POLL_ONLINE))),
        ] {
            state.remote.insert(
                node.into(),
                Remote {
                    incarnation: 1,
                    version: 1,
                    heard: now,
                    users: HashMap::from([(key.clone(), c)]),
                },
            );
        }
        assert_eq!(
            state.cluster_wide(&key),
            held(3, 4, Some(now + POLL_ONLINE))
        );
        assert_eq!(
            state.cluster_wide(&("acme".into(), "bob".into())),
            Connections::default()
        );
    }
}
