//! The cluster engine: PostgreSQL, shared by every node of a cluster.
//!
//! The schema is migrated at start (versioned in `schema_version`, applied in one transaction
//! under an advisory lock, so nodes starting together migrate once). One log epoch per database
//! (the `meta` table) makes a cursor valid on every node. Reads and retention run on a connection
//! pool. A lost database answers UNAVAILABLE.
//!
//! Writes go through one writer task per node that group-commits: it takes every write waiting in
//! its queue, runs them in one transaction, commits once, then publishes the committed events on
//! the Bus in seq order. A transaction locks each org's counter row (`org_log`) before its first
//! write to the org and raises it once before COMMIT; the seqs in between are handed out in
//! memory. The row lock orders the commits of all nodes, so commit order is seq order, and a
//! rollback leaves no gap. Round trips are what a write costs here, so a write's independent
//! statements are pipelined, and the batch uses no savepoints: a write that fails before it wrote
//! anything is simply skipped, and one that fails later (or any failed statement) rolls the batch
//! back, after which each of its writes runs again alone in its own transaction.
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::{
    GenericClient, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
};
use futures::future::BoxFuture;
use orgpulse::proto::{EventKind, Job, Notification, event::Payload};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::{NoTls, Row, Statement, types::ToSql};

use super::{
    Committed, CommittedEvent, JobPage, JobPatch, LogBounds, LogRead, NewEntityChange, NewJob,
    NewNotification, NotificationPage, PoolStats, Result, Store, StoreError, apply_patch,
    encode_event, entity_audience, job_deleted, millis,
    model::{self, RequestKind, RetentionSearch, WriterGone, WriterHealth},
    payload_entity_type, remembered_seq, remembered_seq_data,
};
use crate::cursor::org_epoch;

/// Schema versions, applied in order; version N is `MIGRATIONS[N - 1]`. Never edit one that has
/// shipped: add the next. Ids compare bytewise (`COLLATE "C"`), as the page tokens need.
const MIGRATIONS: &[&str] = &["
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE org_log (
  org_id TEXT COLLATE \"C\" PRIMARY KEY,
  last_seq BIGINT NOT NULL,
  floor_seq BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE events (
  org_id TEXT COLLATE \"C\" NOT NULL,
  seq BIGINT NOT NULL,
  kind INTEGER NOT NULL,
  audience TEXT,
  created_ms BIGINT NOT NULL,
  data BYTEA NOT NULL,
  PRIMARY KEY (org_id, seq)
);
CREATE TABLE jobs (
  org_id TEXT COLLATE \"C\" NOT NULL,
  id TEXT COLLATE \"C\" NOT NULL,
  status INTEGER NOT NULL,
  data BYTEA NOT NULL,
  PRIMARY KEY (org_id, id)
);
CREATE TABLE notifications (
  org_id TEXT COLLATE \"C\" NOT NULL,
  id TEXT COLLATE \"C\" NOT NULL,
  user_id TEXT NOT NULL,
  data BYTEA NOT NULL,
  PRIMARY KEY (org_id, id)
);
CREATE TABLE notification_reads (
  org_id TEXT COLLATE \"C\" NOT NULL,
  user_id TEXT NOT NULL,
  notification_id TEXT COLLATE \"C\" NOT NULL,
  PRIMARY KEY (org_id, user_id, notification_id)
);
CREATE TABLE requests (
  org_id TEXT COLLATE \"C\" NOT NULL,
  kind TEXT NOT NULL,
  request_id TEXT NOT NULL,
  created_ms BIGINT NOT NULL,
  data BYTEA NOT NULL,
  PRIMARY KEY (org_id, kind, request_id)
);
CREATE INDEX requests_by_time ON requests (created_ms);
"];

/// The advisory lock key that serializes migrations of one database (any constant; "orgpulse").
const MIGRATION_LOCK: i64 = 0x6f72_6770_756c_7365;
/// Most writes one transaction takes.
const MAX_BATCH: usize = 256;
/// Longest wait for the writers the last transaction answered before the next one starts.
const LINGER: Duration = Duration::from_millis(1);
/// Writes queued before callers wait for the writer.
const QUEUE: usize = 4096;
/// Connections: the writer's, readers', retention's.
const POOL_SIZE: usize = 8;
/// How long a call waits for a connection (or for the database to answer a connect) before it
/// fails with UNAVAILABLE.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the writer may sit idle before it probes that the database still answers.
const PROBE_IDLE: Duration = Duration::from_secs(1);
/// Session limits on every connection of this node, so that a stuck peer costs the others bounded
/// time (docs/design.md "Limits at the door"): a node paused or cut off inside a transaction loses
/// it (and the org counter locks it holds) after 1 s without a statement (this node never waits
/// for anything but its own CPU inside a transaction), and a statement that waits more than 2 s for
/// a lock another session holds fails (UNAVAILABLE, the caller retries) instead of stalling.
const SESSION_LIMITS: &str = "-c lock_timeout=2000 -c idle_in_transaction_session_timeout=1000";
/// Events deleted per retention transaction.
const TRIM_BATCH: u64 = 10_000;

type RunWrite = dyn for<'a> FnMut(&'a mut Tx) -> BoxFuture<'a, bool> + Send;

/// A queued write. `run` may be called more than once (the batch it was in rolled back): each run
/// keeps its own result, `true` when it succeeded; `answer` sends the last one to the caller, or
/// the commit's error. A write dropped unanswered answers UNAVAILABLE.
struct Write {
    run: Box<RunWrite>,
    answer: Box<dyn FnOnce(Result<()>) + Send>,
    /// The job row (org, id) this write reads `FOR UPDATE` first, if any: a batch reads all of
    /// them in one round trip before its writes run (`Tx::prefetch_jobs`).
    job: Option<JobKey>,
}

/// A job row: (org, job id).
type JobKey = (String, String);

pub struct PostgresStore {
    writer: mpsc::Sender<Write>,
    pool: Pool,
    health: Arc<WriterHealth>,
    db_epoch: u64,
}

/// The writer's open transaction: its connection, the org counters it holds, the events appended,
/// and the write statements not sent yet.
pub struct Tx {
    client: Object,
    log: Log,
    /// Write statements queued to go out with the next round trip.
    pending: Vec<Deferred>,
    /// Whether the current write changed (or queued a change of) a row: a later failure of the
    /// write then needs a rollback.
    wrote: bool,
    /// Whether a statement failed (PostgreSQL then refuses the rest of the transaction).
    failed: bool,
    /// Whether the connection's state is unknown (a COMMIT or ROLLBACK failed).
    broken: bool,
    /// Job rows read `FOR UPDATE` for the batch's writes ahead of them (None = no such job),
    /// each taken by the first write that asks; a write that deletes a job forgets it.
    jobs: HashMap<JobKey, Option<Vec<u8>>>,
}

/// A statement parameter owned by a queued statement.
type Param = Box<dyn ToSql + Send + Sync>;

/// Owned statement parameters.
macro_rules! owned {
    ($($p:expr),* $(,)?) => { vec![$(Box::new($p) as Param),*] };
}

/// A write statement queued in a transaction; its outcome is checked when it has been sent.
struct Deferred {
    sql: &'static str,
    params: Vec<Param>,
}

/// The org logs a transaction appends to.
pub struct Log {
    db_epoch: u64,
    now: SystemTime,
    /// Per org locked in this transaction: its counter in the database, and the last seq handed out.
    counters: HashMap<Arc<str>, (u64, u64)>,
    events: Vec<CommittedEvent>,
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
    fn defer(&mut self, sql: &'static str, params: Vec<Param>) {
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
    pub(crate) async fn query(
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
    pub(crate) async fn execute(
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

    /// Locks `org`'s counter row for the rest of the transaction (once per transaction).
    async fn lock_org(&mut self, org: &str) -> Result<()> {
        if self.log.counters.contains_key(org) {
            return Ok(());
        }
        // Inserting the row when it is missing is harmless: an empty log has head 0 either way.
        let last = self.query_opt(LOCK_ORG, &[&org]).await?;
        self.hold_counter(org, last)
    }

    /// Records `org`'s counter row, as `LOCK_ORG` returned it.
    fn hold_counter(&mut self, org: &str, row: Option<Row>) -> Result<()> {
        let last = row
            .map(|r| r.get::<_, i64>(0) as u64)
            .ok_or_else(|| StoreError::Internal("org_log upsert returned no row".into()))?;
        self.log.counters.insert(org.into(), (last, last));
        Ok(())
    }

    /// Reads the job rows of a batch's writes `FOR UPDATE` in one round trip (with BEGIN and the
    /// counters of their orgs, locked first and in org order, as every writer takes them), so
    /// the writes do not each wait for their own read.
    async fn prefetch_jobs(&mut self, keys: Vec<JobKey>) -> Result<()> {
        let mut by_org: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for (org, id) in keys {
            by_org.entry(org).or_default().push(id);
        }
        let by_org: Vec<(String, Vec<String>)> = by_org
            .into_iter()
            .filter(|(org, _)| !self.log.counters.contains_key(org.as_str()))
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

    /// The job's row `FOR UPDATE`: read ahead by the batch, or now.
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

    /// Appends an event to `org`'s log with the org's next seq (queued like any write).
    async fn append(
        &mut self,
        org: &str,
        actor: &str,
        audience: Option<&str>,
        payload: Payload,
    ) -> Result<u64> {
        self.lock_org(org).await?;
        let ev = self.log.next_event(org, actor, audience, payload)?;
        self.defer(
            "INSERT INTO events (org_id, seq, kind, audience, created_ms, data)
             VALUES ($1, $2, $3, $4, $5, $6)",
            owned![
                org.to_string(),
                ev.seq as i64,
                ev.kind as i32,
                audience.map(str::to_string),
                millis(self.log.now),
                ev.bytes.to_vec(),
            ],
        );
        let seq = ev.seq;
        self.log.keep(ev);
        Ok(seq)
    }

    /// Claims `request_id` for a create in this transaction: `Ok(None)` when it is new (or its
    /// last use is past the idempotency window), else the object stored for it. A concurrent
    /// create with the same id on another node waits here until that one commits.
    async fn claim_request(
        &mut self,
        org: &str,
        kind: RequestKind,
        request_id: &str,
    ) -> Result<Option<Vec<u8>>> {
        if !model::is_idempotent(request_id) {
            return Ok(None);
        }
        let (now, since) = (
            millis(self.log.now),
            model::requests_valid_since(self.log.now),
        );
        let claimed = self
            .execute(
                "INSERT INTO requests (org_id, kind, request_id, created_ms, data)
                 VALUES ($1, $2, $3, $4, '') ON CONFLICT (org_id, kind, request_id)
                 DO UPDATE SET created_ms = EXCLUDED.created_ms, data = ''
                 WHERE requests.created_ms < $5",
                &[&org, &kind.as_str(), &request_id, &now, &since],
            )
            .await?;
        if claimed > 0 {
            return Ok(None);
        }
        let row = self
            .query_opt(
                "SELECT data FROM requests WHERE org_id = $1 AND kind = $2 AND request_id = $3",
                &[&org, &kind.as_str(), &request_id],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// The entity changes of [`Store::append_entity_changes`], in this transaction: each change's
    /// seq. Its events are published when the transaction commits, with the others'.
    pub(crate) async fn append_entity_changes(
        &mut self,
        changes: Vec<NewEntityChange>,
    ) -> Result<Vec<u64>> {
        let mut seqs = Vec::with_capacity(changes.len());
        for c in changes {
            if let Some(d) = self
                .claim_request(&c.org, c.request_kind, &c.request_id)
                .await?
            {
                seqs.push(remembered_seq(&d)?);
                continue;
            }
            let audience = entity_audience(&c.change).map(str::to_string);
            let seq = self
                .append(
                    &c.org,
                    &c.actor,
                    audience.as_deref(),
                    Payload::EntityChanged(c.change),
                )
                .await?;
            self.remember(
                &c.org,
                c.request_kind,
                &c.request_id,
                &remembered_seq_data(seq),
            );
            seqs.push(seq);
        }
        Ok(seqs)
    }

    /// Stores the object a claimed `request_id` answers with from now on.
    fn remember(&mut self, org: &str, kind: RequestKind, request_id: &str, data: &[u8]) {
        if model::is_idempotent(request_id) {
            self.defer(
                "UPDATE requests SET data = $4 WHERE org_id = $1 AND kind = $2 AND request_id = $3",
                owned![
                    org.to_string(),
                    kind.as_str(),
                    request_id.to_string(),
                    data.to_vec()
                ],
            );
        }
    }

    /// Sends the queued writes and the raised counters, then COMMIT, in one round trip; the
    /// events are committed when this returns Ok.
    async fn commit(&mut self) -> Result<()> {
        let raised: Vec<(String, i64)> = self
            .log
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
            self.log.reset();
            self.failed = true;
        }
        r.map_err(db)
    }

    /// Ends the transaction without keeping anything.
    async fn rollback(&mut self) -> Result<()> {
        self.jobs.clear();
        self.log.reset();
        self.pending.clear();
        let result = self.client.batch_execute("ROLLBACK").await.map_err(db);
        self.broken |= result.is_err();
        result
    }

    /// Starts a transaction (BEGIN goes out with the first statement that needs an answer).
    fn begin(&mut self) {
        self.jobs.clear();
        self.log.reset();
        self.log.now = SystemTime::now();
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

impl Log {
    /// The next event of `org` (whose counter this transaction holds), not yet kept.
    fn next_event(
        &self,
        org: &str,
        actor: &str,
        audience: Option<&str>,
        payload: Payload,
    ) -> Result<CommittedEvent> {
        let seq = self.counters.get(org).map_or(0, |c| c.1) + 1;
        let kind = model::durable_kind(&payload)?;
        let entity_type = payload_entity_type(&payload);
        let bytes = encode_event(
            org_epoch(self.db_epoch, org),
            org,
            seq,
            actor,
            self.now,
            payload,
        );
        Ok(CommittedEvent {
            org: org.into(),
            seq,
            kind,
            audience: audience.map(Into::into),
            entity_type,
            bytes,
        })
    }

    /// Keeps an event whose row was inserted: its seq is taken.
    fn keep(&mut self, ev: CommittedEvent) {
        if let Some(c) = self.counters.get_mut(&*ev.org) {
            c.1 = ev.seq;
        }
        self.events.push(ev);
    }

    fn reset(&mut self) {
        self.counters.clear();
        self.events.clear();
    }
}

/// Runs a statement prepared once per connection.
async fn exec(c: &impl GenericClient, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
    let st = c.prepare_cached(sql).await.map_err(db)?;
    c.execute(&st, params).await.map_err(db)
}

/// The first row of a query prepared once per connection, `None` when there is none.
async fn first_row(
    c: &impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Option<Row>> {
    let st = c.prepare_cached(sql).await.map_err(db)?;
    c.query_opt(&st, params).await.map_err(db)
}

/// Every row of a query prepared once per connection.
async fn rows(
    c: &impl GenericClient,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>> {
    let st = c.prepare_cached(sql).await.map_err(db)?;
    c.query(&st, params).await.map_err(db)
}

/// A database error: UNAVAILABLE when the database cannot be reached or is going away (the
/// caller may retry), INTERNAL otherwise.
fn db(e: tokio_postgres::Error) -> StoreError {
    let lost_connection = e.is_closed()
        || std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>())
        || e.code().is_some_and(|c| {
            let class = &c.code()[..2];
            // connection exception, insufficient resources, operator intervention (shutdown)
            matches!(class, "08" | "53" | "57")
        });
    // lock_not_available: another session held a lock past SESSION_LIMITS' lock_timeout.
    let lock_timeout = e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE);
    if lost_connection {
        StoreError::Unavailable(format!("database unavailable: {}", explain(&e)))
    } else if lock_timeout {
        StoreError::Unavailable(format!("database busy, retry: {}", explain(&e)))
    } else {
        StoreError::Internal(explain(&e))
    }
}

/// An error with its causes (tokio-postgres keeps the detail, "connection refused" or the
/// server's message, in the source), for one line of log or start-up failure.
fn explain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let part = c.to_string();
        if !text.contains(&part) {
            text = format!("{text}: {part}");
        }
        cause = c.source();
    }
    text
}

/// Why no connection could be had (connecting failed, timed out, or was refused).
fn no_connection(e: PoolError) -> String {
    match e {
        // Not the pool's "error occurred while creating a new object" but the cause.
        PoolError::Backend(e) => explain(&e),
        e => explain(&e),
    }
}

fn pool_error(e: PoolError) -> StoreError {
    StoreError::Unavailable(format!("database unavailable: {}", no_connection(e)))
}

fn dropped_write() -> StoreError {
    StoreError::Unavailable("database unavailable: the write was not attempted".into())
}

fn decode<M: Message + Default>(data: &[u8]) -> Result<M> {
    M::decode(data).map_err(|e| StoreError::Internal(format!("corrupt row: {e}")))
}

/// `host:port/dbname` of a connection config, for messages (never the password).
fn describe(cfg: &tokio_postgres::Config) -> String {
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", cfg.get_dbname().unwrap_or_default())
}

/// Brings the schema to the newest version and returns the database's log epoch.
async fn migrate(client: &mut Object) -> std::result::Result<u64, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    // Nodes starting together wait here for the one that migrates, however long it takes. The
    // NOTICEs of `IF NOT EXISTS` ("relation ... already exists, skipping") are expected on every
    // start but the first, yet would be logged like errors: not sent.
    tx.batch_execute("SET LOCAL lock_timeout = 0; SET LOCAL client_min_messages = warning")
        .await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_version (
           version INTEGER PRIMARY KEY,
           applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .await?;
    let current: i32 = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])
        .await?
        .get(0);
    for (version, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES ($1)",
            &[&(version as i32 + 1)],
        )
        .await?;
    }
    let fresh = (rand::random::<u64>() >> 1).to_string();
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('epoch', $1) ON CONFLICT DO NOTHING",
        &[&fresh],
    )
    .await?;
    let epoch: String = tx
        .query_one("SELECT value FROM meta WHERE key = 'epoch'", &[])
        .await?
        .get(0);
    tx.commit().await?;
    Ok(epoch.parse().unwrap_or_default())
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://...`), migrates its schema and starts the
    /// writer. Fails with one line naming the database when it cannot be reached.
    pub async fn open(url: &str, committed: Committed) -> anyhow::Result<Self> {
        let mut cfg: tokio_postgres::Config = url
            .parse()
            .map_err(|e| anyhow::anyhow!("--database {url:?} is not a PostgreSQL URL: {e}"))?;
        cfg.connect_timeout(CONNECT_TIMEOUT);
        let options = match cfg.get_options() {
            Some(theirs) => format!("{theirs} {SESSION_LIMITS}"),
            None => SESSION_LIMITS.to_string(),
        };
        cfg.options(&options);
        if cfg.get_application_name().is_none() {
            cfg.application_name("orgpulse");
        }
        let name = describe(&cfg);
        let manager = Manager::from_config(
            cfg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()?;
        let mut client = pool.get().await.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the PostgreSQL database {name}: {}",
                no_connection(e)
            )
        })?;
        let db_epoch = migrate(&mut client).await.map_err(|e| {
            anyhow::anyhow!("migrating the PostgreSQL database {name}: {}", explain(&e))
        })?;
        drop(client);
        let (tx, rx) = mpsc::channel(QUEUE);
        let health = Arc::new(WriterHealth::default());
        let gone = WriterGone::new(health.clone());
        tokio::spawn(write_loop(pool.clone(), rx, committed, db_epoch, gone));
        Ok(PostgresStore {
            writer: tx,
            pool,
            health,
            db_epoch,
        })
    }

    /// Runs `f` as one write of the next group commit (possibly more than once, each time in a
    /// fresh transaction: `f` must not consume what it captured). The outbox runs its passes here
    /// when its table is in this database, so a pass and its events commit together.
    pub(crate) async fn write<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: for<'a> Fn(&'a mut Tx) -> BoxFuture<'a, Result<R>> + Send + 'static,
    {
        self.write_reading(None, f).await
    }

    /// `write`, for a write that first reads the row of `job` `FOR UPDATE`: its batch reads
    /// it ahead, together with the other writes' rows.
    async fn write_reading<R, F>(&self, job: Option<JobKey>, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: for<'a> Fn(&'a mut Tx) -> BoxFuture<'a, Result<R>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let result = Arc::new(parking_lot::Mutex::new(None::<Result<R>>));
        let kept = result.clone();
        let write = Write {
            run: Box::new(move |t| {
                let run = f(t);
                let result = result.clone();
                Box::pin(async move {
                    let r = run.await;
                    let ok = r.is_ok();
                    *result.lock() = Some(r);
                    ok
                })
            }),
            answer: Box::new(move |commit| {
                let r = kept.lock().take().unwrap_or_else(|| Err(dropped_write()));
                let _ = tx.send(commit.and(r));
            }),
            job,
        };
        self.writer.send(write).await.map_err(|_| dropped_write())?;
        rx.await.map_err(|_| dropped_write())?
    }

    /// A pooled connection for reads.
    pub(crate) async fn conn(&self) -> Result<Object> {
        self.pool.get().await.map_err(pool_error)
    }

    /// Deletes `org`'s events up to `upto` in bounded transactions, raising its floor with each.
    async fn trim_org(&self, org: &str, mut floor: u64, upto: u64) -> Result<u64> {
        let mut client = self.conn().await?;
        let mut n = 0;
        while floor < upto {
            let to = upto.min(floor + TRIM_BATCH);
            let tx = client.transaction().await.map_err(db)?;
            n += exec(
                &tx,
                "DELETE FROM events WHERE org_id = $1 AND seq > $2 AND seq <= $3",
                &[&org, &(floor as i64), &(to as i64)],
            )
            .await?;
            exec(
                &tx,
                "UPDATE org_log SET floor_seq = GREATEST(floor_seq, $2) WHERE org_id = $1",
                &[&org, &(to as i64)],
            )
            .await?;
            tx.commit().await.map_err(db)?;
            floor = to;
        }
        Ok(n)
    }
}

async fn write_loop(
    pool: Pool,
    mut rx: mpsc::Receiver<Write>,
    committed: Committed,
    db_epoch: u64,
    gone: WriterGone,
) {
    let health = gone.health();
    // Writers in flight when the last transaction ended: the writes it carried (their callers
    // are about to write again) plus those that queued while it ran.
    let mut cohort = 1;
    loop {
        let first = match tokio::time::timeout(PROBE_IDLE, rx.recv()).await {
            Ok(Some(w)) => w,
            Ok(None) => break,
            Err(_) => {
                // Idle: a round trip on a connection (writes nothing) so health notices a
                // database that went away or came back without waiting for a write.
                let probe = match pool.get().await {
                    Ok(c) => c.batch_execute("SELECT 1").await.map_err(db),
                    Err(e) => Err(pool_error(e)),
                };
                health.record(&writable(probe));
                continue;
            }
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        // A COMMIT costs a WAL flush whatever it carries: wait briefly for the whole cohort, or
        // 8 writers split into two alternating batches of 4 (those answered, those that queued
        // meanwhile) and each flush carries half of what it could.
        if batch.len() < cohort {
            let until = tokio::time::Instant::now() + LINGER;
            while batch.len() < cohort {
                match tokio::time::timeout_at(until, rx.recv()).await {
                    Ok(Some(w)) => batch.push(w),
                    _ => break,
                }
            }
        }
        let carried = batch.len();
        let client = match pool.get().await {
            Ok(c) => c,
            Err(e) => {
                // Dropping the batch answers each of its callers UNAVAILABLE.
                let error = no_connection(e);
                tracing::warn!(%error, writes = batch.len(), "no database connection for a write batch");
                health.record(&writable(Err(StoreError::Unavailable(error))));
                continue;
            }
        };
        let mut tx = Tx {
            client,
            log: Log {
                db_epoch,
                now: SystemTime::now(),
                counters: HashMap::new(),
                events: Vec::new(),
            },
            pending: Vec::new(),
            wrote: false,
            failed: false,
            broken: false,
            jobs: HashMap::new(),
        };
        let together = run_together(&mut tx, &mut batch).await;
        // A batch that failed for one write's sake says nothing about the database.
        health.record(&match &together {
            Err(e @ StoreError::Unavailable(_)) => writable(Err(e.clone())),
            _ => Ok(()),
        });
        let results: Vec<(Write, Result<()>)> = match together {
            Ok(()) => {
                publish(&mut tx, &committed);
                batch.into_iter().map(|w| (w, Ok(()))).collect()
            }
            // Rerun alone only when the batch surely rolled back (not when its COMMIT was lost
            // with the connection: then it may have committed), and only for a write's own
            // failure: after a lock timeout each rerun would wait as long again.
            Err(ref e)
                if batch.len() > 1 && !tx.broken && !matches!(e, StoreError::Unavailable(_)) =>
            {
                let mut results = Vec::with_capacity(batch.len());
                for mut w in batch {
                    let r = run_alone(&mut tx, &mut w).await;
                    publish(&mut tx, &committed);
                    results.push((w, r));
                }
                results
            }
            Err(e) => batch.into_iter().map(|w| (w, Err(e.clone()))).collect(),
        };
        if tx.broken || tx.client.is_closed() {
            // Never hand a connection in an unknown state back to the pool.
            drop(Object::take(tx.client));
        }
        cohort = (carried + rx.len()).min(MAX_BATCH);
        for (w, r) in results {
            (w.answer)(r);
        }
    }
}

/// What an outcome says about whether the store can write (the health reason).
fn writable(outcome: Result<()>) -> Result<()> {
    outcome.map_err(|e| StoreError::Unavailable(format!("store cannot write: {e}")))
}

/// Hands the events of the transaction that just committed on, in seq order.
fn publish(tx: &mut Tx, committed: &Committed) {
    for ev in tx.log.events.drain(..) {
        committed(ev);
    }
}

/// Runs the batch in one transaction and commits it. A write that failed before it changed a
/// row is skipped (its caller gets its own error); any other failure rolls the whole batch back
/// and is returned. A lone write's own failure is its answer, not the batch's.
async fn run_together(tx: &mut Tx, batch: &mut [Write]) -> Result<()> {
    tx.begin();
    let jobs: Vec<JobKey> = batch.iter().filter_map(|w| w.job.clone()).collect();
    if jobs.len() > 1 {
        tx.prefetch_jobs(jobs).await?;
    }
    for w in batch.iter_mut() {
        tx.wrote = false;
        let ok = (w.run)(tx).await;
        if !ok && (tx.wrote || tx.failed) {
            tx.rollback().await?;
            return if batch.len() == 1 {
                Ok(())
            } else {
                Err(StoreError::Aborted("a write of the batch failed".into()))
            };
        }
    }
    tx.commit().await
}

/// Runs one write in a transaction of its own; the commit's outcome.
async fn run_alone(tx: &mut Tx, w: &mut Write) -> Result<()> {
    tx.begin();
    tx.wrote = false;
    if (w.run)(tx).await {
        tx.commit().await
    } else {
        tx.rollback().await
    }
}

const UNREAD_COUNT: &str = "SELECT COUNT(*) FROM notifications n
     WHERE n.org_id = $1 AND n.user_id IN ('', $2)
     AND NOT EXISTS (SELECT 1 FROM notification_reads r
                     WHERE r.org_id = $1 AND r.user_id = $2 AND r.notification_id = n.id)";

async fn bounds(c: &impl GenericClient, org: &str) -> Result<LogBounds> {
    Ok(first_row(
        c,
        "SELECT floor_seq, last_seq FROM org_log WHERE org_id = $1",
        &[&org],
    )
    .await?
    .map(|r| LogBounds {
        floor: r.get::<_, i64>(0) as u64,
        head: r.get::<_, i64>(1) as u64,
    })
    .unwrap_or_default())
}

/// A read-only transaction that sees one snapshot for all its statements.
async fn snapshot(client: &mut Object) -> Result<deadpool_postgres::Transaction<'_>> {
    client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(db)
}

#[async_trait]
impl Store for PostgresStore {
    fn org_epoch(&self, org: &str) -> u64 {
        org_epoch(self.db_epoch, org)
    }

    async fn create_job(&self, org: &str, actor: &str, new: NewJob) -> Result<Job> {
        let (org, actor) = (org.to_string(), actor.to_string());
        self.write(move |tx| {
            let (org, actor, new) = (org.clone(), actor.clone(), new.clone());
            Box::pin(async move {
                let request_id = new.request_id.clone();
                if let Some(d) = tx
                    .claim_request(&org, RequestKind::Job, &request_id)
                    .await?
                {
                    return decode(&d);
                }
                let job = model::new_job(&org, &actor, new, tx.log.now);
                let data = job.encode_to_vec();
                tx.remember(&org, RequestKind::Job, &request_id, &data);
                tx.defer(
                    "INSERT INTO jobs (org_id, id, status, data) VALUES ($1, $2, $3, $4)",
                    owned![job.org_id.clone(), job.id.clone(), job.status, data],
                );
                tx.append(&org, &actor, None, Payload::JobCreated(job.clone()))
                    .await?;
                Ok(job)
            })
        })
        .await
    }

    async fn get_job(&self, org: &str, job_id: &str) -> Result<Job> {
        match first_row(
            &self.conn().await?,
            "SELECT data FROM jobs WHERE org_id = $1 AND id = $2",
            &[&org, &job_id],
        )
        .await?
        {
            Some(r) => decode(r.get(0)),
            None => Err(model::job_not_found(job_id)),
        }
    }

    async fn list_jobs(
        &self,
        org: &str,
        statuses: Vec<i32>,
        limit: usize,
        after: Option<String>,
    ) -> Result<JobPage> {
        let mut client = self.conn().await?;
        let tx = snapshot(&mut client).await?;
        let head = bounds(&tx, org).await?.head;
        let rows = rows(
            &tx,
            "SELECT data FROM jobs WHERE org_id = $1 AND id < $2
             AND (cardinality($3::int4[]) = 0 OR status = ANY($3))
             ORDER BY id DESC LIMIT $4",
            &[
                &org,
                &model::page_start(after),
                &statuses,
                &(limit as i64 + 1),
            ],
        )
        .await?;
        tx.commit().await.map_err(db)?;
        let jobs = rows
            .iter()
            .map(|r| decode::<Job>(r.get(0)))
            .collect::<Result<Vec<_>>>()?;
        let (jobs, next) = model::into_page(jobs, limit, |j| &j.id);
        Ok(JobPage { jobs, next, head })
    }

    async fn update_job(&self, org: &str, actor: &str, patch: JobPatch) -> Result<Job> {
        let (org, actor) = (org.to_string(), actor.to_string());
        let row = Some((org.clone(), patch.job_id.clone()));
        self.write_reading(row, move |tx| {
            let (org, actor, patch) = (org.clone(), actor.clone(), patch.clone());
            Box::pin(async move {
                // The counter first, then the job: every writer takes the locks in this order.
                tx.lock_org(&org).await?;
                let mut job: Job = match tx.job_for_update(&org, &patch.job_id).await? {
                    Some(data) => decode(&data)?,
                    None => return Err(model::job_not_found(&patch.job_id)),
                };
                apply_patch(&mut job, &patch, &actor, tx.log.now)?;
                tx.defer(
                    "UPDATE jobs SET status = $3, data = $4 WHERE org_id = $1 AND id = $2",
                    owned![
                        job.org_id.clone(),
                        job.id.clone(),
                        job.status,
                        job.encode_to_vec()
                    ],
                );
                tx.append(&org, &actor, None, Payload::JobUpdated(job.clone()))
                    .await?;
                Ok(job)
            })
        })
        .await
    }

    async fn delete_job(&self, org: &str, actor: &str, job_id: &str) -> Result<()> {
        let (org, actor, id) = (org.to_string(), actor.to_string(), job_id.to_string());
        self.write(move |tx| {
            let (org, actor, id) = (org.clone(), actor.clone(), id.clone());
            Box::pin(async move {
                tx.lock_org(&org).await?;
                tx.jobs.remove(&(org.clone(), id.clone()));
                let n = tx
                    .execute(
                        "DELETE FROM jobs WHERE org_id = $1 AND id = $2",
                        &[&org, &id],
                    )
                    .await?;
                if n == 0 {
                    return Err(model::job_not_found(&id));
                }
                tx.append(&org, &actor, None, job_deleted(&id)).await?;
                Ok(())
            })
        })
        .await
    }

    async fn send_notification(
        &self,
        org: &str,
        actor: &str,
        new: NewNotification,
    ) -> Result<Notification> {
        let (org, actor) = (org.to_string(), actor.to_string());
        self.write(move |tx| {
            let (org, actor, new) = (org.clone(), actor.clone(), new.clone());
            Box::pin(async move {
                let request_id = new.request_id.clone();
                let kind = RequestKind::Notification;
                if let Some(d) = tx.claim_request(&org, kind, &request_id).await? {
                    return decode(&d);
                }
                let n = model::new_notification(&org, &actor, new, tx.log.now);
                let data = n.encode_to_vec();
                tx.remember(&org, kind, &request_id, &data);
                tx.defer(
                    "INSERT INTO notifications (org_id, id, user_id, data) VALUES ($1, $2, $3, $4)",
                    owned![n.org_id.clone(), n.id.clone(), n.user_id.clone(), data],
                );
                tx.append(
                    &org,
                    &actor,
                    model::audience(&n),
                    Payload::NotificationNew(n.clone()),
                )
                .await?;
                Ok(n)
            })
        })
        .await
    }

    async fn append_entity_changes(&self, changes: Vec<NewEntityChange>) -> Result<Vec<u64>> {
        self.write(move |tx| Box::pin(tx.append_entity_changes(changes.clone())))
            .await
    }

    async fn list_notifications(
        &self,
        org: &str,
        user: &str,
        unread_only: bool,
        limit: usize,
        after: Option<String>,
    ) -> Result<NotificationPage> {
        let mut client = self.conn().await?;
        let tx = snapshot(&mut client).await?;
        let unread = first_row(&tx, UNREAD_COUNT, &[&org, &user])
            .await?
            .map_or(0, |r| r.get::<_, i64>(0) as u32);
        let rows = rows(
            &tx,
            "SELECT data, is_read FROM (
               SELECT n.id, n.data, EXISTS (SELECT 1 FROM notification_reads r
                 WHERE r.org_id = n.org_id AND r.user_id = $2 AND r.notification_id = n.id) AS is_read
               FROM notifications n
               WHERE n.org_id = $1 AND n.user_id IN ('', $2) AND n.id < $3) page
             WHERE NOT ($4 AND is_read)
             ORDER BY id DESC LIMIT $5",
            &[
                &org,
                &user,
                &model::page_start(after),
                &unread_only,
                &(limit as i64 + 1),
            ],
        )
        .await?;
        tx.commit().await.map_err(db)?;
        let mut notifications = Vec::with_capacity(rows.len());
        for r in &rows {
            let mut n: Notification = decode(r.get(0))?;
            n.read = r.get(1);
            notifications.push(n);
        }
        let (notifications, next) = model::into_page(notifications, limit, |n| &n.id);
        Ok(NotificationPage {
            notifications,
            next,
            unread,
        })
    }

    async fn mark_read(&self, org: &str, user: &str, ids: Vec<String>) -> Result<u32> {
        let (org, user) = (org.to_string(), user.to_string());
        self.write(move |tx| {
            let (org, user, ids) = (org.clone(), user.clone(), ids.clone());
            Box::pin(async move {
                for id in &ids {
                    let visible = tx
                        .query_opt(
                            "SELECT 1 FROM notifications
                             WHERE org_id = $1 AND id = $2 AND user_id IN ('', $3)",
                            &[&org, id, &user],
                        )
                        .await?
                        .is_some();
                    if !visible {
                        return Err(StoreError::NotFound(format!("notification {id} not found")));
                    }
                    tx.defer(
                        "INSERT INTO notification_reads (org_id, user_id, notification_id)
                         VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                        owned![org.clone(), user.clone(), id.clone()],
                    );
                }
                let unread = tx.query_opt(UNREAD_COUNT, &[&org, &user]).await?;
                Ok(unread.map_or(0, |r| r.get::<_, i64>(0) as u32))
            })
        })
        .await
    }

    async fn bounds(&self, org: &str) -> Result<LogBounds> {
        bounds(&self.conn().await?, org).await
    }

    async fn heads(&self, orgs: &[Arc<str>]) -> Result<Vec<(Arc<str>, u64)>> {
        let names: Vec<&str> = orgs.iter().map(|o| &**o).collect();
        let rows = rows(
            &self.conn().await?,
            "SELECT org_id, last_seq FROM org_log WHERE org_id = ANY($1) AND last_seq > 0",
            &[&names],
        )
        .await?;
        Ok(rows
            .iter()
            .map(|r| (Arc::from(r.get::<_, &str>(0)), r.get::<_, i64>(1) as u64))
            .collect())
    }

    async fn read_after(&self, org: &str, after: u64, limit: usize) -> Result<LogRead> {
        // One statement, so one snapshot: the bounds and the rows agree.
        let rows = rows(
            &self.conn().await?,
            "SELECT l.floor_seq, l.last_seq, e.seq, e.kind, e.audience, e.data
             FROM org_log l LEFT JOIN LATERAL (
               SELECT seq, kind, audience, data FROM events
               WHERE org_id = $1 AND seq > $2 ORDER BY seq LIMIT $3) e ON true
             WHERE l.org_id = $1",
            &[&org, &(after as i64), &(limit as i64)],
        )
        .await?;
        let bounds = rows.first().map_or_else(LogBounds::default, |r| LogBounds {
            floor: r.get::<_, i64>(0) as u64,
            head: r.get::<_, i64>(1) as u64,
        });
        let org: Arc<str> = org.into();
        let events = rows
            .iter()
            .filter_map(|r| {
                Some(CommittedEvent::from_log(
                    org.clone(),
                    r.get::<_, Option<i64>>(2)? as u64,
                    EventKind::try_from(r.get::<_, i32>(3)).unwrap_or(EventKind::Unspecified),
                    r.get::<_, Option<String>>(4).map(Into::into),
                    Bytes::from(r.get::<_, Vec<u8>>(5)),
                ))
            })
            .collect();
        Ok(LogRead::of(after, bounds, events))
    }

    async fn trim(&self, before: SystemTime) -> Result<u64> {
        let cutoff = millis(before);
        let logs = rows(
            &self.conn().await?,
            "SELECT org_id, floor_seq, last_seq FROM org_log WHERE last_seq > floor_seq",
            &[],
        )
        .await?;
        let mut n = 0;
        for r in logs {
            let org: String = r.get(0);
            let b = LogBounds {
                floor: r.get::<_, i64>(1) as u64,
                head: r.get::<_, i64>(2) as u64,
            };
            let mut search = RetentionSearch::new(b, cutoff);
            {
                let client = self.conn().await?;
                while let Some(seq) = search.probe() {
                    let t = first_row(
                        &client,
                        "SELECT created_ms FROM events WHERE org_id = $1 AND seq = $2",
                        &[&org, &(seq as i64)],
                    )
                    .await?;
                    search.observe(t.map(|r| r.get(0)));
                }
            }
            n += self.trim_org(&org, b.floor, search.result()).await?;
        }
        let valid_since = model::requests_valid_since(SystemTime::now());
        let client = self.conn().await?;
        while exec(
            &client,
            "DELETE FROM requests WHERE ctid IN
               (SELECT ctid FROM requests WHERE created_ms < $1 LIMIT 10000)",
            &[&valid_since],
        )
        .await?
            == 10_000
        {}
        Ok(n)
    }

    fn health(&self) -> std::result::Result<(), String> {
        self.health.state()
    }

    fn pool_stats(&self) -> Option<PoolStats> {
        let s = self.pool.status();
        Some(PoolStats {
            max_size: s.max_size,
            size: s.size,
            available: s.available,
            waiting: s.waiting,
        })
    }

    fn postgres(&self) -> Option<&PostgresStore> {
        Some(self)
    }
}
