//! The Store: source of truth for jobs, notifications and each org's event log.
//!
//! Every write is ONE transaction: the entity change plus the event appended to the org's log with
//! the org's next `seq` (a per-org counter row, so commit order is seq order and a rollback leaves no
//! gap). After commit the engine publishes the committed events on the Bus in seq order. The rules
//! that do not depend on the engine (job state machine, event encoding) live here; each engine file
//! does only the I/O.
pub mod model;
pub mod postgres;
pub mod sqlite;

use std::{collections::HashMap, sync::Arc, time::SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use orgpulse::proto::{Event, EventKind, Job, JobDeleted, JobStatus, Notification, event::Payload};
use prost::Message;
use tonic::Status;

use crate::{
    bus::Bus,
    config::{Config, Database},
    cursor::Cursor,
};

/// A durable event as committed: encoded once, shared by every subscriber it goes to.
#[derive(Debug, Clone)]
pub struct CommittedEvent {
    pub org: Arc<str>,
    pub seq: u64,
    pub kind: EventKind,
    /// The one user a notification is addressed to; `None` = everyone in the org may see it.
    pub audience: Option<Arc<str>>,
    /// The encoded `Event`, cursor included.
    pub bytes: Bytes,
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

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        match e {
            StoreError::NotFound(m) => Status::not_found(m),
            StoreError::FailedPrecondition(m) => Status::failed_precondition(m),
            StoreError::Aborted(m) => Status::aborted(m),
            StoreError::Unavailable(m) => Status::unavailable(m),
            StoreError::Internal(m) => {
                tracing::error!(error = %m, "storage error");
                Status::internal("storage error")
            }
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Opens the store `database` names: the engine is chosen here and nowhere else.
pub async fn open(cfg: &Config, bus: Arc<dyn Bus>) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match cfg.database().map_err(anyhow::Error::msg)? {
        Database::Sqlite(path) => Arc::new(sqlite::SqliteStore::open(
            &path,
            bus,
            cfg.sqlite_busy_timeout,
        )?),
        Database::Postgres(url) => Arc::new(postgres::PostgresStore::open(&url, bus).await?),
    })
}

#[derive(Clone)]
pub struct NewJob {
    pub title: String,
    pub labels: HashMap<String, String>,
    pub request_id: String,
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

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The epoch of `org`'s log in this database.
    fn org_epoch(&self, org: &str) -> u64;
    async fn create_job(&self, org: &str, actor: &str, new: NewJob) -> Result<Job>;
    async fn get_job(&self, org: &str, job_id: &str) -> Result<Job>;
    /// Newest first; `statuses` empty = all; continues before `after` when given.
    async fn list_jobs(
        &self,
        org: &str,
        statuses: Vec<i32>,
        limit: usize,
        after: Option<String>,
    ) -> Result<JobPage>;
    async fn update_job(&self, org: &str, actor: &str, patch: JobPatch) -> Result<Job>;
    async fn delete_job(&self, org: &str, actor: &str, job_id: &str) -> Result<()>;
    async fn send_notification(
        &self,
        org: &str,
        actor: &str,
        new: NewNotification,
    ) -> Result<Notification>;
    /// The notifications `user` may see (addressed to them or to the whole org), newest first.
    async fn list_notifications(
        &self,
        org: &str,
        user: &str,
        unread_only: bool,
        limit: usize,
        after: Option<String>,
    ) -> Result<NotificationPage>;
    /// Marks read for `user`; returns their unread count.
    async fn mark_read(&self, org: &str, user: &str, ids: Vec<String>) -> Result<u32>;
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
    /// Whether the store can write now, from its writer's last transaction (cheap, writes
    /// nothing); `Err` says why not.
    fn health(&self) -> std::result::Result<(), String>;
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
    payload: Payload,
) -> Bytes {
    Event {
        cursor: Cursor { epoch, seq }.encode(),
        seq,
        org_id: org.to_string(),
        time: Some(timestamp(now)),
        actor: actor.to_string(),
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
        | Payload::Resync(_) => None,
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
