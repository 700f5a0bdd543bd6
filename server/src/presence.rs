//! Presence: who in an org is online. A user is online while at least one of their Subscribe
//! streams is open, or while they polled within the last 45 s. `user_online` is sent when they come
//! online; `user_offline` only after the last stream closed and the grace period passed without a
//! new one, so a reconnect does not flicker. The embedded engine keeps it in memory.
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use orgpulse::proto::{Event, Member, PresenceChange, event::Payload};
use parking_lot::Mutex;
use prost::Message;
use tokio::time::Instant;

use crate::{hub::Hub, store::timestamp};

/// How long a Poll keeps its caller online.
pub const POLL_ONLINE: Duration = Duration::from_secs(45);

pub trait Presence: Send + Sync + 'static {
    /// A stream of `user` opened; it counts until the guard is dropped.
    fn connect(self: Arc<Self>, org: &str, user: &str) -> PresenceGuard;
    /// `user` polled just now.
    fn polled(self: Arc<Self>, org: &str, user: &str);
    /// The org's online members.
    fn members(&self, org: &str) -> Vec<Member>;
    /// A stream of `user` closed.
    fn disconnect(self: Arc<Self>, org: &str, user: &str);
}

/// Keeps one stream counted as online while alive.
pub struct PresenceGuard {
    presence: Arc<dyn Presence>,
    org: String,
    user: String,
}

impl Drop for PresenceGuard {
    fn drop(&mut self) {
        self.presence.clone().disconnect(&self.org, &self.user);
    }
}

struct Entry {
    streams: u32,
    since: SystemTime,
    poll_until: Option<Instant>,
    /// Bumped on every change, so a pending offline check that is stale does nothing.
    generation: u64,
}

pub struct MemoryPresence {
    hub: Hub,
    grace: Duration,
    users: Mutex<HashMap<(String, String), Entry>>,
}

impl MemoryPresence {
    pub fn new(hub: Hub, grace: Duration) -> Arc<Self> {
        Arc::new(MemoryPresence {
            hub,
            grace,
            users: Mutex::default(),
        })
    }

    fn announce(&self, org: &str, user: &str, online: bool) {
        let change = PresenceChange {
            user_id: user.to_string(),
        };
        let ev = Event {
            org_id: org.to_string(),
            time: Some(timestamp(SystemTime::now())),
            actor: user.to_string(),
            payload: Some(if online {
                Payload::UserOnline(change)
            } else {
                Payload::UserOffline(change)
            }),
            ..Default::default()
        };
        self.hub.deliver_ephemeral(org, ev.encode_to_vec().into());
    }

    /// Marks `user` present (one more stream, or a poll); announces them when they were not.
    fn touch(self: &Arc<Self>, org: &str, user: &str, stream: bool) {
        let now = Instant::now();
        let mut users = self.users.lock();
        let key = (org.to_string(), user.to_string());
        let new = !users.contains_key(&key);
        let e = users.entry(key).or_insert(Entry {
            streams: 0,
            since: SystemTime::now(),
            poll_until: None,
            generation: 0,
        });
        e.generation += 1;
        if stream {
            e.streams += 1;
        } else {
            e.poll_until = Some(now + POLL_ONLINE);
        }
        let check = (e.streams == 0).then_some((e.generation, now + POLL_ONLINE));
        drop(users);
        if new {
            self.announce(org, user, true);
        }
        if let Some((generation, at)) = check {
            self.expire_at(org, user, generation, at);
        }
    }

    /// At `at`, takes `user` offline unless anything changed since `generation`.
    fn expire_at(self: &Arc<Self>, org: &str, user: &str, generation: u64, at: Instant) {
        let me = self.clone();
        let (org, user) = (org.to_string(), user.to_string());
        tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let key = (org, user);
            let mut users = me.users.lock();
            let gone = users.get(&key).is_some_and(|e| {
                e.generation == generation
                    && e.streams == 0
                    && e.poll_until.is_none_or(|t| t <= Instant::now())
            });
            if gone {
                users.remove(&key);
                drop(users);
                me.announce(&key.0, &key.1, false);
            }
        });
    }
}

impl Presence for MemoryPresence {
    fn connect(self: Arc<Self>, org: &str, user: &str) -> PresenceGuard {
        self.touch(org, user, true);
        PresenceGuard {
            presence: self,
            org: org.to_string(),
            user: user.to_string(),
        }
    }

    fn polled(self: Arc<Self>, org: &str, user: &str) {
        self.touch(org, user, false);
    }

    fn disconnect(self: Arc<Self>, org: &str, user: &str) {
        let now = Instant::now();
        let mut users = self.users.lock();
        let Some(e) = users.get_mut(&(org.to_string(), user.to_string())) else {
            return;
        };
        e.streams = e.streams.saturating_sub(1);
        e.generation += 1;
        if e.streams > 0 {
            return;
        }
        let at = (now + self.grace).max(e.poll_until.unwrap_or(now));
        let generation = e.generation;
        drop(users);
        self.expire_at(org, user, generation, at);
    }

    fn members(&self, org: &str) -> Vec<Member> {
        let users = self.users.lock();
        let mut members: Vec<Member> = users
            .iter()
            .filter(|((o, _), _)| o == org)
            .map(|((_, user), e)| Member {
                user_id: user.clone(),
                online_since: Some(timestamp(e.since)),
                connections: e.streams,
            })
            .collect();
        members.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        members
    }
}
