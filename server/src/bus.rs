//! The Bus carries committed events to every node's Hub. It is a fast path, not the truth: it may
//! lose or duplicate, and the Hub repairs that from the Store. The embedded engine's bus is a direct
//! in-process hand-off, which loses nothing; a bus that can lose (cluster) says so with `lossy`,
//! and the Hub then checks its rooms' tails against the Store.
use std::sync::OnceLock;

use crate::{hub::Hub, store::CommittedEvent};

pub trait Bus: Send + Sync + 'static {
    /// Sends a just-committed event to every node (this one included).
    fn publish(&self, ev: CommittedEvent);
    /// Starts delivering published events to `hub`.
    fn attach(&self, hub: Hub);
    /// Whether a published event can fail to reach a node's Hub (then the Hub must look for it
    /// in the Store, since no later event may come to reveal the gap).
    fn lossy(&self) -> bool;
}

/// One process: publishing hands the event straight to the local Hub.
#[derive(Default)]
pub struct MemoryBus {
    hub: OnceLock<Hub>,
}

impl Bus for MemoryBus {
    fn publish(&self, ev: CommittedEvent) {
        crate::metrics::METRICS.events_committed.inc();
        if let Some(hub) = self.hub.get() {
            hub.deliver(ev);
        }
    }

    fn attach(&self, hub: Hub) {
        let _ = self.hub.set(hub);
    }

    /// A direct call into this process's Hub: nothing is lost.
    fn lossy(&self) -> bool {
        false
    }
}
