//! The cluster presence engine: every node tells the others over NATS which users it has streams
//! and waiting or recent Polls for, and every node computes the same cluster-wide presence from the merged
//! state, announcing each transition to its own subscribers only.
//!
//! The shape follows Phoenix Tracker (each node is the only writer of its own entries, broadcasts
//! them on a heartbeat, and a node not heard from for a while is taken as down and its entries
//! dropped) without its CRDT: since no entry has two writers, merging is "replace that node's set
//! with its newest message" (newest by the node's incarnation and version, so NATS reordering or
//! duplicating a heartbeat changes nothing). A node sends its whole set on every heartbeat and soon
//! after every change, so one lost message costs at most one heartbeat interval.
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

/// One node's whole presence set, as sent on the wire (JSON).
#[derive(Debug, Serialize, Deserialize)]
struct Heartbeat {
    node: String,
    /// Random per process: a restarted node's versions start over.
    incarnation: u64,
    version: u64,
    /// The node is shutting down: drop its entries now.
    leaving: bool,
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
    version: u64,
}

impl State {
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

    /// This node's set as a heartbeat.
    fn heartbeat(&self, leaving: bool) -> Heartbeat {
        let state = self.state.lock();
        let now = Instant::now();
        Heartbeat {
            node: self.node.clone(),
            incarnation: self.incarnation,
            version: state.version,
            leaving,
            users: state
                .local
                .iter()
                .filter(|(_, l)| l.online(now))
                .map(|((org, user), l)| {
                    let poll_left = l.poll_until.map_or(Duration::ZERO, |t| t - now.min(t));
                    let held = Held {
                        streams: l.streams,
                        polls: l.polls,
                        poll_left_ms: poll_left.as_millis() as u64,
                    };
                    (org.clone(), user.clone(), held)
                })
                .collect(),
        }
    }

    /// Tells the other nodes this one is leaving (its streams stop counting there at once) and
    /// waits until NATS has it; no heartbeat goes out after it. Part of the shutdown.
    pub async fn leave(&self) {
        self.left.store(true, Ordering::SeqCst);
        self.publish(&self.heartbeat(true)).await;
        if tokio::time::timeout(LEAVE_FLUSH, self.client.flush())
            .await
            .is_err()
        {
            tracing::warn!("presence: the leave message may not have reached NATS");
        }
    }

    async fn publish(&self, hb: &Heartbeat) {
        if !hb.leaving && self.left.load(Ordering::SeqCst) {
            return;
        }
        let payload = serde_json::to_vec(hb).expect("a heartbeat serializes");
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
            self.publish(&self.heartbeat(false)).await;
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
