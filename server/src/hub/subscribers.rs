//! A room's subscribers, and who an audience can name among them: an index from user, group
//! and role to subscribers (and those of role service, who see everything), so an event with an
//! audience costs its recipients, not the room. Fanning out an event for one group of a
//! 10,000-subscriber org visits that group's subscribers only; a notification, its user's.
//!
//! The index answers the audience half of `Filter::sees` for live fan-out: a subscriber is
//! listed under its user, each of its groups and roles (or among those who see everything), so
//! the lists an audience names hold exactly the subscribers `audience::admits` admits, and only
//! the rest of the filter (`Filter::takes`) is checked per candidate, on the candidate's slot
//! alone (no pointer chased into its viewer: in a big room those are cold cache lines). Each
//! entry carries its subscriber's tag, so an entry left by a subscriber that has gone never
//! names the slot's next subscriber. Such stale entries are not removed one by one (a list such
//! as role `member` can hold a whole org); the index is rebuilt from the live subscribers once
//! stale entries outnumber live ones.
use std::{collections::HashMap, sync::Arc, task::Waker};

use super::{Cut, CutFlag, Filter, Item, queue};
use crate::{audience::Audience, metrics::METRICS};

/// One subscriber: its filter and its queue (marked with why it was cut off, once it was).
pub(super) struct Sub {
    pub filter: Filter,
    pub tx: queue::Sender<Item, CutFlag>,
}

/// Where a subscriber sits: its slot, and its id (a slot is reused; the id is not).
#[derive(Debug, Clone, Copy)]
pub(super) struct Key {
    slot: u32,
    id: u64,
}

/// An index entry: a slot, and the low 32 bits of the id of the subscriber it was made for. A
/// stale entry could only name a later subscriber of its slot after 2^32 joins, and the index is
/// rebuilt long before (once stale entries outnumber live ones plus 1,024).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    slot: u32,
    tag: u32,
}

impl Entry {
    fn of(slot: u32, id: u64) -> Entry {
        Entry {
            slot,
            tag: id as u32,
        }
    }
}

#[derive(Default)]
pub(super) struct Subscribers {
    /// The last seq handed to the subscribers (or skipped): a subscriber joining now gets every
    /// event after it, and the tail checker compares it with the log's head.
    pub delivered: u64,
    slots: Vec<Option<(u64, Sub)>>,
    free: Vec<u32>,
    live: usize,
    next_id: u64,
    index: Index,
    /// Candidates of the event being fanned out (kept to reuse its allocation).
    scratch: Vec<Entry>,
}

/// The entries under one name. Most users hold one stream, so one entry is kept inline rather
/// than in a vector of its own (an allocation per user of a big org).
enum Entries {
    One(Entry),
    Many(Vec<Entry>),
}

impl Entries {
    fn push(&mut self, e: Entry) {
        match self {
            Entries::One(first) => *self = Entries::Many(vec![*first, e]),
            Entries::Many(list) => list.push(e),
        }
    }

    fn as_slice(&self) -> &[Entry] {
        match self {
            Entries::One(e) => std::slice::from_ref(e),
            Entries::Many(list) => list,
        }
    }
}

/// Slots by what an audience names. Entries of removed subscribers stay until the next rebuild.
#[derive(Default)]
struct Index {
    users: HashMap<Arc<str>, Entries>,
    groups: HashMap<Box<str>, Entries>,
    roles: HashMap<Box<str>, Entries>,
    /// Role service: admitted by every audience.
    all: Vec<Entry>,
    /// Entries in the lists, live and stale.
    entries: usize,
    /// Entries of live subscribers.
    live_entries: usize,
}

impl Index {
    /// Adds the entries of the subscriber `id` in `slot`; returns how many.
    fn add(&mut self, slot: u32, id: u64, f: &Filter) -> usize {
        fn push<K: std::borrow::Borrow<str> + std::hash::Hash + Eq>(
            map: &mut HashMap<K, Entries>,
            name: &str,
            slot: Entry,
            key: impl FnOnce() -> K,
        ) {
            match map.get_mut(name) {
                Some(list) => list.push(slot),
                None => {
                    map.insert(key(), Entries::One(slot));
                }
            }
        }
        let slot = Entry::of(slot, id);
        let v = &f.viewer;
        let n = if v.sees_all {
            self.all.push(slot);
            1
        } else {
            push(&mut self.users, &v.user, slot, || v.user.clone());
            for g in v.groups.iter() {
                push(&mut self.groups, g, slot, || g.into());
            }
            for r in v.roles.iter() {
                push(&mut self.roles, r, slot, || r.into());
            }
            1 + v.groups.iter().count() + v.roles.iter().count()
        };
        self.entries += n;
        self.live_entries += n;
        n
    }

    /// Every entry `a` names, with repeats and stale ones, onto `out`.
    fn candidates(&self, a: &Audience, out: &mut Vec<Entry>) {
        out.extend_from_slice(&self.all);
        for u in &a.user_ids {
            out.extend_from_slice(
                self.users
                    .get(u.as_str())
                    .map_or(&[][..], Entries::as_slice),
            );
        }
        for g in &a.groups {
            out.extend_from_slice(
                self.groups
                    .get(g.as_str())
                    .map_or(&[][..], Entries::as_slice),
            );
        }
        for r in &a.roles {
            out.extend_from_slice(
                self.roles
                    .get(r.as_str())
                    .map_or(&[][..], Entries::as_slice),
            );
        }
    }
}

impl Subscribers {
    /// No subscribers yet, in a room that has delivered up to `delivered`.
    pub fn new(delivered: u64) -> Subscribers {
        Subscribers {
            delivered,
            ..Default::default()
        }
    }

    pub fn add(&mut self, sub: Sub) -> Key {
        let id = self.next_id;
        self.next_id += 1;
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(None);
                u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 subscribers")
            }
        };
        self.index.add(slot, id, &sub.filter);
        self.slots[slot as usize] = Some((id, sub));
        self.live += 1;
        self.rebuild_if_stale();
        Key { slot, id }
    }

    /// Removes the subscriber at `key` if it is still there (the hub may have cut it off, or
    /// cut them all: then its slot may be gone too).
    pub fn remove(&mut self, key: Key) {
        if matches!(self.slots.get(key.slot as usize), Some(Some((id, _))) if *id == key.id) {
            self.take(key.slot);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Ends every subscriber's queue for `why` and removes them all.
    pub fn cut_all(&mut self, why: Cut) {
        for (_, s) in self.slots.drain(..).flatten() {
            s.tx.mark().set(why);
        }
        self.free.clear();
        self.live = 0;
        self.index = Index::default();
    }

    /// Queues `item` for every subscriber `audience` admits (`None` = the whole org) and
    /// `takes` takes (the rest of its filter, `Filter::takes`), and returns the wakers of the
    /// streams that were waiting, for the caller to wake (`Pacer`). A subscriber whose queue is
    /// full is cut off (`Cut::Slow`) and removed; one whose stream has gone, removed.
    pub fn fan_out(
        &mut self,
        item: &Item,
        audience: Option<&Audience>,
        takes: impl Fn(&Filter) -> bool,
    ) -> Vec<Waker> {
        let mut woken = Vec::new();
        match audience {
            None => {
                for slot in 0..self.slots.len() as u32 {
                    self.offer(slot, item, &takes, &mut woken);
                }
            }
            Some(a) => {
                let mut cand = std::mem::take(&mut self.scratch);
                cand.clear();
                self.index.candidates(a, &mut cand);
                cand.sort_unstable();
                cand.dedup();
                for e in &cand {
                    let live = matches!(&self.slots[e.slot as usize], Some((id, _)) if Entry::of(e.slot, *id) == *e);
                    if live {
                        self.offer(e.slot, item, &takes, &mut woken);
                    }
                }
                self.scratch = cand;
            }
        }
        woken
    }

    /// Rebuilds the index once its stale entries outnumber the live ones (plus 1,024).
    fn rebuild_if_stale(&mut self) {
        if self.index.entries > 2 * self.index.live_entries + 1024 {
            self.rebuild();
        }
    }

    /// Queues `item` for the subscriber in `slot`, if there is one and it takes it; its stream's
    /// waker goes to `woken` when it was waiting.
    fn offer(
        &mut self,
        slot: u32,
        item: &Item,
        takes: &impl Fn(&Filter) -> bool,
        woken: &mut Vec<Waker>,
    ) {
        let Some((_, s)) = &self.slots[slot as usize] else {
            return;
        };
        if !takes(&s.filter) {
            return;
        }
        match s.tx.try_send(item.clone()) {
            Ok(waker) => woken.extend(waker),
            Err(queue::TrySendError::Full) => {
                s.tx.mark().set(Cut::Slow);
                METRICS.slow_disconnects.inc();
                self.take(slot);
            }
            Err(queue::TrySendError::Closed) => self.take(slot),
        }
    }

    fn take(&mut self, slot: u32) {
        if let Some((_, s)) = self.slots[slot as usize].take() {
            self.live -= 1;
            self.free.push(slot);
            let v = &s.filter.viewer;
            self.index.live_entries -= if v.sees_all {
                1
            } else {
                1 + v.groups.iter().count() + v.roles.iter().count()
            };
            self.rebuild_if_stale();
        }
    }

    /// A fresh index of the live subscribers (drops every stale entry).
    fn rebuild(&mut self) {
        self.index = Index::default();
        for (slot, s) in self.slots.iter().enumerate() {
            if let Some((id, s)) = s {
                self.index.add(slot as u32, *id, &s.filter);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        audience::{Names, Topics, Viewer},
        hub::{EntityTypes, Kinds},
    };

    fn viewer(user: &str, groups: &[&str], roles: &[&str]) -> Filter {
        Filter {
            viewer: Arc::new(Viewer {
                user: user.into(),
                groups: Names::new(groups),
                roles: Names::new(roles),
                sees_all: roles.contains(&"service"),
            }),
            kinds: Kinds::from_request(&[]).unwrap(),
            entity_types: EntityTypes::default(),
            topics: Topics::default(),
        }
    }

    /// A subscriber leaving after the room cut everyone off (its slot gone) leaves nothing behind.
    #[test]
    fn leaving_after_everyone_was_cut_is_a_no_op() {
        let mut subs = Subscribers::new(0);
        let (tx, rx) = queue::channel(1);
        let key = subs.add(Sub {
            filter: viewer("a", &[], &["member"]),
            tx,
        });
        subs.cut_all(Cut::Behind);
        assert_eq!(rx.mark().get(), Some(Cut::Behind));
        subs.remove(key);
        assert!(subs.is_empty());
    }

    /// A small deterministic generator (no dependency for a test).
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// Against a scan of every subscriber with the one predicate, through joins, leaves, slot
    /// reuse and rebuilds: the index hands each event to exactly the subscribers it admits.
    #[test]
    fn the_index_delivers_exactly_what_a_scan_would() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut subs = Subscribers::default();
        let mut joined: Vec<(Key, String, Filter, queue::Receiver<Item, CutFlag>)> = vec![];
        let groups = ["g0", "g1", "g2", "g3", "g4"];
        let roles = ["member", "admin", "viewer", "service"];
        for round in 0..20_000u64 {
            if joined.len() < 50 || rng.below(3) == 0 {
                let user = format!("u{}", rng.below(40));
                let g: Vec<&str> = groups
                    .iter()
                    .copied()
                    .filter(|_| rng.below(3) == 0)
                    .collect();
                let r = [roles[rng.below(roles.len() as u64) as usize]];
                let f = viewer(&user, &g, &r);
                let (tx, rx) = queue::channel(1_000_000);
                let key = subs.add(Sub {
                    filter: f.clone(),
                    tx,
                });
                joined.push((key, user, f, rx));
            } else {
                let (key, ..) = joined.swap_remove(rng.below(joined.len() as u64) as usize);
                subs.remove(key);
            }
            let audience = match rng.below(4) {
                0 => None,
                1 => Some(Audience::one_user(&format!("u{}", rng.below(40)))),
                2 => Some(Audience {
                    groups: vec![groups[rng.below(5) as usize].into()],
                    roles: vec!["admin".into()],
                    ..Default::default()
                }),
                _ => Some(Audience {
                    user_ids: vec![format!("u{}", rng.below(40))],
                    groups: vec![groups[rng.below(5) as usize].into(), "g-none".into()],
                    ..Default::default()
                }),
            };
            let item = Item::new(round + 1, Default::default());
            // The index alone decides the audience.
            let _ = subs.fan_out(&item, audience.as_ref(), |_| true);
            for (_, user, f, rx) in &mut joined {
                let want = crate::audience::admits(audience.as_ref(), &f.viewer);
                let got = rx.try_recv().map(|i| i.seq);
                assert_eq!(
                    got,
                    want.then_some(round + 1),
                    "{user} {:?} for {audience:?}",
                    f.viewer
                );
            }
        }
        assert!(
            subs.index.entries <= 2 * subs.index.live_entries + 1024,
            "stale entries are rebuilt away"
        );
    }
}
