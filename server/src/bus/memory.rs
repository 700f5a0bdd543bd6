//! The embedded engine's bus: one process, publishing hands the event straight to the local Hub.
use std::sync::Arc;

use super::{Bus, Deliver};
use crate::store::CommittedEvent;

pub struct MemoryBus {
    to: Arc<dyn Deliver>,
}

impl MemoryBus {
    /// A bus that hands every published event to `to`.
    pub fn new(to: Arc<dyn Deliver>) -> MemoryBus {
        MemoryBus { to }
    }
}

impl Bus for MemoryBus {
    fn publish(&self, ev: CommittedEvent) {
        crate::metrics::METRICS.events_committed.inc();
        self.to.deliver(ev);
    }

    /// A direct call into this process's Hub: nothing is lost.
    fn lossy(&self) -> bool {
        false
    }
}
