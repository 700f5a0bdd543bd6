//! The Bus carries committed events to every node's Hub (through [`Deliver`]). It is a fast path, not the truth: it may
//! lose, duplicate or reorder, and the Hub repairs that from the Store. The embedded engine
//! (`memory`) is a direct in-process hand-off, which loses nothing; the cluster engine (`nats`)
//! can lose, says so with `lossy`, and the Hub then checks its rooms' tails against the Store.
pub mod memory;
pub mod nats;

use std::sync::Arc;

pub use memory::MemoryBus;

use crate::store::{Committed, CommittedEvent};

/// Where a Bus hands the events it carries: this node's rooms (the Hub's), seen through what the
/// Bus needs of them and nothing more (centrifuge's `BrokerEventHandler`).
pub trait Deliver: Send + Sync + 'static {
    /// A committed event for this node. Never blocks.
    fn deliver(&self, ev: CommittedEvent);
    /// The bus now carries `org`'s events to this node: events committed before it did may have
    /// come to nobody, so the room looks for them in the Store now. Never blocks.
    fn subscribed(&self, org: &Arc<str>);
}

pub trait Bus: Send + Sync + 'static {
    /// Sends a just-committed event to every node (this one included). Never blocks.
    fn publish(&self, ev: CommittedEvent);
    /// Whether a published event can fail to reach a node's Hub (then the Hub must look for it
    /// in the Store, since no later event may come to reveal the gap).
    fn lossy(&self) -> bool;
    /// This node's Hub opened a room for `org`: from now on deliver `org`'s events to it. Called
    /// with the Hub's rooms locked, so it must not block.
    fn room_opened(&self, _org: &Arc<str>) {}
    /// The Hub closed `org`'s last room: its events are no longer needed here. Same rules.
    fn room_closed(&self, _org: &Arc<str>) {}
    /// Whether events from other nodes reach this one now (false: degraded, the Hub finds them in
    /// the Store on its tail checks, which it then runs more often).
    fn connected(&self) -> bool {
        true
    }
}

/// The `Committed` callback that publishes a store's committed events on `bus`.
pub fn committed_to(bus: Arc<dyn Bus>) -> Committed {
    Arc::new(move |ev| bus.publish(ev))
}
