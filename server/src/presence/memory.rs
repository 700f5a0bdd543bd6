//! The embedded presence engine: one node's streams and polls, in memory, with the grace timers
//! that take users offline. The cluster engine drives it with cluster-wide stream counts.
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use orgpulse::proto::Member;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::{Announce, Change, POLL_ONLINE, Presence, PresenceGuard, Via};
use crate::store::timestamp;

/// A user's connections (on this node, or summed over the cluster).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Connections {
    pub streams: u32,
    /// Waiting Polls.
    pub polls: u32,
    /// The latest end of a Poll plus [`POLL_ONLINE`]: online until then (then the grace period).
    pub poll_until: Option<Instant>,
}

impl Connections {
    /// Whether these keep the user online at `now` (before any grace period).
    pub fn online(&self, now: Instant) -> bool {
        self.open() || self.poll_until.is_some_and(|t| t > now)
    }

    fn open(&self) -> bool {
        self.streams > 0 || self.polls > 0
    }
}

struct Entry {
    held: Connections,
    since: SystemTime,
    /// When the last stream or Poll ended (while none is open).
    closed_at: Option<Instant>,
    /// A task is waiting to take this user offline.
    timer: bool,
}

impl Entry {
    /// When the user goes offline if nothing changes: the grace period after the last stream
    /// closed or the last Poll stopped counting; `None` while a stream or Poll is open.
    fn offline_at(&self, grace: Duration) -> Option<Instant> {
        if self.held.open() {
            return None;
        }
        self.closed_at.max(self.held.poll_until).map(|t| t + grace)
    }
}

/// (org, user), shared with the streams and Polls that hold the entry (no copies of the names).
type Key = (Arc<str>, Arc<str>);

pub struct MemoryPresence {
    announcer: Box<dyn Announce>,
    grace: Duration,
    users: Mutex<HashMap<Key, Entry>>,
}

impl MemoryPresence {
    pub fn new(announcer: impl Announce, grace: Duration) -> Arc<Self> {
        Arc::new(MemoryPresence {
            announcer: Box::new(announcer),
            grace,
            users: Mutex::default(),
        })
    }

    /// Applies `change` to `user`'s entry (created, and announced online, when new), then makes
    /// sure one timer watches for them going offline.
    fn update(self: &Arc<Self>, org: &Arc<str>, user: &Arc<str>, change: impl FnOnce(&mut Entry)) {
        self.update_if(org, user, true, change)
    }

    /// `update`, except that an absent user stays absent unless `create`.
    fn update_if(
        self: &Arc<Self>,
        org: &Arc<str>,
        user: &Arc<str>,
        create: bool,
        change: impl FnOnce(&mut Entry),
    ) {
        let key = (org.clone(), user.clone());
        let mut users = self.users.lock();
        let new = !users.contains_key(&key);
        if new && !create {
            return;
        }
        let e = users.entry(key.clone()).or_insert(Entry {
            held: Connections::default(),
            since: SystemTime::now(),
            closed_at: None,
            timer: false,
        });
        change(e);
        let arm = !e.timer && e.offline_at(self.grace).is_some();
        e.timer |= arm;
        // Announced before the lock is released: no later transition can be announced first.
        if new {
            self.announcer.announce(org, user, Change::Online);
        }
        drop(users);
        if arm {
            tokio::spawn(self.clone().offline_timer(key));
        }
    }

    /// Sleeps until the user's offline time (which may move while it sleeps), then takes them
    /// offline; stops early when a stream opens.
    async fn offline_timer(self: Arc<Self>, key: Key) {
        loop {
            let at = {
                let mut users = self.users.lock();
                let Some(e) = users.get_mut(&key) else { return };
                match e.offline_at(self.grace) {
                    None => {
                        e.timer = false;
                        return;
                    }
                    Some(at) if at <= Instant::now() => {
                        users.remove(&key);
                        self.announcer.announce(&key.0, &key.1, Change::Offline);
                        return;
                    }
                    Some(at) => at,
                }
            };
            tokio::time::sleep_until(at).await;
        }
    }
}

impl MemoryPresence {
    /// Sets `user`'s connections to `held` (counted elsewhere: the cluster's total); the same
    /// transitions and grace as `connect` and `disconnect`. A user absent here and not online by
    /// `held` stays absent.
    pub fn set_connections(self: &Arc<Self>, org: &str, user: &str, held: Connections) {
        let now = Instant::now();
        self.update_if(&org.into(), &user.into(), held.online(now), |e| {
            if e.held.open() && !held.open() {
                e.closed_at = Some(now);
            }
            let poll_until = e.held.poll_until.max(held.poll_until);
            e.held = Connections { poll_until, ..held };
        });
    }
}

impl Presence for MemoryPresence {
    fn connect(self: Arc<Self>, org: &Arc<str>, user: &Arc<str>, via: Via) -> PresenceGuard {
        self.update(org, user, |e| match via {
            Via::Stream => e.held.streams += 1,
            Via::Poll => e.held.polls += 1,
        });
        PresenceGuard::new(self, org, user, via)
    }

    fn disconnect(self: Arc<Self>, org: &Arc<str>, user: &Arc<str>, via: Via) {
        self.update(org, user, |e| {
            let now = Instant::now();
            match via {
                Via::Stream => e.held.streams = e.held.streams.saturating_sub(1),
                Via::Poll => {
                    e.held.polls = e.held.polls.saturating_sub(1);
                    e.held.poll_until = e.held.poll_until.max(Some(now + POLL_ONLINE));
                }
            }
            if !e.held.open() {
                e.closed_at = Some(now);
            }
        });
    }

    fn members(&self, org: &str) -> Vec<Member> {
        let users = self.users.lock();
        let mut members: Vec<Member> = users
            .iter()
            .filter(|((o, _), _)| **o == *org)
            .map(|((_, user), e)| Member {
                user_id: user.to_string(),
                online_since: Some(timestamp(e.since)),
                connections: e.held.streams,
            })
            .collect();
        members.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        members
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(10);

    /// Records announcements. Once armed, at the next `Offline` it reconnects the user the way a
    /// concurrent `connect` on another thread would: at once when the presence state is free, not
    /// at all while the state is locked (that thread would wait for the lock).
    #[derive(Default)]
    struct Recorder {
        seen: Mutex<Vec<(String, Change)>>,
        reconnect_at_offline: Mutex<Option<Arc<MemoryPresence>>>,
        reconnected: Mutex<Vec<PresenceGuard>>,
    }

    impl Announce for Arc<Recorder> {
        fn announce(&self, org: &str, user: &str, change: Change) {
            let armed = match change {
                Change::Offline => self.reconnect_at_offline.lock().take(),
                Change::Online => None,
            };
            if let Some(presence) = armed {
                let state_is_free = presence.users.try_lock().is_some();
                if state_is_free {
                    let guard = presence.connect(&org.into(), &user.into(), Via::Stream);
                    self.reconnected.lock().push(guard);
                }
            }
            self.seen.lock().push((user.to_string(), change));
        }
    }

    /// A reconnect racing the grace timer's `user_offline`: the announcements must follow the state,
    /// so a connected user's last announcement is `user_online`.
    #[tokio::test(start_paused = true)]
    async fn a_reconnect_during_the_offline_announcement_ends_online() {
        let recorder = Arc::new(Recorder::default());
        let presence = MemoryPresence::new(recorder.clone(), GRACE);
        drop(
            presence
                .clone()
                .connect(&"acme".into(), &"alice".into(), Via::Stream),
        );
        *recorder.reconnect_at_offline.lock() = Some(presence.clone());
        // The grace timer fires and takes alice offline.
        tokio::time::sleep(GRACE + Duration::from_millis(1)).await;
        // Alice reconnects (unless she already did during the announcement).
        let _stream = recorder.reconnected.lock().is_empty().then(|| {
            presence
                .clone()
                .connect(&"acme".into(), &"alice".into(), Via::Stream)
        });
        let members = presence.members("acme");
        assert_eq!(members.len(), 1, "alice is connected");
        assert_eq!(members[0].connections, 1);
        let seen = recorder.seen.lock().clone();
        let alice = |c| ("alice".to_string(), c);
        assert_eq!(
            seen,
            [
                alice(Change::Online),
                alice(Change::Offline),
                alice(Change::Online)
            ],
            "announcements out of order with the state"
        );
    }

    /// A waiting Poll keeps its user online however long it waits; after it ends they stay
    /// online POLL_ONLINE, then the grace period, then go offline; a stream goes offline after
    /// the grace period alone.
    #[tokio::test(start_paused = true)]
    async fn a_poll_counts_while_waiting_and_5_s_after_then_the_grace() {
        let recorder = Arc::new(Recorder::default());
        let presence = MemoryPresence::new(recorder.clone(), GRACE);
        let offline = |who: &str| {
            recorder
                .seen
                .lock()
                .contains(&(who.to_string(), Change::Offline))
        };
        let poll = presence
            .clone()
            .connect(&"acme".into(), &"paula".into(), Via::Poll);
        let stream = presence
            .clone()
            .connect(&"acme".into(), &"sam".into(), Via::Stream);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!offline("paula"), "a waiting Poll keeps its user online");
        drop((poll, stream));
        tokio::time::sleep(GRACE - Duration::from_millis(1)).await;
        assert!(!offline("sam"));
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert!(
            offline("sam"),
            "a stream user is offline after the grace period"
        );
        tokio::time::sleep(POLL_ONLINE - Duration::from_millis(3)).await;
        assert!(!offline("paula"));
        assert_eq!(
            presence.members("acme")[0].connections,
            0,
            "Polls are no connections"
        );
        tokio::time::sleep(Duration::from_millis(4)).await;
        assert!(
            offline("paula"),
            "a poll-only user is offline 5 s + grace after the Poll"
        );
    }
}
