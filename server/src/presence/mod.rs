//! Presence: who in an org is online. A user is online while at least one of their Subscribe
//! streams is open, or one of their Poll calls is waiting or ended less than [`POLL_ONLINE`] ago (a
//! polling client is about to poll again). `user_online` is sent when they come online;
//! `user_offline` only after the last one closed and the grace period passed without a new one, so
//! a reconnect does not flicker: whatever the transport, a user is offline within the grace period
//! plus [`POLL_ONLINE`] of leaving. The embedded engine (`memory`) keeps it in memory and
//! announces each transition while it holds the state, so the announcements come in the order of
//! the state; the cluster engine (`nats`) feeds the same machinery with the streams of every node.
pub mod memory;
pub mod nats;

pub use memory::MemoryPresence;
use std::{sync::Arc, time::Duration, time::SystemTime};

use orgpulse::proto::{Event, EventKind, Member, PresenceChange, event::Payload};
use prost::Message;

use crate::{
    hub::{Ephemeral, Hub},
    store::timestamp,
};

/// How long a Poll keeps its caller online after it ended (before the grace period starts).
pub const POLL_ONLINE: Duration = Duration::from_secs(5);

/// The two ways a user is connected, each keeping them online while open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A `Subscribe` stream (counted in `Member.connections`).
    Stream,
    /// A waiting `Poll`; it keeps counting for [`POLL_ONLINE`] after it ended.
    Poll,
}

/// A presence transition of one user in one org.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Online,
    Offline,
}

/// Where presence transitions are announced: the Hub (the org's subscribers on this node) or, in a
/// test, a recorder. Called with the presence state locked, in the order of the transitions, so it
/// must not block and must not call back into presence.
pub trait Announce: Send + Sync + 'static {
    fn announce(&self, org: &str, user: &str, change: Change);
}

/// The Hub announces a transition as a `user_online` / `user_offline` event to the org's streams.
impl Announce for Hub {
    fn announce(&self, org: &str, user: &str, change: Change) {
        let change_of = PresenceChange {
            user_id: user.to_string(),
        };
        let ev = Event {
            org_id: org.to_string(),
            time: Some(timestamp(SystemTime::now())),
            actor: user.to_string(),
            payload: Some(match change {
                Change::Online => Payload::UserOnline(change_of),
                Change::Offline => Payload::UserOffline(change_of),
            }),
            ..Default::default()
        };
        self.deliver_ephemeral(
            org,
            Ephemeral {
                kind: EventKind::Presence,
                audience: None,
                topic: None,
                bytes: ev.encode_to_vec().into(),
            },
        );
    }
}

pub trait Presence: Send + Sync + 'static {
    /// A stream or waiting Poll of `user` opened; it counts until the guard is dropped (which
    /// keeps the caller's names, shared, not copies).
    fn connect(self: Arc<Self>, org: &Arc<str>, user: &Arc<str>, via: Via) -> PresenceGuard;
    /// The org's online members.
    fn members(&self, org: &str) -> Vec<Member>;
    /// A stream or Poll of `user` ended.
    fn disconnect(self: Arc<Self>, org: &Arc<str>, user: &Arc<str>, via: Via);
}

/// Keeps one stream or waiting Poll counted as online while alive.
pub struct PresenceGuard {
    presence: Arc<dyn Presence>,
    org: Arc<str>,
    user: Arc<str>,
    via: Via,
}

impl PresenceGuard {
    fn new(presence: Arc<dyn Presence>, org: &Arc<str>, user: &Arc<str>, via: Via) -> Self {
        PresenceGuard {
            presence,
            org: org.clone(),
            user: user.clone(),
            via,
        }
    }
}

impl Drop for PresenceGuard {
    fn drop(&mut self) {
        self.presence
            .clone()
            .disconnect(&self.org, &self.user, self.via);
    }
}
