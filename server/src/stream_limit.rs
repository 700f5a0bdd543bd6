//! The per-user stream limit (`--max-streams-per-user`, docs/api.md "Input limits"): one user (same
//! `sub` and org) holds at most that many open `Subscribe` streams on this node. A stream holds a
//! [`StreamSlot`] for as long as it lives, so the count is exact however the stream ends.
use std::{collections::HashMap, sync::Arc};

use parking_lot::Mutex;
use tonic::Status;

type Key = (Arc<str>, Arc<str>);

/// Open streams per (org, user) on this node.
pub struct StreamSlots {
    max: u32,
    open: Arc<Mutex<HashMap<Key, u32>>>,
}

/// One open stream of a user; dropping it frees the slot.
pub struct StreamSlot {
    open: Arc<Mutex<HashMap<Key, u32>>>,
    key: Key,
}

impl StreamSlots {
    pub fn new(max_per_user: u32) -> Self {
        StreamSlots {
            max: max_per_user,
            open: Arc::default(),
        }
    }

    /// Takes a slot for a new stream of `user` in `org`; RESOURCE_EXHAUSTED when they hold the
    /// maximum already.
    pub fn acquire(&self, org: &str, user: &str) -> Result<StreamSlot, Status> {
        let key: Key = (org.into(), user.into());
        let mut open = self.open.lock();
        let count = open.entry(key.clone()).or_default();
        if *count >= self.max {
            return Err(Status::resource_exhausted("too many streams for this user"));
        }
        *count += 1;
        Ok(StreamSlot {
            open: self.open.clone(),
            key,
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock();
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_per_org_and_user_and_freed_on_drop() {
        let slots = StreamSlots::new(2);
        let a = slots.acquire("acme", "alice").unwrap();
        let _b = slots.acquire("acme", "alice").unwrap();
        let err = slots.acquire("acme", "alice").err().unwrap();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert_eq!(err.message(), "too many streams for this user");
        let _other_user = slots.acquire("acme", "bob").unwrap();
        let _other_org = slots.acquire("globex", "alice").unwrap();
        drop(a);
        let _again = slots.acquire("acme", "alice").unwrap();
        assert!(slots.acquire("acme", "alice").is_err());
        drop((_b, _again, _other_user, _other_org));
        assert!(
            slots.open.lock().is_empty(),
            "no entry outlives its streams"
        );
    }
}
