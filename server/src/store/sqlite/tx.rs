//! The SQLite engine's write transaction: the steps of the write operations (`ops::WriteTx`) as
//! statements on the writer's connection. One writer thread holds the write lock for the whole
//! transaction, so locking an org's log is the counter's upsert itself, and reading a job for
//! update is a plain read.
use std::time::SystemTime;

use async_trait::async_trait;
use orgpulse::proto::{Job, Notification};
use rusqlite::{Connection, params};

use super::{db, exec, first_row, job_row, unread_count};
use crate::store::{
    CommittedEvent, Result, StoreError, millis, model,
    ops::{NewEvent, RequestKey, WriteTx},
};

/// The writer's connection and the transaction it has open: its clock and the events appended.
pub(super) struct Tx {
    pub(super) conn: Connection,
    pub(super) db_epoch: u64,
    pub(super) now: SystemTime,
    /// The events appended so far, in seq order: handed on once the transaction commits.
    pub(super) events: Vec<CommittedEvent>,
}

#[async_trait]
impl WriteTx for Tx {
    fn now(&self) -> SystemTime {
        self.now
    }

    /// Nothing to do: the writer holds the database's write lock for the whole transaction.
    async fn lock_org(&mut self, _org: &str) -> Result<()> {
        Ok(())
    }

    async fn job_for_update(&mut self, org: &str, id: &str) -> Result<Option<Vec<u8>>> {
        job_row(&self.conn, org, id)
    }

    async fn insert_job(&mut self, job: &Job, data: Vec<u8>) -> Result<()> {
        self.update_job(job, data).await
    }

    async fn update_job(&mut self, job: &Job, data: Vec<u8>) -> Result<()> {
        exec(
            &self.conn,
            "INSERT OR REPLACE INTO jobs (org_id, id, status, data) VALUES (?1, ?2, ?3, ?4)",
            params![job.org_id, job.id, job.status, data],
        )
        .map(drop)
    }

    async fn delete_job(&mut self, org: &str, id: &str) -> Result<bool> {
        let n = exec(
            &self.conn,
            "DELETE FROM jobs WHERE org_id = ?1 AND id = ?2",
            [org, id],
        )?;
        Ok(n > 0)
    }

    async fn insert_notification(&mut self, n: &Notification, data: Vec<u8>) -> Result<()> {
        exec(
            &self.conn,
            "INSERT INTO notifications (org_id, id, user_id, data) VALUES (?1, ?2, ?3, ?4)",
            params![n.org_id, n.id, n.user_id, data],
        )
        .map(drop)
    }

    async fn notification_visible(&mut self, org: &str, id: &str, user: &str) -> Result<bool> {
        self.conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM notifications
                 WHERE org_id = ?1 AND id = ?2 AND user_id IN ('', ?3))",
                [org, id, user],
                |r| r.get(0),
            )
            .map_err(db)
    }

    async fn mark_read(&mut self, org: &str, user: &str, id: &str) -> Result<()> {
        exec(
            &self.conn,
            "INSERT OR IGNORE INTO notification_reads (org_id, user_id, notification_id)
             VALUES (?1, ?2, ?3)",
            [org, user, id],
        )
        .map(drop)
    }

    async fn unread_count(&mut self, org: &str, user: &str) -> Result<u32> {
        unread_count(&self.conn, org, user)
    }

    /// The one writer needs no claim: a stored request within the window answers, else none.
    async fn claim_request(&mut self, key: RequestKey<'_>) -> Result<Option<Vec<u8>>> {
        let RequestKey { org, kind, id } = key;
        first_row(
            &self.conn,
            "SELECT data FROM requests
             WHERE org_id = ?1 AND kind = ?2 AND request_id = ?3 AND created_ms >= ?4",
            params![
                org,
                kind.as_str(),
                id,
                model::requests_valid_since(self.now)
            ],
            |r| r.get(0),
        )
    }

    async fn remember(&mut self, key: RequestKey<'_>, data: Vec<u8>) -> Result<()> {
        let RequestKey { org, kind, id } = key;
        exec(
            &self.conn,
            "INSERT OR REPLACE INTO requests (org_id, kind, request_id, created_ms, data)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![org, kind.as_str(), id, millis(self.now), data],
        )
        .map(drop)
    }

    async fn append(&mut self, ev: NewEvent<'_>) -> Result<u64> {
        let org = ev.org;
        let seq: u64 = first_row(
            &self.conn,
            "INSERT INTO org_log (org_id, last_seq) VALUES (?1, 1)
             ON CONFLICT (org_id) DO UPDATE SET last_seq = last_seq + 1
             RETURNING last_seq",
            [org],
            |r| r.get(0),
        )?
        .ok_or_else(|| StoreError::Internal("org_log upsert returned no row".into()))?;
        let ev = CommittedEvent::new(self.db_epoch, seq, self.now, ev)?;
        exec(
            &self.conn,
            "INSERT INTO events (org_id, seq, kind, audience, created_ms, data)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                org,
                seq,
                ev.kind as i32,
                ev.stored_audience(),
                millis(self.now),
                &ev.bytes[..]
            ],
        )?;
        self.events.push(ev);
        Ok(seq)
    }
}
