//! Replay reads shared between subscribers: when many subscribers of one org resume at once from
//! nearby cursors (a node died and all its clients came back to this one), their catch-up reads
//! of the org's log are made once and handed to each of them, so the Store sees a few reads per
//! org rather than one per subscriber.
//!
//! A read starts at the subscriber's position rounded down to `ALIGN` (subscribers a few events
//! apart ask for the same read) and is kept for `KEEP_FOR`; a later subscriber whose position
//! lies inside a kept page starts there. The log is gapless, so a page read after seq `a` holds
//! exactly `a+1 ..= a+len`: every event of it is committed and stays what it is, whoever reads it
//! later. A page that ends at or before a subscriber's position was read before that
//! subscriber's events were committed; it is dropped and read again. Store reads for replays run
//! at most `CONCURRENT_READS` at a time (the others queue), so a storm of resumes never takes all
//! of the Store's connections from the writes and from the rooms' own repairs.
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use tokio::sync::{OnceCell, Semaphore};

use crate::{
    metrics::METRICS,
    store::{CommittedEvent, Log, LogBounds, LogRead, Result},
};

/// Events read from the Store per page.
const PAGE: u64 = 1000;
/// Reads start at a multiple of this, so nearby positions share one read.
const ALIGN: u64 = 100;
/// How long a page is offered to later subscribers.
const KEEP_FOR: Duration = Duration::from_secs(10);
/// At most this many events are kept in pages (older pages are dropped first).
const KEEP_EVENTS: usize = 50_000;
/// Store reads for replays at a time.
const CONCURRENT_READS: usize = 4;
/// Shared pages tried before a subscriber reads from its own position alone.
const ATTEMPTS: usize = 3;

/// One read of the log after `after`, made once for whoever asks while it is kept.
struct Slot {
    made: Instant,
    read: OnceCell<Read>,
    /// Its events as counted in `Pages::kept`, plus one (0: not counted yet; `DROPPED`: no longer
    /// kept). Changed with the pages locked.
    counted: AtomicUsize,
}

/// `Slot::counted` of a slot no longer kept.
const DROPPED: usize = usize::MAX;

#[derive(Clone)]
enum Read {
    Events(Arc<[CommittedEvent]>),
    Unreachable(LogBounds),
}

/// Kept pages by org and start, and in the order they were made (for dropping the oldest).
#[derive(Default)]
struct Pages {
    by_org: HashMap<Arc<str>, BTreeMap<u64, Arc<Slot>>>,
    made: VecDeque<(Arc<str>, u64, Arc<Slot>)>,
    /// Events in the kept pages.
    kept: usize,
}

impl Pages {
    /// Forgets `slot` (kept at `org`, `after`) unless another slot replaced it there.
    fn forget(&mut self, org: &str, after: u64, slot: &Arc<Slot>) {
        if let Some(slots) = self.by_org.get_mut(org) {
            if slots.get(&after).is_some_and(|s| Arc::ptr_eq(s, slot)) {
                slots.remove(&after);
            }
            if slots.is_empty() {
                self.by_org.remove(org);
            }
        }
    }

    /// Counts the events of `slot`, just read, in `kept` (once, and only while it is kept).
    fn count(&mut self, slot: &Slot, events: usize) {
        if slot.counted.load(Relaxed) == 0 {
            slot.counted.store(events + 1, Relaxed);
            self.kept += events;
        }
    }

    /// Drops the pages made before `KEEP_FOR`, then the oldest while over `KEEP_EVENTS`.
    fn evict(&mut self, now: Instant) {
        while let Some((org, after, slot)) = self.made.front() {
            if now.duration_since(slot.made) < KEEP_FOR && self.kept <= KEEP_EVENTS {
                break;
            }
            let (org, after, slot) = (org.clone(), *after, slot.clone());
            self.made.pop_front();
            self.forget(&org, after, &slot);
            match slot.counted.swap(DROPPED, Relaxed) {
                0 | DROPPED => {}
                counted => self.kept -= counted - 1,
            }
        }
    }
}

/// What a replay gets for its position: the events after it, or that the log no longer reaches
/// back to it.
pub enum Replay {
    Events(Page),
    Unreachable(LogBounds),
}

/// Events of the log right after a subscriber's position (possibly shared with others).
pub struct Page {
    events: Arc<[CommittedEvent]>,
    from: usize,
}

impl Page {
    /// The events, in seq order, the first one right after the position asked for.
    pub fn events(&self) -> &[CommittedEvent] {
        &self.events[self.from..]
    }
}

/// The org logs' replay reads of one Hub.
pub struct SharedReads {
    store: Arc<dyn Log>,
    admission: Semaphore,
    pages: Mutex<Pages>,
}

impl SharedReads {
    pub fn new(store: Arc<dyn Log>) -> SharedReads {
        SharedReads {
            store,
            admission: Semaphore::new(CONCURRENT_READS),
            pages: Mutex::default(),
        }
    }

    /// The events of `org`'s log after `pos` (at least the next one when the log holds it), or
    /// that the log does not reach back to `pos`.
    pub async fn after(&self, org: &str, pos: u64) -> Result<Replay> {
        for _ in 0..ATTEMPTS {
            let (after, slot) = self.slot(org, pos);
            let read = slot
                .read
                .get_or_try_init(|| self.read(org, after))
                .await
                .inspect_err(|_| self.pages.lock().forget(org, after, &slot))?;
            if let Read::Events(events) = read {
                self.pages.lock().count(&slot, events.len());
            }
            match read {
                Read::Events(events) if ((pos - after) as usize) < events.len() => {
                    return Ok(Replay::Events(Page {
                        events: events.clone(),
                        from: (pos - after) as usize,
                    }));
                }
                // Read before the events after `pos` were committed: read again.
                Read::Events(_) => self.pages.lock().forget(org, after, &slot),
                Read::Unreachable(bounds) if pos < bounds.floor => {
                    return Ok(Replay::Unreachable(*bounds));
                }
                // The page's start is trimmed away but `pos` is not (or `pos` was past the head
                // when it was read): read from `pos` itself.
                Read::Unreachable(_) => break,
            }
        }
        Ok(match self.read(org, pos).await? {
            Read::Events(events) => Replay::Events(Page { events, from: 0 }),
            Read::Unreachable(bounds) => Replay::Unreachable(bounds),
        })
    }

    /// The kept page whose events reach `pos` from closest below, else a new one starting at
    /// `pos` rounded down to `ALIGN`; and where it starts.
    fn slot(&self, org: &str, pos: u64) -> (u64, Arc<Slot>) {
        let now = Instant::now();
        let mut pages = self.pages.lock();
        pages.evict(now);
        let org: Arc<str> = org.into();
        let slots = pages.by_org.entry(org.clone()).or_default();
        let lowest = pos.saturating_sub(PAGE - 1);
        if let Some((&after, slot)) = slots.range(lowest..=pos).next_back() {
            return (after, slot.clone());
        }
        let after = pos - pos % ALIGN;
        let slot = Arc::new(Slot {
            made: now,
            read: OnceCell::new(),
            counted: AtomicUsize::new(0),
        });
        slots.insert(after, slot.clone());
        pages.made.push_back((org, after, slot.clone()));
        (after, slot)
    }

    /// One Store read, once admitted.
    async fn read(&self, org: &str, after: u64) -> Result<Read> {
        let _admitted = self.admission.acquire().await.expect("never closed");
        METRICS.replay_reads.inc();
        Ok(
            match self.store.read_after(org, after, PAGE as usize).await? {
                LogRead::Events(events) => Read::Events(events.into()),
                LogRead::Unreachable(bounds) => Read::Unreachable(bounds),
            },
        )
    }
}
