//! The Hub: per-org rooms of this node's subscribers, fed by the Bus.
//!
//! Each room has one task that delivers the org's committed events in seq order: `seq == last+1`
//! is fanned out, `seq <= last` is a duplicate and dropped, `seq > last+1` means the bus lost
//! something and the missing range is read from the Store first. A bus that can lose (`Bus::lossy`)
//! leaves one more hole: a lost LAST publish, which no later event reveals. For it the Hub runs one
//! tail checker per node: every `TAIL_CHECK` it reads the heads of all its rooms' orgs in one Store
//! query and tells the rooms that are behind, which repair from the Store. The in-process bus loses
//! nothing, so a Hub on it runs no checker and an idle room costs nothing. Fan-out shares the
//! event's encoded bytes; per subscriber it is a filter check and a push onto that subscriber's
//! bounded queue, and an event with an audience visits only the subscribers it can name
//! (`subscribers`). A full queue never waits: the subscriber is cut off (its stream ends with a
//! resumable error) and everyone else goes on. The streams a fan-out finds waiting are woken in
//! turns, in the order the fan-outs came (`pacer`). A resuming subscriber's replay reads the log
//! through the Hub (`replay`), so the subscribers of one org resuming together share their reads.
mod pacer;
mod queue;
mod replay;
mod subscribers;

use std::{
    collections::HashMap,
    sync::{
        Arc, Weak,
        atomic::{AtomicBool, AtomicU8, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use orgpulse::proto::EventKind;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use pacer::Pacer;
use subscribers::{Key, Sub, Subscribers};

use crate::{
    audience::{self, Topics, TopicsSeen, Viewer},
    bus::{Bus, Deliver},
    metrics::METRICS,
    store::{CommittedEvent, Log, LogRead},
    validate::{Invalid, MAX_ENTITY_TYPES},
};
pub use replay::Replay;

/// How often the tail checker of a Hub on a lossy bus compares its rooms' last delivered seqs with
/// their orgs' log heads.
const TAIL_CHECK: Duration = Duration::from_secs(2);
/// The tail check's interval while the bus is degraded (events from other nodes then arrive only
/// through it).
const TAIL_CHECK_DEGRADED: Duration = Duration::from_millis(200);
/// Events read from the Store per page when repairing a gap.
const REPAIR_PAGE: usize = 1000;

/// One message on a subscriber's queue: an encoded `Event` and its seq (0 for ephemeral events),
/// shared by every queue it goes to. A slot is then one pointer: a fan-out writes 8 bytes into
/// each subscriber's queue instead of 40, and a busy room's queues take a quarter of the cache
/// lines (at 1,000 broadcasts/s to 1,000 streams, queueing was 18 % of the server's CPU, nearly
/// all of it cache misses; 10 % after).
#[derive(Debug, Clone)]
pub struct Item(Arc<Message>);

/// What an [`Item`] holds.
#[derive(Debug)]
pub struct Message {
    pub seq: u64,
    pub bytes: Bytes,
}

impl Item {
    pub fn new(seq: u64, bytes: Bytes) -> Item {
        Item(Arc::new(Message { seq, bytes }))
    }
}

impl std::ops::Deref for Item {
    type Target = Message;

    fn deref(&self) -> &Message {
        &self.0
    }
}

/// Why the hub ended a subscriber's queue: either way its stream ends resumably.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Cut {
    /// Its queue was full.
    Slow = 1,
    /// The room could not deliver events the log no longer holds; resuming answers `resync`.
    Behind = 2,
    /// The server is shutting down ([`Hub::shut_down`]).
    Shutdown = 3,
}

/// A subscriber's cut flag: 0 while it is not cut, else a `Cut`.
#[derive(Debug, Default)]
pub struct CutFlag(AtomicU8);

impl CutFlag {
    fn set(&self, why: Cut) {
        self.0.store(why as u8, Ordering::Relaxed);
    }

    fn get(&self) -> Option<Cut> {
        match self.0.load(Ordering::Relaxed) {
            1 => Some(Cut::Slow),
            2 => Some(Cut::Behind),
            3 => Some(Cut::Shutdown),
            _ => None,
        }
    }
}

/// A set of event kinds (empty request = all kinds).
#[derive(Debug, Clone, Copy)]
pub struct Kinds(u8);

impl Kinds {
    pub fn from_request(kinds: &[i32]) -> Result<Kinds, Invalid> {
        if kinds.is_empty() {
            return Ok(Kinds(u8::MAX));
        }
        let mut bits = 0;
        for k in kinds {
            match EventKind::try_from(*k) {
                Ok(EventKind::Unspecified) | Err(_) => {
                    return Err(Invalid::new(format!("unknown event kind {k}")));
                }
                Ok(kind) => bits |= 1 << kind as u8,
            }
        }
        Ok(Kinds(bits))
    }

    pub fn has(self, kind: EventKind) -> bool {
        self.0 & (1 << kind as u8) != 0
    }
}

/// The entity types a subscription asked for (empty request = all): sorted once when the
/// subscription starts, so the check per event is a binary search without allocation.
#[derive(Debug, Clone, Default)]
pub struct EntityTypes(Option<Arc<[Box<str>]>>);

impl EntityTypes {
    pub fn from_request(types: &[String]) -> Result<EntityTypes, Invalid> {
        if types.is_empty() {
            return Ok(EntityTypes(None));
        }
        if types.len() > MAX_ENTITY_TYPES {
            return Err(Invalid::new(format!(
                "entity_types names {} types; at most {MAX_ENTITY_TYPES} allowed",
                types.len()
            )));
        }
        let mut list = Vec::with_capacity(types.len());
        for t in types {
            crate::validate::entity_name("entity_types", t)?;
            list.push(Box::from(t.as_str()));
        }
        list.sort_unstable();
        list.dedup();
        Ok(EntityTypes(Some(list.into())))
    }

    pub fn admits(&self, entity_type: &str) -> bool {
        self.0
            .as_ref()
            .is_none_or(|list| list.binary_search_by(|t| (**t).cmp(entity_type)).is_ok())
    }
}

/// What a subscription (or a Poll) may see and asked for.
#[derive(Debug, Clone)]
pub struct Filter {
    pub viewer: Arc<Viewer>,
    pub kinds: Kinds,
    /// Narrows entity events only.
    pub entity_types: EntityTypes,
    /// Narrows durable events; never widens what their audience allows.
    pub topics: Topics,
}

impl Filter {
    /// Whether a durable event goes to this subscriber: the one rule of live fan-out, gap
    /// repair, replay and Poll. Its two halves: the event's audience admits the viewer, and the
    /// subscriber asked for it ([`Filter::takes`]). Live fan-out answers the first half with the
    /// room's index, which names exactly the subscribers `audience::admits` would
    /// (`hub::subscribers`).
    pub fn sees(&self, ev: &CommittedEvent) -> bool {
        audience::admits(ev.audience.as_deref(), &self.viewer) && self.takes(ev)
    }

    /// Whether the subscriber asked for a durable event (kinds, entity types, topics), its
    /// audience aside.
    pub fn takes(&self, ev: &CommittedEvent) -> bool {
        self.takes_seen(ev, &TopicsSeen::default())
    }

    /// [`Filter::takes`] within one event's fan-out, whose topic answers `seen` keeps.
    fn takes_seen(&self, ev: &CommittedEvent, seen: &TopicsSeen) -> bool {
        self.kinds.has(ev.kind)
            && ev
                .entity_type
                .as_deref()
                .is_none_or(|t| self.entity_types.admits(t))
            && self.topics.admits_seen(ev.topics.iter(), seen)
    }

    /// Whether the subscriber asked for an ephemeral event (kinds, topic), its audience aside:
    /// the room's index admits it (the same audience rule as durable events). `seen` is the
    /// event's fan-out's.
    fn takes_ephemeral(&self, ev: &Ephemeral, seen: &TopicsSeen) -> bool {
        self.kinds.has(ev.kind)
            && ev
                .topic
                .as_deref()
                .is_none_or(|t| self.topics.admits_seen(std::iter::once(t), seen))
    }
}

/// An event that is never stored (presence, presence state, broadcast): seq 0, delivered to the
/// subscribers of the moment that asked for its kind, its audience admits, and whose topics
/// filter takes its topic (an event without a topic passes every topics filter).
#[derive(Debug, Clone)]
pub struct Ephemeral {
    pub kind: EventKind,
    pub audience: Option<Arc<audience::Audience>>,
    pub topic: Option<Arc<str>>,
    /// The encoded `Event`.
    pub bytes: Bytes,
}

#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

/// This node's rooms by org: where the Bus delivers (`bus::Deliver`). Made before the Bus and
/// the Hub, which both hold it, so the wiring runs one way: rooms -> bus -> store -> hub.
#[derive(Default)]
pub struct Rooms(Mutex<HashMap<Arc<str>, Arc<Room>>>);

impl Rooms {
    fn lock(&self) -> parking_lot::MutexGuard<'_, HashMap<Arc<str>, Arc<Room>>> {
        self.0.lock()
    }

    fn send(&self, org: &str, msg: RoomMsg) {
        let room = self.lock().get(org).cloned();
        if let Some(room) = room {
            let _ = room.tx.send(msg);
        }
    }
}

impl Deliver for Rooms {
    fn deliver(&self, ev: CommittedEvent) {
        let org = ev.org.clone();
        self.send(&org, RoomMsg::Durable(ev));
    }

    fn subscribed(&self, org: &Arc<str>) {
        self.send(org, RoomMsg::Subscribed);
    }
}

struct Inner {
    rooms: Arc<Rooms>,
    /// Set by `shut_down`: every subscriber, present or joining, is cut with `Cut::Shutdown`.
    shut: AtomicBool,
    store: Arc<dyn Log>,
    /// The head read of each org whose room is being opened: the subscribers joining it
    /// meanwhile wait for that one read rather than making their own.
    opening: Mutex<HashMap<Arc<str>, Arc<tokio::sync::OnceCell<u64>>>>,
    /// The replays' reads of the org logs, shared between subscribers.
    reads: replay::SharedReads,
    bus: Arc<dyn Bus>,
    queue: usize,
    pacer: Arc<Pacer>,
}

struct Room {
    org: Arc<str>,
    tx: mpsc::UnboundedSender<RoomMsg>,
    subs: Mutex<Subscribers>,
    closed: CancellationToken,
    /// The Hub's, shared by its rooms: their fan-outs' wake-ups in one order.
    pacer: Arc<Pacer>,
}

enum RoomMsg {
    Durable(CommittedEvent),
    Ephemeral(Ephemeral),
    /// The org's log reaches at least this seq (from the tail checker).
    Head(u64),
    /// The bus now carries the org's events: look up the log's head, for events it missed.
    Subscribed,
}

/// A subscriber's place in a room. Dropping it leaves the room.
pub struct Registration {
    pub rx: queue::Receiver<Item, CutFlag>,
    /// The room had delivered up to this seq when the subscriber joined: every later event is
    /// queued, so a replay reads the log up to here and no further.
    pub joined: u64,
    key: Key,
    room: Arc<Room>,
    hub: Hub,
}

impl Registration {
    /// True once the hub cut this subscriber off.
    pub fn was_cut(&self) -> bool {
        self.cut().is_some()
    }

    /// Why the hub cut this subscriber off, once it did.
    pub fn cut(&self) -> Option<Cut> {
        self.rx.mark().get()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut rooms = self.hub.inner.rooms.lock();
        let mut subs = self.room.subs.lock();
        subs.remove(self.key);
        if subs.is_empty()
            && rooms
                .get(&self.room.org)
                .is_some_and(|r| Arc::ptr_eq(r, &self.room))
        {
            rooms.remove(&self.room.org);
            self.room.closed.cancel();
            self.hub.inner.bus.room_closed(&self.room.org);
        }
    }
}

impl Hub {
    /// A Hub of `rooms`, which `bus` feeds; when the bus is lossy, with a tail checker that lives
    /// as long as the Hub.
    pub fn new(rooms: Arc<Rooms>, store: Arc<dyn Log>, queue: usize, bus: Arc<dyn Bus>) -> Hub {
        let lossy = bus.lossy();
        let hub = Hub {
            inner: Arc::new(Inner {
                rooms,
                shut: AtomicBool::new(false),
                opening: Mutex::default(),
                reads: replay::SharedReads::new(store.clone()),
                store,
                bus,
                queue: queue.max(1),
                pacer: Arc::default(),
            }),
        };
        if lossy {
            tokio::spawn(check_tails(Arc::downgrade(&hub.inner)));
        }
        hub
    }

    /// The pacer of this Hub's wake-ups, for the connections' write rounds to wait on.
    pub fn pacer(&self) -> Arc<Pacer> {
        self.inner.pacer.clone()
    }

    /// The name of `org` as its open room keeps it, to share rather than copy (None while the
    /// org has no room).
    pub fn org_name(&self, org: &str) -> Option<Arc<str>> {
        self.inner
            .rooms
            .lock()
            .get_key_value(org)
            .map(|(name, _)| name.clone())
    }

    /// Joins `org`'s room. Every durable event committed after this returns that `filter` sees
    /// will be queued, in seq order.
    pub async fn register(
        &self,
        org: &str,
        filter: Filter,
    ) -> Result<Registration, crate::store::StoreError> {
        let existing = self.inner.rooms.lock().get(org).cloned();
        let room = match existing {
            Some(room) => room,
            None => {
                // The head is read before the room exists, so every event after it reaches the
                // room either by the bus or by the room's gap repair. One read per org however
                // many subscribers join at once.
                let opening = self
                    .inner
                    .opening
                    .lock()
                    .entry(org.into())
                    .or_default()
                    .clone();
                let head = *opening
                    .get_or_try_init(|| async { Ok(self.inner.store.bounds(org).await?.head) })
                    .await?;
                let mut rooms = self.inner.rooms.lock();
                let room = rooms
                    .entry(org.into())
                    .or_insert_with(|| self.start_room(org, head))
                    .clone();
                let mut opened = self.inner.opening.lock();
                if opened.get(org).is_some_and(|o| Arc::ptr_eq(o, &opening)) {
                    opened.remove(org);
                }
                room
            }
        };
        let joined = {
            let rooms = self.inner.rooms.lock();
            // The room may have closed while we read the head; then start over with a fresh one.
            rooms
                .get(org)
                .is_some_and(|r| Arc::ptr_eq(r, &room))
                .then(|| {
                    let (tx, rx) = queue::channel::<_, CutFlag>(self.inner.queue);
                    let mut subs = room.subs.lock();
                    let joined = subs.delivered;
                    let key = subs.add(Sub {
                        filter: filter.clone(),
                        tx,
                    });
                    if self.inner.shut.load(Ordering::SeqCst) {
                        // Joining after the shutdown: ended at once.
                        rx.mark().set(Cut::Shutdown);
                        subs.remove(key);
                    }
                    (rx, key, joined)
                })
        };
        let Some((rx, key, joined)) = joined else {
            return Box::pin(self.register(org, filter)).await;
        };
        Ok(Registration {
            rx,
            joined,
            key,
            room,
            hub: self.clone(),
        })
    }

    /// Ends every subscriber's queue, now and for anyone joining later, with `Cut::Shutdown`:
    /// each stream sends what is already queued, then ends resumably. (One pass at shutdown
    /// instead of every stream watching a cancellation signal on every wake-up.)
    pub fn shut_down(&self) {
        self.inner.shut.store(true, Ordering::SeqCst);
        let rooms: Vec<Arc<Room>> = self.inner.rooms.lock().values().cloned().collect();
        for room in rooms {
            room.cut_all(Cut::Shutdown);
        }
    }

    fn start_room(&self, org: &str, head: u64) -> Arc<Room> {
        let (tx, rx) = mpsc::unbounded_channel();
        let org: Arc<str> = org.into();
        self.inner.bus.room_opened(&org);
        if !self.inner.bus.lossy() {
            // Events committed between the head read and now reached no room: look them up.
            let _ = tx.send(RoomMsg::Subscribed);
        }
        let room = Arc::new(Room {
            org,
            tx,
            subs: Mutex::new(Subscribers::new(head)),
            closed: CancellationToken::new(),
            pacer: self.inner.pacer.clone(),
        });
        tokio::spawn(run_room(room.clone(), rx, head, self.inner.store.clone()));
        room
    }

    /// The events of `org`'s log after `pos` for a replay (read once for all the subscribers
    /// replaying the same part of the log), or that the log does not reach back to `pos`.
    pub async fn replay_after(
        &self,
        org: &str,
        pos: u64,
    ) -> Result<Replay, crate::store::StoreError> {
        self.inner.reads.after(org, pos).await
    }

    /// An ephemeral event for the subscribers of `org` that asked for its kind and may see it.
    pub fn deliver_ephemeral(&self, org: &str, ev: Ephemeral) {
        self.inner.rooms.send(org, RoomMsg::Ephemeral(ev));
    }
}

/// Every `TAIL_CHECK`, while the Hub lives: one Store query for the heads of all rooms' orgs, and
/// a `Head` message to each room that has not delivered up to its org's head.
/// Runs every `TAIL_CHECK_DEGRADED` instead while the bus is not connected.
async fn check_tails(hub: Weak<Inner>) {
    loop {
        let every = match hub.upgrade() {
            Some(inner) if inner.bus.connected() => TAIL_CHECK,
            Some(_) => TAIL_CHECK_DEGRADED,
            None => return,
        };
        tokio::time::sleep(every).await;
        let Some(inner) = hub.upgrade() else { return };
        let rooms: HashMap<Arc<str>, Arc<Room>> = inner.rooms.lock().clone();
        if !rooms.is_empty() {
            send_heads(&inner, &rooms).await;
        }
    }
}

/// One Store query for the heads of `rooms`' orgs, and a `Head` message to each room that has not
/// delivered up to its org's head.
async fn send_heads(inner: &Inner, rooms: &HashMap<Arc<str>, Arc<Room>>) {
    let orgs: Vec<Arc<str>> = rooms.keys().cloned().collect();
    match inner.store.heads(&orgs).await {
        Ok(heads) => {
            for (org, head) in heads {
                if let Some(room) = rooms.get(&org)
                    && head > room.subs.lock().delivered
                {
                    let _ = room.tx.send(RoomMsg::Head(head));
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "tail check failed; retrying on the next one"),
    }
}

async fn run_room(
    room: Arc<Room>,
    mut rx: mpsc::UnboundedReceiver<RoomMsg>,
    mut last: u64,
    store: Arc<dyn Log>,
) {
    loop {
        tokio::select! {
            _ = room.closed.cancelled() => break,
            msg = rx.recv() => match msg {
                None => break,
                Some(RoomMsg::Durable(ev)) => {
                    if ev.seq <= last {
                        continue;
                    }
                    if ev.seq > last + 1 {
                        // Lost on the bus: repair from the Store, which holds `ev` too. On
                        // failure nothing is delivered past the gap; the next event or tail
                        // check retries.
                        METRICS.gap_repairs.inc();
                        last = repair(&room, &*store, last, ev.seq).await;
                    } else {
                        last = ev.seq;
                        room.fan_out_durable(&ev);
                    }
                }
                Some(RoomMsg::Ephemeral(ev)) => {
                    let item = Item::new(0, ev.bytes.clone());
                    let seen = TopicsSeen::default();
                    let woken = room.subs.lock().fan_out(&item, ev.audience.as_deref(), |f| f.takes_ephemeral(&ev, &seen));
                    room.pacer.wake(woken);
                }
                Some(RoomMsg::Head(head)) => last = catch_up(&room, &*store, last, head).await,
                Some(RoomMsg::Subscribed) => match store.bounds(&room.org).await {
                    Ok(b) => last = catch_up(&room, &*store, last, b.head).await,
                    Err(e) => tracing::warn!(org = %room.org, error = %e, "tail check failed; retrying on the next one"),
                },
            },
        }
    }
}

/// A tail check found the org's log at `head`: repairs up to it when the room is behind.
async fn catch_up(room: &Room, store: &dyn Log, last: u64, head: u64) -> u64 {
    if head <= last {
        return last;
    }
    METRICS.tail_repairs.inc();
    repair(room, store, last, head).await
}

/// Delivers the org's events `last+1 ..= upto` from the Store; returns the new last delivered seq.
/// Always terminates: when the log no longer reaches back to `last`, the events in between can
/// never be delivered, so every subscriber is ended resumably (its client resumes with its cursor
/// and Subscribe answers `resync`, the one path that explains a gap) and the room goes on from
/// the log's head.
async fn repair(room: &Room, store: &dyn Log, mut last: u64, upto: u64) -> u64 {
    while last < upto {
        match store.read_after(&room.org, last, REPAIR_PAGE).await {
            Ok(LogRead::Events(page)) if !page.is_empty() => {
                for ev in page {
                    last = ev.seq;
                    room.fan_out_durable(&ev);
                }
            }
            Ok(LogRead::Events(_)) => break,
            Ok(LogRead::Unreachable(bounds)) => {
                tracing::warn!(org = %room.org, last, floor = bounds.floor, "the log no longer reaches this room's position; its streams must resync");
                let head = last.max(bounds.head);
                let mut subs = room.subs.lock();
                subs.cut_all(Cut::Behind);
                subs.delivered = head;
                return head;
            }
            Err(e) => {
                tracing::warn!(org = %room.org, error = %e, "gap repair failed; retrying on the next tail check");
                break;
            }
        }
    }
    last
}

impl Room {
    /// Ends every subscriber's stream resumably, for `why`.
    fn cut_all(&self, why: Cut) {
        self.subs.lock().cut_all(why);
    }

    fn fan_out_durable(&self, ev: &CommittedEvent) {
        let item = Item::new(ev.seq, ev.bytes.clone());
        let woken = {
            let mut subs = self.subs.lock();
            subs.delivered = ev.seq;
            let seen = TopicsSeen::default();
            subs.fan_out(&item, ev.audience.as_deref(), |f| f.takes_seen(ev, &seen))
        };
        self.pacer.wake(woken);
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::SystemTime};

    use async_trait::async_trait;
    use parking_lot::Mutex;

    use super::*;
    use crate::{
        bus::{Bus, MemoryBus},
        store::{Entities, LogBounds, LogRead, NewJob, Result, sqlite::SqliteStore},
    };

    /// A bus that hands nothing on by itself: the test delivers what it recorded, in any order.
    #[derive(Default)]
    struct RecordingBus(Mutex<Vec<CommittedEvent>>);

    impl Bus for RecordingBus {
        fn publish(&self, ev: CommittedEvent) {
            self.0.lock().push(ev);
        }
        /// The test plays the losses itself, through the rooms' gap repair.
        fn lossy(&self) -> bool {
            false
        }
    }

    fn temp_db(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "orgpulse-hub-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        dir.join("db.sqlite")
    }

    async fn setup(tag: &str) -> (Arc<SqliteStore>, Arc<RecordingBus>, Hub) {
        let bus = Arc::new(RecordingBus::default());
        let store = Arc::new(
            SqliteStore::open(
                &temp_db(tag),
                crate::bus::committed_to(bus.clone()),
                Duration::from_secs(10),
            )
            .unwrap(),
        );
        let hub = Hub::new(Arc::default(), store.clone(), 10_000, bus.clone());
        (store, bus, hub)
    }

    async fn commit_jobs(store: &Arc<SqliteStore>, n: usize) {
        let entities = Entities::new(store.clone());
        for i in 0..n {
            let new = NewJob {
                title: format!("job {i}"),
                ..Default::default()
            };
            entities.create_job("o", "u", new).await.unwrap();
        }
    }

    fn filter(user: &str) -> Filter {
        Filter {
            viewer: Arc::new(Viewer {
                user: user.into(),
                groups: Default::default(),
                roles: audience::Names::new(["member"]),
                sees_all: false,
            }),
            kinds: Kinds::from_request(&[]).unwrap(),
            entity_types: EntityTypes::default(),
            topics: Topics::default(),
        }
    }

    /// A bus that loses every event with seq `lost_seq` (for each org) and hands the rest to the
    /// Hub.
    struct LossyBus {
        rooms: Arc<Rooms>,
        lost_seq: u64,
        lost: Mutex<Vec<(Arc<str>, u64)>>,
    }

    impl Bus for LossyBus {
        fn publish(&self, ev: CommittedEvent) {
            if ev.seq == self.lost_seq {
                self.lost.lock().push((ev.org.clone(), ev.seq));
            } else {
                self.rooms.deliver(ev);
            }
        }
        fn lossy(&self) -> bool {
            true
        }
    }

    /// The SQLite store, counting the log-head queries made of it: `bounds` calls, and the orgs
    /// asked for in each `heads` call.
    struct CountingStore {
        inner: Arc<SqliteStore>,
        dir: std::path::PathBuf,
        bounds_calls: Mutex<u64>,
        heads_calls: Mutex<Vec<usize>>,
    }

    impl CountingStore {
        fn open(bus: Arc<dyn Bus>) -> Arc<CountingStore> {
            let dir = std::env::temp_dir().join(format!(
                "orgpulse-hub-test-{}-{:x}",
                std::process::id(),
                rand::random::<u64>()
            ));
            Arc::new(CountingStore {
                inner: Arc::new(
                    SqliteStore::open(
                        &dir.join("hub.db"),
                        crate::bus::committed_to(bus),
                        Duration::from_secs(10),
                    )
                    .unwrap(),
                ),
                dir,
                bounds_calls: Mutex::new(0),
                heads_calls: Mutex::new(Vec::new()),
            })
        }
    }

    impl Drop for CountingStore {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[async_trait]
    impl Log for CountingStore {
        fn org_epoch(&self, org: &str) -> u64 {
            self.inner.org_epoch(org)
        }
        async fn bounds(&self, org: &str) -> Result<LogBounds> {
            *self.bounds_calls.lock() += 1;
            self.inner.bounds(org).await
        }
        async fn heads(&self, orgs: &[Arc<str>]) -> Result<Vec<(Arc<str>, u64)>> {
            self.heads_calls.lock().push(orgs.len());
            self.inner.heads(orgs).await
        }
        async fn read_after(&self, org: &str, after: u64, limit: usize) -> Result<LogRead> {
            self.inner.read_after(org, after, limit).await
        }
        async fn trim(&self, before: SystemTime) -> Result<u64> {
            self.inner.trim(before).await
        }
    }

    fn everything() -> Filter {
        filter("watcher")
    }

    /// Takes queued items until seq `upto` arrived (or the room stalls for a second).
    async fn seqs_until(reg: &mut Registration, upto: u64) -> Vec<u64> {
        let mut seqs = Vec::new();
        while seqs.last() != Some(&upto) {
            let item = tokio::time::timeout(Duration::from_secs(1), reg.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("room stalled after {seqs:?}"));
            seqs.push(item.expect("room cut the subscriber").seq);
        }
        seqs
    }

    /// Commits `n` job creations in `org`, one event each.
    async fn write_events(store: &CountingStore, org: &str, n: usize) {
        let entities = Entities::new(store.inner.clone());
        for i in 0..n {
            let new = NewJob {
                title: format!("job {i}"),
                ..Default::default()
            };
            entities.create_job(org, "writer", new).await.unwrap();
        }
    }

    /// The seqs `reg` receives until `n` arrived (each within a few tail checks).
    async fn receive(reg: &mut Registration, n: usize) -> Vec<u64> {
        let mut seqs = Vec::new();
        while seqs.len() < n {
            let item = tokio::time::timeout(5 * TAIL_CHECK, reg.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("only {seqs:?} arrived"))
                .expect("registration open");
            seqs.push(item.seq);
        }
        seqs
    }

    #[tokio::test]
    async fn lossy_bus_is_repaired_exactly_once_in_order() {
        let (store, bus, hub) = setup("lossy").await;
        let mut a = hub.register("o", filter("a")).await.unwrap();
        let mut b = hub.register("o", filter("b")).await.unwrap();
        commit_jobs(&store, 40).await;
        let events = std::mem::take(&mut *bus.0.lock());
        assert_eq!(events.len(), 40);
        // Every 3rd lost, every 5th twice, neighbours swapped; the last one arrives.
        let mut script: Vec<CommittedEvent> = Vec::new();
        for pair in events.chunks(2) {
            for ev in pair.iter().rev() {
                if ev.seq % 3 == 0 && ev.seq != 40 {
                    continue;
                }
                script.push(ev.clone());
                if ev.seq % 5 == 0 {
                    script.push(ev.clone());
                }
            }
        }
        for ev in script {
            hub.inner.rooms.deliver(ev);
        }
        let want: Vec<u64> = (1..=40).collect();
        assert_eq!(seqs_until(&mut a, 40).await, want);
        assert_eq!(seqs_until(&mut b, 40).await, want);
        // Nothing more: the duplicates after 40 were dropped.
        assert!(a.rx.try_recv().is_none() && b.rx.try_recv().is_none());
    }

    #[tokio::test]
    async fn repair_of_a_gap_past_the_retained_log_terminates_and_cuts_the_room() {
        let (store, bus, hub) = setup("trimmed").await;
        commit_jobs(&store, 5).await;
        // 1..=5 never reached the room and are trimmed away: it can never deliver them.
        store
            .trim(SystemTime::now() + Duration::from_secs(1))
            .await
            .unwrap();
        commit_jobs(&store, 1).await;
        drop(hub);
        bus.0.lock().clear();
        // A room by hand (no task of its own, so no tail check races the repair) that delivered
        // nothing yet.
        let (tx, _) = mpsc::unbounded_channel();
        let room = Room {
            org: "o".into(),
            tx,
            subs: Mutex::default(),
            closed: CancellationToken::new(),
            pacer: Arc::default(),
        };
        let (sub_tx, mut rx) = queue::channel(16);
        room.subs.lock().add(Sub {
            filter: filter("a"),
            tx: sub_tx,
        });
        let last = tokio::time::timeout(Duration::from_secs(2), repair(&room, &*store, 0, 6))
            .await
            .expect("repair spun on a gap the log no longer holds");
        // The room jumped to the log's head; its subscriber was ended resumably (its client
        // resumes with its cursor and Subscribe answers resync).
        assert_eq!(last, 6);
        assert_eq!(rx.mark().get(), Some(Cut::Behind));
        assert!(
            rx.recv().await.is_none(),
            "nothing of the gap was delivered"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn lossy_bus_lost_last_events_come_from_one_batched_tail_check() {
        let rooms = Arc::new(Rooms::default());
        let bus = Arc::new(LossyBus {
            rooms: rooms.clone(),
            lost_seq: 3,
            lost: Mutex::default(),
        });
        let store = CountingStore::open(bus.clone());
        let hub = Hub::new(rooms, store.clone(), 16, bus.clone());
        let mut a = hub.register("org-a", everything()).await.unwrap();
        let mut b = hub.register("org-b", everything()).await.unwrap();
        write_events(&store, "org-a", 3).await;
        write_events(&store, "org-b", 3).await;

        // The bus lost seq 3 of both orgs and nothing came after it: only the tail check can
        // find them. Each arrives once, in order, and no more arrive over later checks.
        assert_eq!(receive(&mut a, 3).await, [1, 2, 3]);
        assert_eq!(receive(&mut b, 3).await, [1, 2, 3]);
        tokio::time::sleep(5 * TAIL_CHECK).await;
        assert!(a.rx.try_recv().is_none() && b.rx.try_recv().is_none());
        assert_eq!(*bus.lost.lock(), [("org-a".into(), 3), ("org-b".into(), 3)]);
        // One query per check for both rooms, none per room (bounds only when a room opens).
        let heads = store.heads_calls.lock().clone();
        assert!(!heads.is_empty());
        assert!(heads.iter().all(|&orgs| orgs == 2), "{heads:?}");
        assert_eq!(*store.bounds_calls.lock(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn memory_bus_hub_runs_no_tail_query() {
        let rooms = Arc::new(Rooms::default());
        let bus = Arc::new(MemoryBus::new(rooms.clone()));
        let store = CountingStore::open(bus.clone());
        let hub = Hub::new(rooms, store.clone(), 16, bus.clone());
        let mut reg = hub.register("org-a", everything()).await.unwrap();
        write_events(&store, "org-a", 3).await;
        assert_eq!(receive(&mut reg, 3).await, [1, 2, 3]);

        tokio::time::sleep(10 * TAIL_CHECK).await;
        assert!(reg.rx.try_recv().is_none());
        assert!(store.heads_calls.lock().is_empty());
        // The head read that opened the room, and the one after it (for events committed
        // meanwhile).
        assert_eq!(*store.bounds_calls.lock(), 2);
    }

    fn event(kind: EventKind, audience: Option<&str>, entity_type: Option<&str>) -> CommittedEvent {
        CommittedEvent {
            org: "acme".into(),
            seq: 1,
            kind,
            audience: audience.map(|u| Arc::new(crate::audience::Audience::one_user(u))),
            topics: Default::default(),
            entity_type: entity_type.map(Into::into),
            bytes: Bytes::new(),
        }
    }

    #[test]
    fn entity_types_narrow_entity_events_only() {
        let types = EntityTypes::from_request(&["project".into(), "invoice".into()]).unwrap();
        let alice = Filter {
            entity_types: types,
            ..filter("alice")
        };
        assert!(alice.sees(&event(EventKind::Entity, None, Some("invoice"))));
        assert!(alice.sees(&event(EventKind::Entity, None, Some("project"))));
        assert!(!alice.sees(&event(EventKind::Entity, None, Some("comment"))));
        assert!(alice.sees(&event(EventKind::Job, None, None)));
        assert!(alice.sees(&event(EventKind::Entity, Some("alice"), Some("invoice"))));
        assert!(!alice.sees(&event(EventKind::Entity, Some("bob"), Some("invoice"))));
        let jobs_only = Filter {
            kinds: Kinds::from_request(&[EventKind::Job as i32]).unwrap(),
            ..alice
        };
        assert!(!jobs_only.sees(&event(EventKind::Entity, None, Some("invoice"))));
        assert!(EntityTypes::from_request(&["Invoice".into()]).is_err());
    }
}
