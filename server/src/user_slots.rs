//! Per-user limits of calls held open on this node (docs/api.md "Input limits"): one user (same
//! `sub` and org) holds at most `--max-streams-per-user` open `Subscribe` streams and
//! `--max-polls-per-user` waiting `Poll` calls. A call holds a [`UserSlot`] for as long as it
//! lives, so the count is exact however the call ends.
use std::{collections::HashMap, sync::Arc};

use parking_lot::Mutex;
use tonic::Status;

type Key = (Arc<str>, Arc<str>);

/// Calls of one kind held open per (org, user) on this node.
pub struct UserSlots {
    max: u32,
    /// The RESOURCE_EXHAUSTED message beyond `max`.
    refusal: &'static str,
    open: Arc<Mutex<HashMap<Key, u32>>>,
}

/// One open call of a user; dropping it frees the slot.
pub struct UserSlot {
    open: Arc<Mutex<HashMap<Key, u32>>>,
    key: Key,
}

impl UserSlots {
    /// At most `max_per_user` open `Subscribe` streams per user.
    pub fn streams(max_per_user: u32) -> Self {
        Self::new(max_per_user, "too many streams for this user")
    }

    /// At most `max_per_user` waiting `Poll` calls per user.
    pub fn polls(max_per_user: u32) -> Self {
        Self::new(max_per_user, "too many polls for this user")
    }

    fn new(max: u32, refusal: &'static str) -> Self {
        UserSlots {
            max,
            refusal,
            open: Arc::default(),
        }
    }

    /// Takes a slot for a new call of `user` in `org` (the names are shared, not copied);
    /// RESOURCE_EXHAUSTED when they hold the maximum already.
    pub fn acquire(&self, org: &Arc<str>, user: &Arc<str>) -> Result<UserSlot, Status> {
        let key: Key = (org.clone(), user.clone());
        let mut open = self.open.lock();
        let count = open.entry(key.clone()).or_default();
        if *count >= self.max {
            return Err(Status::resource_exhausted(self.refusal));
        }
        *count += 1;
        Ok(UserSlot {
            open: self.open.clone(),
            key,
        })
    }
}

impl Drop for UserSlot {
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
        let slots = UserSlots::streams(2);
        let a = slots.acquire(&"acme".into(), &"alice".into()).unwrap();
        let _b = slots.acquire(&"acme".into(), &"alice".into()).unwrap();
        let err = slots
            .acquire(&"acme".into(), &"alice".into())
            .err()
            .unwrap();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert_eq!(err.message(), "too many streams for this user");
        let _other_user = slots.acquire(&"acme".into(), &"bob".into()).unwrap();
        let _other_org = slots.acquire(&"globex".into(), &"alice".into()).unwrap();
        drop(a);
        let _again = slots.acquire(&"acme".into(), &"alice".into()).unwrap();
        assert!(slots.acquire(&"acme".into(), &"alice".into()).is_err());
        drop((_b, _again, _other_user, _other_org));
        assert!(slots.open.lock().is_empty(), "no entry outlives its calls");
    }

    #[test]
    fn each_use_refuses_with_its_own_message() {
        let polls = UserSlots::polls(1);
        let _held = polls.acquire(&"acme".into(), &"alice".into()).unwrap();
        let err = polls
            .acquire(&"acme".into(), &"alice".into())
            .err()
            .unwrap();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert_eq!(err.message(), "too many polls for this user");
    }
}
