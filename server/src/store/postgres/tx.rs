//! The PostgreSQL engine's write transaction: the steps of the write operations
//! (`ops::WriteTx`) as statements on the writer's connection. Round trips are what a write costs
//! here, so a write's independent statements are queued (`defer`) and sent together with the
//! next statement that needs an answer, or with COMMIT. A transaction locks each org's counter row
//! (`org_log`) before its first write to the org and raises it once before COMMIT; the seqs in
//! between are handed out in memory.
use std::{collections::HashMap, sync::Arc, time::SystemTime};

use async_trait::async_trait;
use deadpool_postgres::Object;
use orgpulse::proto::{Job, Notification};
use tokio_postgres::{Row, Statement, types::ToSql};

use super::{UNREAD_COUNT, db};
use crate::store::{
    CommittedEvent, Result, StoreError, millis, model,
    ops::{JobKey, NewEvent, RequestKey, WriteTx},
};

/// The writer's open transaction: its connection, the org counters it holds, the events appended,
/// and the write statements not sent yet.
pub(super) struct Tx {
    pub(super) client: Object,
    pub(super) logs: OrgLogs,
    /// Write statements queued to go out with the next round trip.
    pub(super) pending: Vec<Deferred>,
    /// Whether the current write changed (or queued a change of) a row: a later failure of the
    /// write then needs a rollback.
    pub(super) wrote: bool,
    /// Whether a statement failed (PostgreSQL then refuses the rest of the transaction).
    pub(super) failed: bool,
    /// Whether the connection's state is unknown (a COMMIT or ROLLBACK failed).
    pub(super) broken: bool,
    /// Job rows read `FOR UPDATE` for the batch's writes ahead of them (None = no such job),
    /// each taken by the first write that asks; a write that deletes a job forgets it.
    pub(super) jobs: HashMap<JobKey, Option<Vec<u8>>>,
}

/// A statement parameter owned by a queued statement.
type Param = Box<dyn ToSql + Send + Sync>;

/// Owned statement parameters.
macro_rules! owned {
    ($($p:expr),* $(,)?) => { vec![$(Box::new($p) as Param),*] };
}

/// A write statement queued in a transaction; its outcome is checked when it has been sent.
pub(super) struct Deferred {
    sql: &'static str,
    params: Vec<Param>,
}

/// The org logs a transaction appends to.
pub(super) struct OrgLogs {
    pub(super) db_epoch: u64,
    pub(super) now: SystemTime,
    /// Per org locked in this transaction: its counter in the database, and the last seq handed out.
    pub(super) counters: HashMap<Arc<str>, (u64, u64)>,
    pub(super) events: Vec<CommittedEvent>,
}

const RAISE_COUNTER: &str = "UPDATE org_log SET last_seq = $2 WHERE org_id = $1";
/// Locks an org's counter row (creating it when missing: an empty log has head 0 either way).
const LOCK_ORG: &str = "INSERT INTO org_log (org_id, last_seq) VALUES ($1, 0)
     ON CONFLICT (org_id) DO UPDATE SET last_seq = org_log.last_seq
     RETURNING last_seq";
/// A batch's job rows of one org, locked.
const PREFETCH_JOBS: &str =
    "SELECT id, data FROM jobs WHERE org_id = $1 AND id = ANY($2) ORDER BY id FOR UPDATE";

impl Tx {
    /// Queues a write: it goes out ahead of the next statement that needs an answer (a read, a
    /// write whose count matters, or COMMIT), in the same round trip.
    pub(super) fn defer(&mut self, sql: &'static str, params: Vec<Param>) {
        self.pending.push(Deferred { sql, params });
        self.wrote = true;
    }

    /// The queued writes, each with its statement (prepared once per connection).
    async fn take_pending(&mut self) -> Result<Vec<(Statement, Deferred)>> {
        let pending = std::mem::take(&mut self.pending);
        let mut out = Vec::with_capacity(pending.len());
        for d in pending {
            let st = self.client.prepare_cached(d.sql).await;
            out.push((self.outcome(st)?, d));
        }
        Ok(out)
    }

    /// What a statement's outcome means for the batch.
    fn outcome<T>(&mut self, r: std::result::Result<T, tokio_postgres::Error>) -> Result<T> {
        self.failed |= r.is_err();
        r.map_err(db)
    }

    /// The rows of `sql`, sent right after the queued writes (one round trip for all).
    pub(super) async fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        let writes = self.take_pending().await?;
        let st = self.client.prepare_cached(sql).await;
        let st = self.outcome(st)?;
        let r = after(&self.client, &writes, self.client.query(&st, params)).await;
        self.outcome(r)
    }

    async fn query_opt(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>> {
        Ok(self.query(sql, params).await?.into_iter().next())
    }

    /// A write whose count of changed rows the write needs now, sent right after the queued ones.
    pub(super) async fn execute(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64> {
        let writes = self.take_pending().await?;
        let st = self.client.prepare_cached(sql).await;
        let st = self.outcome(st)?;
        let r = after(&self.client, &writes, self.client.execute(&st, params)).await;
        let n = self.outcome(r)?;
        self.wrote |= n > 0;
        Ok(n)
    }

    /// Records `org`'s counter row, as `LOCK_ORG` returned it.
    fn hold_counter(&mut self, org: &str, row: Option<Row>) -> Result<()> {
        let last = row
            .map(|r| r.get::<_, i64>(0) as u64)
            .ok_or_else(|| StoreError::Internal("org_log upsert returned no row".into()))?;
        self.logs.counters.insert(org.into(), (last, last));
        Ok(())
    }

    /// Reads the job rows of a batch's writes `FOR UPDATE` in one round trip (with BEGIN and the
    /// counters of their orgs, locked first and in org order, as every writer takes them), so
    /// the writes do not each wait for their own read.
    pub(super) async fn prefetch_jobs(&mut self, keys: Vec<JobKey>) -> Result<()> {
        let mut by_org: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for (org, id) in keys {
            by_org.entry(org).or_default().push(id);
        }
        let by_org: Vec<(String, Vec<String>)> = by_org
            .into_iter()
            .filter(|(org, _)| !self.logs.counters.contains_key(org.as_str()))
            .collect();
        let writes = self.take_pending().await?;
        let lock = self.client.prepare_cached(LOCK_ORG).await;
        let lock = self.outcome(lock)?;
        let read = self.client.prepare_cached(PREFETCH_JOBS).await;
        let read = self.outcome(read)?;
        let client = &self.client;
        let reads = futures::future::join_all(by_org.iter().map(|(org, ids)| {
            let (lock, read) = (&lock, &read);
            async move {
                let lock_params: [&(dyn ToSql + Sync); 1] = [org];
                let read_params: [&(dyn ToSql + Sync); 2] = [org, ids];
                futures::join!(
                    client.query_opt(lock, &lock_params),
                    client.query(read, &read_params)
                )
            }
        }));
        let (sent, reads) = futures::join!(send(client, &writes), reads);
        let sent = self.outcome(sent);
        sent?;
        for ((org, ids), (counter, rows)) in by_org.into_iter().zip(reads) {
            let counter = self.outcome(counter)?;
            let rows = self.outcome(rows)?;
            self.hold_counter(&org, counter)?;
            for id in ids {
                self.jobs.insert((org.clone(), id), None);
            }
            for r in rows {
                self.jobs.insert((org.clone(), r.get(0)), Some(r.get(1)));
            }
        }
        Ok(())
    }

    /// Sends the queued writes and the raised counters, then COMMIT, in one round trip; the
    /// events are committed when this returns Ok.
    pub(super) async fn commit(&mut self) -> Result<()> {
        let raised: Vec<(String, i64)> = self
            .logs
            .counters
            .iter()
            .filter(|(_, (db, last))| last > db)
            .map(|(org, (_, last))| (org.to_string(), *last as i64))
            .collect();
        for (org, last) in raised {
            self.defer(RAISE_COUNTER, owned![org, last]);
        }
        let writes = self.take_pending().await?;
        let (sent, committed) = futures::join!(
            send(&self.client, &writes),
            self.client.batch_execute("COMMIT")
        );
        // A failed write turns COMMIT into a rollback, which PostgreSQL does not report as an
        // error; a failed COMMIT leaves the outcome unknown.
        self.broken = committed.is_err();
        let r = sent.and(committed);
        if r.is_ok() {
            crate::metrics::METRICS.store_commits.inc();
        } else {
            self.logs.reset();
            self.failed = true;
        }
        r.map_err(db)
    }

    /// Ends the transaction without keeping anything.
    pub(super) async fn rollback(&mut self) -> Result<()> {
        self.jobs.clear();
        self.logs.reset();
        self.pending.clear();
        let result = self.client.batch_execute("ROLLBACK").await.map_err(db);
        self.broken |= result.is_err();
        result
    }

    /// Starts a transaction (BEGIN goes out with the first statement that needs an answer).
    pub(super) fn begin(&mut self) {
        self.jobs.clear();
        self.logs.reset();
        self.logs.now = SystemTime::now();
        self.failed = false;
        self.pending.clear();
        self.pending.push(Deferred {
            sql: "BEGIN",
            params: Vec::new(),
        });
    }
}

/// Sends `writes`, each when first polled (tokio-postgres sends a statement then), in order.
fn send<'a>(
    client: &'a Object,
    writes: &'a [(Statement, Deferred)],
) -> impl std::future::Future<Output = std::result::Result<(), tokio_postgres::Error>> + 'a {
    let sent = futures::future::join_all(writes.iter().map(|(st, d)| {
        client.execute_raw(st, d.params.iter().map(|p| &**p as &(dyn ToSql + Sync)))
    }));
    async move { sent.await.into_iter().try_for_each(|r| r.map(drop)) }
}

/// Sends `writes` and then `last` in one round trip; `last`'s outcome, or a failed write's.
async fn after<T>(
    client: &Object,
    writes: &[(Statement, Deferred)],
    last: impl std::future::Future<Output = std::result::Result<T, tokio_postgres::Error>>,
) -> std::result::Result<T, tokio_postgres::Error> {
    let (sent, last) = futures::join!(send(client, writes), last);
    sent.and(last)
}

impl OrgLogs {
    /// The next event of `org` (whose counter this transaction holds), not yet kept.
    fn next_event(&self, ev: NewEvent<'_>) -> Result<CommittedEvent> {
        let seq = self.counters.get(ev.org).map_or(0, |c| c.1) + 1;
        CommittedEvent::new(self.db_epoch, seq, self.now, ev)
    }

    /// Keeps an event whose row was inserted: its seq is taken.
    fn keep(&mut self, ev: CommittedEvent) {
        if let Some(c) = self.counters.get_mut(&*ev.org) {
            c.1 = ev.seq;
        }
        self.events.push(ev);
    }

    pub(super) fn reset(&mut self) {
        self.counters.clear();
        self.events.clear();
    }
}

#[async_trait]
impl WriteTx for Tx {
    fn now(&self) -> SystemTime {
        self.logs.now
    }

    /// Locks `org`'s counter row for the rest of the transaction (once per transaction).
    async fn lock_org(&mut self, org: &str) -> Result<()> {
        if self.logs.counters.contains_key(org) {
            return Ok(());
        }
        // Inserting the row when it is missing is harmless: an empty log has head 0 either way.
        let last = self.query_opt(LOCK_ORG, &[&org]).await?;
        self.hold_counter(org, last)
    }

    /// The job's row `FOR UPDATE`: read ahead by the batch (taken by the first write that asks),
    /// or now.
    async fn job_for_update(&mut self, org: &str, id: &str) -> Result<Option<Vec<u8>>> {
        if let Some(data) = self.jobs.remove(&(org.to_string(), id.to_string())) {
            return Ok(data);
        }
        let row = self
            .query_opt(
                "SELECT data FROM jobs WHERE org_id = $1 AND id = $2 FOR UPDATE",
                &[&org, &id],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn insert_job(&mut self, job: &Job, data: Vec<u8>) -> Result<()> {
        self.defer(
            "INSERT INTO jobs (org_id, id, status, data) VALUES ($1, $2, $3, $4)",
            owned![job.org_id.clone(), job.id.clone(), job.status, data],
        );
        Ok(())
    }

    async fn update_job(&mut self, job: &Job, data: Vec<u8>) -> Result<()> {
        self.defer(
            "UPDATE jobs SET status = $3, data = $4 WHERE org_id = $1 AND id = $2",
            owned![job.org_id.clone(), job.id.clone(), job.status, data],
        );
        Ok(())
    }

    async fn delete_job(&mut self, org: &str, id: &str) -> Result<bool> {
        // A row read ahead for a later write of the batch is gone with it.
        self.jobs.remove(&(org.to_string(), id.to_string()));
        let n = self
            .execute(
                "DELETE FROM jobs WHERE org_id = $1 AND id = $2",
                &[&org, &id],
            )
            .await?;
        Ok(n > 0)
    }

    async fn insert_notification(&mut self, n: &Notification, data: Vec<u8>) -> Result<()> {
        self.defer(
            "INSERT INTO notifications (org_id, id, user_id, data) VALUES ($1, $2, $3, $4)",
            owned![n.org_id.clone(), n.id.clone(), n.user_id.clone(), data],
        );
        Ok(())
    }

    async fn notification_visible(&mut self, org: &str, id: &str, user: &str) -> Result<bool> {
        let row = self
            .query_opt(
                "SELECT 1 FROM notifications
                 WHERE org_id = $1 AND id = $2 AND user_id IN ('', $3)",
                &[&org, &id, &user],
            )
            .await?;
        Ok(row.is_some())
    }

    async fn mark_read(&mut self, org: &str, user: &str, id: &str) -> Result<()> {
        self.defer(
            "INSERT INTO notification_reads (org_id, user_id, notification_id)
             VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            owned![org.to_string(), user.to_string(), id.to_string()],
        );
        Ok(())
    }

    async fn unread_count(&mut self, org: &str, user: &str) -> Result<u32> {
        let unread = self.query_opt(UNREAD_COUNT, &[&org, &user]).await?;
        Ok(unread.map_or(0, |r| r.get::<_, i64>(0) as u32))
    }

    /// Claims the id with a row of its own: a concurrent create with the same id on another node
    /// waits here until that one commits.
    async fn claim_request(&mut self, key: RequestKey<'_>) -> Result<Option<Vec<u8>>> {
        let RequestKey { org, kind, id } = key;
        let (now, since) = (
            millis(self.logs.now),
            model::requests_valid_since(self.logs.now),
        );
        let claimed = self
            .execute(
                "INSERT INTO requests (org_id, kind, request_id, created_ms, data)
                 VALUES ($1, $2, $3, $4, '') ON CONFLICT (org_id, kind, request_id)
                 DO UPDATE SET created_ms = EXCLUDED.created_ms, data = ''
                 WHERE requests.created_ms < $5",
                &[&org, &kind.as_str(), &id, &now, &since],
            )
            .await?;
        if claimed > 0 {
            return Ok(None);
        }
        let row = self
            .query_opt(
                "SELECT data FROM requests WHERE org_id = $1 AND kind = $2 AND request_id = $3",
                &[&org, &kind.as_str(), &id],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    async fn remember(&mut self, key: RequestKey<'_>, data: Vec<u8>) -> Result<()> {
        let RequestKey { org, kind, id } = key;
        self.defer(
            "UPDATE requests SET data = $4 WHERE org_id = $1 AND kind = $2 AND request_id = $3",
            owned![org.to_string(), kind.as_str(), id.to_string(), data],
        );
        Ok(())
    }

    /// Appends with the org's next seq (queued like any write).
    async fn append(&mut self, ev: NewEvent<'_>) -> Result<u64> {
        self.lock_org(ev.org).await?;
        let ev = self.logs.next_event(ev)?;
        self.defer(
            "INSERT INTO events (org_id, seq, kind, audience, created_ms, data)
             VALUES ($1, $2, $3, $4, $5, $6)",
            owned![
                ev.org.to_string(),
                ev.seq as i64,
                ev.kind as i32,
                ev.stored_audience(),
                millis(self.logs.now),
                ev.bytes.to_vec(),
            ],
        );
        let seq = ev.seq;
        self.logs.keep(ev);
        Ok(seq)
    }
}
