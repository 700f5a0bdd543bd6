//! Who is doing what (API.md "Presence state and broadcast"): presence state per (user, topic)
//! with a TTL, and ephemeral broadcasts. Nothing here is stored: events are `seq = 0`, delivered at
//! most once to the subscribers of the moment through the Hub's ephemeral path, where the
//! subscriber's kinds, the audience rule of `audience.rs` and its topics filter apply.
//!
//! Every node holds the whole table of its cluster's entries (so `ListPresence` answers from
//! memory on any node) and announces each change of it to its own subscribers. A change made on a
//! node is applied there and sent to the others over NATS (`<prefix>.activity`), which apply it
//! the same way; an entry is replaced only by a newer write (origin wall clock, then node id), so
//! reordered or repeated messages change nothing. Every node expires entries by their TTL on its
//! own clock, and announces each expiry once to its own subscribers. Entries are not tied to the
//! node that took the write: a client that moves to another node and refreshes its entry there
//! (same state) announces nothing, so a move does not flicker; entries of a dead node's clients
//! that do not come back expire everywhere within their TTL. A node that starts asks the others
//! for the entries they took (`sync`), so its `ListPresence` is whole from the start.
//!
//! Broadcasts go to this node's subscribers at once and to the other nodes over the same subject;
//! NATS keeps one publisher's messages in order, so a sender's broadcasts arrive in order.
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use async_nats::Client;
use bytes::Bytes;
use futures::StreamExt;
use orgpulse::proto::{
    BroadcastMessage, Event, EventKind, PresenceEntry, PresenceState, event::Payload,
};
use parking_lot::Mutex;
use prost::Message;
use prost_types::Struct;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    audience::{self, Audience, Viewer},
    hub::{Ephemeral, Hub},
    store::{millis, timestamp},
};

/// `SetPresenceRequest.ttl_ms` 0 means this.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);
/// Shortest and longest presence TTL.
pub const MIN_TTL: Duration = Duration::from_secs(1);
pub const MAX_TTL: Duration = Duration::from_secs(120);
/// Largest presence state and broadcast data, encoded.
pub const MAX_STATE: usize = 1024;
pub const MAX_BROADCAST_DATA: usize = 4096;
/// Per user per node and second.
pub const BROADCASTS_PER_SEC: f64 = 20.0;
pub const SETS_PER_SEC: f64 = 10.0;
/// Live presence entries per user.
pub const MAX_ENTRIES_PER_USER: usize = 32;
/// How often expired entries are looked for.
const SWEEP: Duration = Duration::from_millis(100);
/// Changes waiting for NATS, at most.
const RELAY_QUEUE: usize = 10_000;

/// Why a change was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Over a per-user rate or the entry limit (RESOURCE_EXHAUSTED).
    Exhausted(String),
}

/// (org, topic, user)
type Key = (Arc<str>, Arc<str>, Arc<str>);

struct Entry {
    state: Struct,
    audience: Option<Arc<Audience>>,
    expires: Instant,
    /// When it was written (ms since the epoch on its origin's clock) and where: the newer write
    /// wins.
    at_ms: i64,
    node: Arc<str>,
}

impl Entry {
    fn newer_than(&self, at_ms: i64, node: &str) -> bool {
        (self.at_ms, &*self.node) > (at_ms, node)
    }
}

/// One change as the nodes tell each other (prost, over NATS).
#[derive(Clone, PartialEq, prost::Message)]
struct Op {
    /// 1 set presence (empty state: remove), 2 broadcast, 3 sync request.
    #[prost(uint32, tag = "1")]
    what: u32,
    #[prost(string, tag = "2")]
    node: String,
    #[prost(string, tag = "3")]
    org: String,
    #[prost(string, tag = "4")]
    topic: String,
    #[prost(string, tag = "5")]
    user: String,
    #[prost(message, optional, tag = "6")]
    data: Option<Struct>,
    /// The stored form of the audience (`audience::stored`); absent = the whole org.
    #[prost(string, optional, tag = "7")]
    audience: Option<String>,
    #[prost(uint64, tag = "8")]
    ttl_ms: u64,
    #[prost(int64, tag = "9")]
    at_ms: i64,
}

const OP_SET: u32 = 1;
const OP_BROADCAST: u32 = 2;
const OP_SYNC: u32 = 3;

/// (org, user, what)
type BucketKey = (Arc<str>, Arc<str>, u32);

/// A token bucket: `rate` per second, bursts up to one second's worth.
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn take(&mut self, rate: f64, now: Instant) -> bool {
        let refill = now.duration_since(self.last).as_secs_f64() * rate;
        self.tokens = (self.tokens + refill).min(rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Default)]
struct Table {
    entries: HashMap<Key, Entry>,
    /// Live entries per (org, user), against [`MAX_ENTRIES_PER_USER`].
    per_user: HashMap<(Arc<str>, Arc<str>), usize>,
}

impl Table {
    fn insert(&mut self, key: Key, e: Entry) -> Option<Entry> {
        let old = self.entries.insert(key.clone(), e);
        if old.is_none() {
            *self.per_user.entry((key.0, key.2)).or_default() += 1;
        }
        old
    }

    fn remove(&mut self, key: &Key) -> Option<Entry> {
        let old = self.entries.remove(key)?;
        let user = (key.0.clone(), key.2.clone());
        if let Some(n) = self.per_user.get_mut(&user) {
            *n -= 1;
            if *n == 0 {
                self.per_user.remove(&user);
            }
        }
        Some(old)
    }
}

/// The presence-state table and the broadcasts of this node.
pub struct Activity {
    hub: Hub,
    node: Arc<str>,
    table: Mutex<Table>,
    /// Per (org, user, what): the rate limits.
    buckets: Mutex<HashMap<BucketKey, Bucket>>,
    /// The cluster's changes go out through this queue, published in order by one task.
    relay: Option<mpsc::Sender<Op>>,
}

impl Activity {
    /// This node's engine, announcing to `hub`; with `nats` (client, subject prefix) it joins the
    /// cluster's. Sweeps expired entries until `stop`.
    pub async fn start(
        hub: Hub,
        node: &str,
        nats: Option<(Client, &str)>,
        stop: CancellationToken,
    ) -> anyhow::Result<Arc<Activity>> {
        let mut relay = None;
        let mut subscription = None;
        if let Some((client, prefix)) = nats {
            let subject = format!("{prefix}.activity");
            subscription = Some(client.subscribe(subject.clone()).await?);
            let (tx, rx) = mpsc::channel(RELAY_QUEUE);
            tokio::spawn(publish(client, subject, rx));
            relay = Some(tx);
        }
        let activity = Arc::new(Activity {
            hub,
            node: node.into(),
            table: Mutex::default(),
            buckets: Mutex::default(),
            relay,
        });
        if let Some(sub) = subscription {
            tokio::spawn(activity.clone().receive(sub, stop.clone()));
            activity.send(Op {
                what: OP_SYNC,
                node: node.to_string(),
                ..Default::default()
            });
        }
        tokio::spawn(activity.clone().sweep(stop));
        Ok(activity)
    }

    /// Sets (or with an empty `state` removes) `by`'s entry on `topic`.
    pub fn set_presence(
        &self,
        org: &str,
        by: &Viewer,
        topic: &str,
        state: Struct,
        audience: Option<Audience>,
        ttl: Duration,
    ) -> Result<(), Refused> {
        self.take(org, &by.user, OP_SET, SETS_PER_SEC, "SetPresence")?;
        let key: Key = (org.into(), topic.into(), by.user.clone());
        if !state.fields.is_empty() {
            let table = self.table.lock();
            let held = table.per_user.get(&(key.0.clone(), key.2.clone())).copied();
            if !table.entries.contains_key(&key) && held >= Some(MAX_ENTRIES_PER_USER) {
                return Err(Refused::Exhausted(format!(
                    "too many presence entries for this user (at most {MAX_ENTRIES_PER_USER})"
                )));
            }
        }
        let op = Op {
            what: OP_SET,
            node: self.node.to_string(),
            org: org.into(),
            topic: topic.into(),
            user: by.user.to_string(),
            audience: audience.as_ref().map(audience::stored),
            data: Some(state),
            ttl_ms: ttl.as_millis() as u64,
            at_ms: millis(SystemTime::now()),
        };
        self.apply(&op, audience.map(Arc::new));
        self.send(op);
        Ok(())
    }

    /// The entries of `org` (on `topic`, or all when empty) that `by` may see.
    pub fn list(&self, org: &str, by: &Viewer, topic: &str) -> Vec<PresenceEntry> {
        let table = self.table.lock();
        let mut entries: Vec<PresenceEntry> = table
            .entries
            .iter()
            .filter(|((o, t, _), e)| {
                **o == *org
                    && (topic.is_empty() || **t == *topic)
                    && audience::admits(e.audience.as_deref(), by)
            })
            .map(|((_, t, u), e)| PresenceEntry {
                user_id: u.to_string(),
                topic: t.to_string(),
                state: Some(e.state.clone()),
                updated_at: Some(prost_types::Timestamp {
                    seconds: e.at_ms.div_euclid(1000),
                    nanos: (e.at_ms.rem_euclid(1000) * 1_000_000) as i32,
                }),
            })
            .collect();
        entries.sort_by(|a, b| (&a.topic, &a.user_id).cmp(&(&b.topic, &b.user_id)));
        entries
    }

    /// Sends `data` from `by` to the current subscribers of `org` it is for, on every node.
    pub fn broadcast(
        &self,
        org: &str,
        by: &Viewer,
        topic: &str,
        data: Struct,
        audience: Option<Audience>,
    ) -> Result<(), Refused> {
        self.take(org, &by.user, OP_BROADCAST, BROADCASTS_PER_SEC, "Broadcast")?;
        let op = Op {
            what: OP_BROADCAST,
            node: self.node.to_string(),
            org: org.into(),
            topic: topic.into(),
            user: by.user.to_string(),
            audience: audience.as_ref().map(audience::stored),
            data: Some(data),
            ..Default::default()
        };
        self.deliver_broadcast(&op, audience.map(Arc::new));
        self.send(op);
        Ok(())
    }

    /// One token of `by`'s `what` bucket, else RESOURCE_EXHAUSTED naming `rpc`.
    fn take(
        &self,
        org: &str,
        user: &Arc<str>,
        what: u32,
        rate: f64,
        rpc: &str,
    ) -> Result<(), Refused> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock();
        if buckets.len() > 10_000 {
            // Users idle for a second have full buckets again: forgetting them changes nothing.
            buckets.retain(|_, b| now.duration_since(b.last) < Duration::from_secs(1));
        }
        let bucket = buckets
            .entry((org.into(), user.clone(), what))
            .or_insert(Bucket {
                tokens: rate,
                last: now,
            });
        if bucket.take(rate, now) {
            Ok(())
        } else {
            Err(Refused::Exhausted(format!(
                "too many {rpc} calls for this user (at most {rate} per second)"
            )))
        }
    }

    /// Applies a presence write (local or from another node) and announces what changed.
    fn apply(&self, op: &Op, audience: Option<Arc<Audience>>) {
        let key: Key = (
            op.org.as_str().into(),
            op.topic.as_str().into(),
            op.user.as_str().into(),
        );
        let state = op.data.clone().unwrap_or_default();
        let mut table = self.table.lock();
        let old = table.entries.get(&key);
        if old.is_some_and(|e| e.newer_than(op.at_ms, &op.node)) {
            return;
        }
        let announce = if state.fields.is_empty() {
            table
                .remove(&key)
                .map(|old| (Struct::default(), old.audience))
        } else {
            let changed = old.is_none_or(|e| e.state != state || e.audience != audience);
            let entry = Entry {
                state: state.clone(),
                audience: audience.clone(),
                expires: Instant::now() + Duration::from_millis(op.ttl_ms),
                at_ms: op.at_ms,
                node: op.node.as_str().into(),
            };
            table.insert(key.clone(), entry);
            changed.then_some((state, audience))
        };
        // Announced with the table locked: every node announces an entry's changes in the order
        // it applied them.
        if let Some((state, audience)) = announce {
            self.announce(&key, state, audience);
        }
    }

    fn announce(&self, key: &Key, state: Struct, audience: Option<Arc<Audience>>) {
        let payload = Payload::PresenceState(PresenceState {
            user_id: key.2.to_string(),
            topic: key.1.to_string(),
            state: Some(state),
        });
        self.deliver(
            &key.0,
            &key.2,
            EventKind::Presence,
            &key.1,
            audience,
            payload,
        );
    }

    fn deliver_broadcast(&self, op: &Op, audience: Option<Arc<Audience>>) {
        let payload = Payload::Broadcast(BroadcastMessage {
            user_id: op.user.clone(),
            topic: op.topic.clone(),
            data: op.data.clone(),
        });
        self.deliver(
            &op.org,
            &op.user,
            EventKind::Broadcast,
            &op.topic,
            audience,
            payload,
        );
    }

    fn deliver(
        &self,
        org: &str,
        user: &str,
        kind: EventKind,
        topic: &str,
        audience: Option<Arc<Audience>>,
        payload: Payload,
    ) {
        let ev = Event {
            org_id: org.to_string(),
            time: Some(timestamp(SystemTime::now())),
            actor: user.to_string(),
            topics: vec![topic.to_string()],
            payload: Some(payload),
            ..Default::default()
        };
        let bytes: Bytes = ev.encode_to_vec().into();
        let ephemeral = Ephemeral {
            kind,
            audience,
            topic: Some(topic.into()),
            bytes,
        };
        self.hub.deliver_ephemeral(org, ephemeral);
    }

    /// Every [`SWEEP`]: removes the expired entries and announces each.
    async fn sweep(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(SWEEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            let mut table = self.table.lock();
            let expired: Vec<Key> = table
                .entries
                .iter()
                .filter(|(_, e)| e.expires <= now)
                .map(|(k, _)| k.clone())
                .collect();
            for key in expired {
                if let Some(old) = table.remove(&key) {
                    self.announce(&key, Struct::default(), old.audience);
                }
            }
        }
    }

    /// Tells the other nodes (nothing without a cluster), in call order. At most once: when
    /// NATS is far behind, a change is dropped (a presence write is repaired by the client's next
    /// refresh; a broadcast is at most once anyway).
    fn send(&self, op: Op) {
        if let Some(relay) = &self.relay
            && relay.try_send(op).is_err()
        {
            tracing::debug!("activity change not sent to the cluster: the queue is full");
        }
    }

    async fn receive(self: Arc<Self>, mut sub: async_nats::Subscriber, stop: CancellationToken) {
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return,
                msg = sub.next() => match msg {
                    Some(m) => m,
                    None => return,
                },
            };
            let Ok(op) = Op::decode(msg.payload) else {
                tracing::warn!("ignoring a message that is not an orgpulse activity change");
                continue;
            };
            if op.node == *self.node {
                continue;
            }
            let audience = match op
                .audience
                .as_deref()
                .map(audience::from_stored)
                .transpose()
            {
                Ok(a) => a.map(Arc::new),
                Err(e) => {
                    tracing::warn!(error = e, "ignoring an activity change with a bad audience");
                    continue;
                }
            };
            match op.what {
                OP_SET => self.apply(&op, audience),
                OP_BROADCAST => self.deliver_broadcast(&op, audience),
                OP_SYNC => self.resend_own(),
                _ => {}
            }
        }
    }

    /// The entries this node took, sent again (for a node that just started).
    fn resend_own(&self) {
        let now = Instant::now();
        let own: Vec<Op> = self
            .table
            .lock()
            .entries
            .iter()
            .filter(|(_, e)| e.node == self.node && e.expires > now)
            .map(|((org, topic, user), e)| Op {
                what: OP_SET,
                node: self.node.to_string(),
                org: org.to_string(),
                topic: topic.to_string(),
                user: user.to_string(),
                data: Some(e.state.clone()),
                audience: e.audience.as_deref().map(audience::stored),
                ttl_ms: e.expires.duration_since(now).as_millis() as u64,
                at_ms: e.at_ms,
            })
            .collect();
        for op in own {
            self.send(op);
        }
    }
}

/// Publishes the queued changes on `subject`, one after the other (so in order), until the
/// engine is gone.
async fn publish(client: Client, subject: String, mut rx: mpsc::Receiver<Op>) {
    while let Some(op) = rx.recv().await {
        if let Err(e) = client
            .publish(subject.clone(), op.encode_to_vec().into())
            .await
        {
            tracing::debug!(error = %e, "activity change not sent to the cluster");
        }
    }
}
