//! The embedded engine's bus: one process, publishing hands the event straight to the local Hub.
use std::sync::OnceLock;

use super::Bus;
use crate::{hub::Hub, store::CommittedEvent};

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
