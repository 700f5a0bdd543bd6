//! The Store: source of truth for jobs, notifications and each org's event log.
//!
//! Every write is ONE transaction: the entity change plus the event appended to the org's log with
//! the org's next `seq` (a per-org counter row, so commit order is seq order and a rollback leaves no
//! gap). After each COMMIT the engine hands the committed events, in seq order, to the callback it
//! was opened with (`Committed`; `server.rs` points it at the Bus): no engine knows the Bus. Its
//! users see it through the part each needs ([`Store`]: `log`, `entities`, `status`). The rules
//! that do not depend on the engine live here and in `model`, the write operations in `ops`; each
//! engine folder holds SQL and connection handling only.
pub mod model;
pub mod ops;
pub mod postgres;
pub mod sqlite;

use std::{collections::HashMap, sync::Arc, time::SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use orgpulse::proto::{
    EntityChanged, Event, EventKind, Job, JobDeleted, JobStatus, Notification, event::Payload,
};
use prost::Message;

use ops::Engine;
pub use ops::Entities;

use crate::{
    audience::{self, Audience, Names, Topics, Viewer},
    config::{Config, Database},
    cursor::Cursor,
    metrics::PoolStats,
};

/// A durable event as committed: encoded once, shared by every subscriber it goes to.
#[derive(Debug, Clone)]
pub struct CommittedEvent {
    pub org: Arc<str>,
    pub seq: u64,
    pub kind: EventKind,
    /// Who may see it; `None` = everyone in the org.
    pub audience: Option<Arc<Audience>>,
    /// Its topics (for the subscribers' topic filters).
    pub topics: Names,
    /// The entity type of an `entity_changed` event (for the subscribers' type filters).
    pub entity_type: Option<Arc<str>>,
    /// The encoded `Event`, cursor included.
    pub bytes: Bytes,
}

impl CommittedEvent {
    /// `ev` as it is appended at `now` with `seq` to its org's log, in a database of epoch
    /// `db_epoch`.
    pub fn new(db_epoch: u64, seq: u64, now: SystemTime, ev: ops::NewEvent<'_>) -> Result<Self> {
        let kind = model::durable_kind(&ev.payload)?;
        let entity_type = payload_entity_type(&ev.payload);
        let epoch = crate::cursor::org_epoch(db_epoch, ev.org);
        Ok(CommittedEvent {
            org: ev.org.into(),
            seq,
            kind,
            audience: ev.audience.cloned().map(Arc::new),
            topics: Names::new(ev.topics),
            entity_type,
            bytes: encode_event(epoch, ev.org, seq, ev.actor, now, ev.topics, ev.payload),
        })
    }

    /// An event read back from the log (or off the bus), with its stored audience text.
    pub fn from_log(
        org: Arc<str>,
        seq: u64,
        kind: EventKind,
        audience: Option<&str>,
        bytes: Bytes,
    ) -> Result<CommittedEvent> {
        let audience = audience
            .map(audience::from_stored)
            .transpose()
            .map_err(StoreError::Internal)?;
        let routing = RoutingOfEvent::decode(&*bytes).unwrap_or_default();
        Ok(CommittedEvent {
            entity_type: routing
                .entity_changed
                .filter(|_| kind == EventKind::Entity)
                .map(|e| e.entity_type.into()),
            topics: Names::new(routing.topics),
            org,
            seq,
            kind,
            audience: audience.map(Arc::new),
            bytes,
        })
    }

    /// The stored text of its audience (`None`: the whole org).
    pub fn stored_audience(&self) -> Option<String> {
        self.audience.as_deref().map(audience::stored)
    }
}

/// What routing needs of an encoded `Event`, its topics and entity type: decoding into this
/// skips every other field (the entity's data included) without parsing it.
#[derive(Clone, PartialEq, prost::Message)]
struct RoutingOfEvent {
    #[prost(string, repeated, tag = "6")]
    topics: Vec<String>,
    #[prost(message, optional, tag = "19")]
    entity_changed: Option<EntityTypeOnly>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct EntityTypeOnly {
    #[prost(string, tag = "1")]
    entity_type: String,
}

/// The entity type of an event about to be appended; `None` unless it is an entity event.
fn payload_entity_type(p: &Payload) -> Option<Arc<str>> {
    match p {
        Payload::EntityChanged(e) => Some(e.entity_type.as_str().into()),
        _ => None,
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Aborted(String),
    /// The store cannot write now (its writer failed, stopped or is overloaded): retry later.
    #[error("{0}")]
    Unavailable(String),
    #[error("storage error: {0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// What an engine calls with each event it committed, in commit order (which is seq order per
/// org). Called from the engine's writer, so the order holds without the publisher re-sorting.
pub type Committed = Arc<dyn Fn(CommittedEvent) + Send + Sync>;

/// A store as its users see it, each through the part it needs.
#[derive(Clone)]
pub struct Store {
    /// The org logs: the Hub, Subscribe, Poll and retention.
    pub log: Arc<dyn Log>,
    /// Jobs, notifications and entity changes: the services and the outbox.
    pub entities: Arc<Entities>,
    /// Whether it can write, and its connection pool: health and `/metrics`.
    pub status: Arc<dyn Status>,
    /// PostgreSQL only: writes that run statements of their own in the store's transaction
    /// (the outbox's pass when its table is in the store's database).
    pub shared: Option<postgres::SharedWrites>,
}

impl Store {
    fn of(engine: Arc<dyn Engine>, shared: Option<postgres::SharedWrites>) -> Store {
        Store {
            log: engine.clone(),
            status: engine.clone(),
            entities: Arc::new(Entities::new(engine)),
            shared,
        }
    }
}

/// Opens the store `--database` names (the engine is chosen here and nowhere else); its committed
/// events go to `committed`.
pub async fn open(cfg: &Config, committed: Committed) -> anyhow::Result<Store> {
    Ok(match cfg.database().map_err(anyhow::Error::msg)? {
        Database::Sqlite(path) => {
            let engine = sqlite::SqliteStore::open(&path, committed, cfg.sqlite_busy_timeout)?;
            Store::of(Arc::new(engine), None)
        }
        Database::Postgres(url) => {
            let engine = Arc::new(postgres::PostgresStore::open(&url, committed).await?);
            Store::of(engine.clone(), Some(postgres::SharedWrites::new(engine)))
        }
    })
}

#[derive(Clone, Default)]
pub struct NewJob {
    pub title: String,
    pub labels: HashMap<String, String>,
    pub request_id: String,
    /// Who may see the job and its events; `None` = the whole org.
    pub audience: Option<Audience>,
    /// Kept for all the job's events.
    pub topics: Vec<String>,
}

#[derive(Clone)]
pub struct JobPatch {
    pub job_id: String,
    pub status: Option<JobStatus>,
    pub progress: Option<u32>,
    pub title: Option<String>,
    pub message: Option<String>,
    pub expected_version: u64,
}

#[derive(Clone)]
pub struct NewNotification {
    pub user_id: String,
    pub title: String,
    pub body: String,
    pub severity: i32,
    pub request_id: String,
}

/// A change of one of the product's own entities, to append to `org`'s log as `entity_changed`.
#[derive(Debug, Clone)]
pub struct NewEntityChange {
    pub org: String,
    pub actor: String,
    pub change: EntityChanged,
    /// Who may see it (its `user_id` included); `None` = the whole org.
    pub audience: Option<Audience>,
    pub topics: Vec<String>,
    /// Namespace of `request_id`: the RPC's request ids or outbox row keys.
    pub request_kind: model::RequestKind,
    /// Idempotency key; empty = none.
    pub request_id: String,
}

/// A page of an org's jobs to read: newest first; `statuses` empty = all; continues before
/// `after` when given; only the jobs `pick` keeps.
pub struct JobQuery {
    pub org: String,
    pub statuses: Vec<i32>,
    pub limit: usize,
    pub after: Option<String>,
    pub pick: Arc<JobPick>,
}

/// Which jobs a caller gets: those its audience admits, with one of the topics asked for.
pub struct JobPick {
    pub viewer: Viewer,
    pub topics: Topics,
}

impl JobPick {
    /// The job of a stored row, when this caller may have it.
    pub fn pick(&self, row: &[u8]) -> Result<Option<Job>> {
        let (job, audience) = model::job_of_row(row)?;
        let keep = audience::admits(audience.as_ref(), &self.viewer)
            && self.topics.admits(job.topics.iter().map(String::as_str));
        Ok(keep.then_some(job))
    }
}

/// A page of the notifications `user` may see (addressed to them or to the whole org), newest
/// first.
pub struct NotificationQuery {
    pub org: String,
    pub user: String,
    pub unread_only: bool,
    pub limit: usize,
    pub after: Option<String>,
}

pub struct JobPage {
    pub jobs: Vec<Job>,
    /// Id to continue after, when there may be more.
    pub next: Option<String>,
    /// The org's last seq at the instant of the snapshot.
    pub head: u64,
}

pub struct NotificationPage {
    pub notifications: Vec<Notification>,
    pub next: Option<String>,
    pub unread: u32,
}

/// The servable part of an org's log: events `floor+1 ..= head` are retained.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogBounds {
    pub floor: u64,
    pub head: u64,
}

/// What an org's log holds after a seq: the one answer replay, Poll and gap repair act on.
#[derive(Debug)]
pub enum LogRead {
    /// The next events after the seq, in seq order and without gaps (empty: nothing after it yet).
    Events(Vec<CommittedEvent>),
    /// The log does not reach the seq (trimmed past it, or it is ahead of the head): whoever
    /// asked must resync. `bounds` are the log's as of the same read.
    Unreachable(LogBounds),
}

impl LogRead {
    /// The answer for `rows` read after `after` in the same read transaction as `bounds`: rows
    /// that do not continue `after` seamlessly are never handed out as if they did.
    pub fn of(after: u64, bounds: LogBounds, rows: Vec<CommittedEvent>) -> LogRead {
        let seamless = match (rows.first(), rows.last()) {
            (Some(first), Some(last)) => {
                first.seq == after + 1 && last.seq == after + rows.len() as u64
            }
            _ => true,
        };
        if after < bounds.floor || after > bounds.head || !seamless {
            LogRead::Unreachable(bounds)
        } else {
            LogRead::Events(rows)
        }
    }
}

/// An org's event log: what the Hub, Subscribe, Poll and retention read.
#[async_trait]
pub trait Log: Send + Sync + 'static {
    /// The epoch of `org`'s log in this database.
    fn org_epoch(&self, org: &str) -> u64;
    async fn bounds(&self, org: &str) -> Result<LogBounds>;
    /// The last seq of each of `orgs`' logs, in ONE query however many orgs there are (the
    /// Hub's tail check on a lossy bus). Orgs that never had an event (head 0) are left out.
    async fn heads(&self, orgs: &[Arc<str>]) -> Result<Vec<(Arc<str>, u64)>>;
    /// Up to `limit` events with seq > `after`, in seq order, or that the log no longer reaches
    /// back to `after`: the retained floor is checked in the same read transaction as the rows, so
    /// a trim racing the read can never make it skip events silently.
    async fn read_after(&self, org: &str, after: u64, limit: usize) -> Result<LogRead>;
    /// Drops events (and idempotency keys) committed before `before`, raising each org's floor.
    async fn trim(&self, before: SystemTime) -> Result<u64>;
}

/// A store's state, for `/health` and `/metrics`.
pub trait Status: Send + Sync + 'static {
    /// Whether the store can write now, from its writer's last transaction (cheap, writes
    /// nothing); `Err` says why not.
    fn health(&self) -> std::result::Result<(), String>;
    /// The connection pool's state (None: the engine has no pool).
    fn pool_stats(&self) -> Option<PoolStats> {
        None
    }
}

/// What the `requests` table keeps for an entity change's key: the seq it got.
pub fn remembered_seq_data(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// The seq an entity change's key was given (see [`remembered_seq_data`]).
pub fn remembered_seq(data: &[u8]) -> Result<u64> {
    let bytes: [u8; 8] = data
        .try_into()
        .map_err(|_| StoreError::Internal("corrupt row: a remembered seq is not 8 bytes".into()))?;
    Ok(u64::from_be_bytes(bytes))
}

/// How long a `request_id` makes a create idempotent.
pub const IDEMPOTENCY_WINDOW: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

pub fn millis(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Applies an update to `job` following the status state machine of docs/api.md.
pub fn apply_patch(job: &mut Job, patch: &JobPatch, actor: &str, now: SystemTime) -> Result<()> {
    if patch.expected_version != 0 && patch.expected_version != job.version {
        return Err(StoreError::Aborted(format!(
            "job {} is at version {}, not the expected {}",
            job.id, job.version, patch.expected_version
        )));
    }
    if let Some(to) = patch.status {
        let from = job.status();
        if from != to {
            use JobStatus::*;
            let legal = matches!(
                (from, to),
                (Queued, Running | Cancelled) | (Running, Succeeded | Failed | Cancelled)
            );
            if !legal {
                return Err(StoreError::FailedPrecondition(format!(
                    "job {} cannot go from {} to {}",
                    job.id,
                    from.as_str_name(),
                    to.as_str_name()
                )));
            }
            job.set_status(to);
        }
    }
    if let Some(p) = patch.progress {
        job.progress = p;
    }
    if let Some(t) = &patch.title {
        job.title = t.clone();
    }
    if let Some(m) = &patch.message {
        job.message = m.clone();
    }
    job.version += 1;
    job.updated_by = actor.to_string();
    job.updated_at = Some(timestamp(now));
    Ok(())
}

/// The encoded `Event` for a durable change, cursor included.
pub fn encode_event(
    epoch: u64,
    org: &str,
    seq: u64,
    actor: &str,
    now: SystemTime,
    topics: &[String],
    payload: Payload,
) -> Bytes {
    Event {
        cursor: Cursor { epoch, seq }.encode(),
        seq,
        org_id: org.to_string(),
        time: Some(timestamp(now)),
        actor: actor.to_string(),
        topics: topics.to_vec(),
        payload: Some(payload),
    }
    .encode_to_vec()
    .into()
}

/// The kind of a durable payload (for filtering without decoding); `None` for the ephemeral ones,
/// which are never appended to the log.
pub fn payload_kind(p: &Payload) -> Option<EventKind> {
    match p {
        Payload::JobCreated(_) | Payload::JobUpdated(_) | Payload::JobDeleted(_) => {
            Some(EventKind::Job)
        }
        Payload::NotificationNew(_) => Some(EventKind::Notification),
        Payload::EntityChanged(_) => Some(EventKind::Entity),
        Payload::UserOnline(_)
        | Payload::UserOffline(_)
        | Payload::Heartbeat(_)
        | Payload::CaughtUp(_)
        | Payload::Resync(_)
        | Payload::PresenceState(_)
        | Payload::Broadcast(_) => None,
    }
}

pub fn job_deleted(job_id: &str) -> Payload {
    Payload::JobDeleted(JobDeleted {
        job_id: job_id.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_entity_type_and_topics_are_read_back_from_the_encoded_event() {
        let payload = Payload::EntityChanged(EntityChanged {
            entity_type: "invoice".into(),
            entity_id: "inv_1".into(),
            action: "paid".into(),
            ..Default::default()
        });
        let topics = ["project:42".to_string()];
        let bytes = encode_event(1, "acme", 7, "alice", SystemTime::now(), &topics, payload);
        let ev = CommittedEvent::from_log("acme".into(), 7, EventKind::Entity, Some("bob"), bytes)
            .unwrap();
        assert_eq!(ev.entity_type.as_deref(), Some("invoice"));
        assert!(ev.topics.has("project:42"));
        assert_eq!(ev.stored_audience().as_deref(), Some("bob"));
    }

    fn job(status: JobStatus) -> Job {
        let mut j = Job {
            id: "j".into(),
            version: 1,
            ..Default::default()
        };
        j.set_status(status);
        j
    }

    fn to(status: JobStatus) -> JobPatch {
        JobPatch {
            job_id: "j".into(),
            status: Some(status),
            progress: None,
            title: None,
            message: None,
            expected_version: 0,
        }
    }

    #[test]
    fn state_machine() {
        use JobStatus::*;
        let now = SystemTime::now();
        for (from, target, ok) in [
            (Queued, Running, true),
            (Queued, Cancelled, true),
            (Queued, Succeeded, false),
            (Running, Succeeded, true),
            (Running, Failed, true),
            (Running, Queued, false),
            (Succeeded, Running, false),
            (Cancelled, Running, false),
        ] {
            let mut j = job(from);
            assert_eq!(
                apply_patch(&mut j, &to(target), "u", now).is_ok(),
                ok,
                "{from:?}->{target:?}"
            );
        }
        let mut j = job(Queued);
        let mut p = to(Running);
        p.expected_version = 5;
        assert!(matches!(
            apply_patch(&mut j, &p, "u", now),
            Err(StoreError::Aborted(_))
        ));
        p.expected_version = 1;
        apply_patch(&mut j, &p, "u", now).unwrap();
        assert_eq!(j.version, 2);
    }
}
