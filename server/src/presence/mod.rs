//! Presence: who in an org is online. A user is online while at least one of their Subscribe
//! streams is open, or while they polled within the last 45 s. `user_online` is sent when they come
//! online; `user_offline` only after the last stream closed and the grace period passed without a
//! new one, so a reconnect does not flicker. The embedded engine (`memory`) keeps it in memory and
//! announces each transition while it holds the state, so the announcements come in the order of
//! the state; the cluster engine (`nats`) feeds the same machinery with the streams of every node.
pub mod memory;
pub mod nats;

pub use memory::MemoryPresence;
use std::{sync::Arc, time::Duration, time::SystemTime};

use orgpulse::proto::{Event, Member, PresenceChange, event::Payload};
use prost::Message;

use crate::{hub::Hub, store::timestamp};

/// How long a Poll keeps its caller online.
pub const POLL_ONLINE: Duration = Duration::from_secs(45);

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
        self.deliver_ephemeral(org, ev.encode_to_vec().into());
    }
}

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
