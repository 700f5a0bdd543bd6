//! The embedded engine: one SQLite file in WAL mode.
//!
//! All writes go through one writer thread that group-commits: it takes every write waiting in its
//! bounded queue, runs each inside its own SAVEPOINT of one transaction (a failing write rolls back
//! alone), commits once, then hands the committed events on in seq order (`Committed`) and answers
//! the callers. A batch whose transaction cannot begin or commit applies and publishes nothing. The
//! writer's last transaction outcome (refreshed by a lock-only probe when idle) is the store's
//! health. Reads run on at most READERS blocking threads, each with its own read connection (WAL
//! readers never block the writer); more wait in a queue holding neither a thread nor a
//! connection.
use std::{
    path::Path,
    sync::{
        Arc,
        mpsc::{self, RecvTimeoutError, TrySendError},
    },
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use bytes::Bytes;
use orgpulse::proto::{EventKind, Job, Notification, event::Payload};
use parking_lot::Mutex;
use prost::Message;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use super::{
    Committed, CommittedEvent, JobPage, JobPatch, LogBounds, LogRead, NewEntityChange, NewJob,
    NewNotification, NotificationPage, Result, Store, StoreError, apply_patch, encode_event,
    entity_audience, job_deleted, millis,
    model::{
        self, RequestKind, RetentionSearch, WriterGone, WriterHealth, durable_kind, writer_stopped,
    },
    payload_entity_type, remembered_seq, remembered_seq_data,
};
use crate::cursor::org_epoch;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS org_log (
  org_id TEXT PRIMARY KEY,
  last_seq INTEGER NOT NULL,
  floor_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
  org_id TEXT NOT NULL,
  seq INTEGER NOT NULL,
  kind INTEGER NOT NULL,
  audience TEXT,
  created_ms INTEGER NOT NULL,
  data BLOB NOT NULL,
  PRIMARY KEY (org_id, seq)
) WITHOUT ROWID;
DROP INDEX IF EXISTS events_by_time;
CREATE TABLE IF NOT EXISTS jobs (
  org_id TEXT NOT NULL,
  id TEXT NOT NULL,
  status INTEGER NOT NULL,
  data BLOB NOT NULL,
  PRIMARY KEY (org_id, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS notifications (
  org_id TEXT NOT NULL,
  id TEXT NOT NULL,
  user_id TEXT NOT NULL,
  data BLOB NOT NULL,
  PRIMARY KEY (org_id, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS notification_reads (
  org_id TEXT NOT NULL,
  user_id TEXT NOT NULL,
  notification_id TEXT NOT NULL,
  PRIMARY KEY (org_id, user_id, notification_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS requests (
  org_id TEXT NOT NULL,
  kind TEXT NOT NULL,
  request_id TEXT NOT NULL,
  created_ms INTEGER NOT NULL,
  data BLOB NOT NULL,
  PRIMARY KEY (org_id, kind, request_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS requests_by_time ON requests (created_ms);
";

/// Called once the batch a write was part of has committed (or failed to).
type Finish = Box<dyn FnOnce(Result<()>) + Send>;
/// A write: given the open transaction, runs inside its own savepoint and says `true` when it
/// succeeded and should be kept; given `None` (the transaction could not be had) it runs nothing.
type WriteOp = Box<dyn FnOnce(Option<(&Connection, &mut Appender)>) -> (bool, Finish) + Send>;

/// Most writes one transaction takes.
const MAX_BATCH: usize = 512;
/// Most writes waiting for the writer; beyond that a write is refused (UNAVAILABLE) rather than
/// held in memory: 16 full group commits, a few hundred milliseconds of work.
const WRITE_QUEUE: usize = 16 * MAX_BATCH;
/// How long the writer may sit idle before it probes that it can still take the write lock.
const PROBE_IDLE: Duration = Duration::from_secs(1);
/// Log rows (or idempotency keys) one retention write deletes: trimming is many short writes.
const TRIM_BATCH: u64 = 1000;
/// Reads that run at once, and read connections (opened on demand, then kept for the next read).
const READERS: usize = 4;

/// A read: given a connection (or why none could be opened), runs and answers its caller.
type ReadOp = Box<dyn FnOnce(Result<&Connection>) + Send>;

pub struct SqliteStore {
    writer: mpsc::SyncSender<WriteOp>,
    readers: Arc<Readers>,
    health: Arc<WriterHealth>,
    db_epoch: u64,
}

struct Readers {
    path: std::path::PathBuf,
    busy_timeout: Duration,
    /// Reads waiting for a reader, and how many readers (blocking tasks) are running.
    queue: Mutex<(std::collections::VecDeque<ReadOp>, usize)>,
    idle: Mutex<Vec<Connection>>,
}

/// Appends events to org logs inside the current write, collecting them for publication.
pub struct Appender {
    db_epoch: u64,
    now: SystemTime,
    events: Vec<CommittedEvent>,
}

impl Appender {
    fn append(
        &mut self,
        conn: &Connection,
        org: &str,
        actor: &str,
        audience: Option<&str>,
        payload: Payload,
    ) -> Result<u64> {
        let kind = durable_kind(&payload)?;
        let seq: u64 = first_row(
            conn,
            "INSERT INTO org_log (org_id, last_seq) VALUES (?1, 1)
             ON CONFLICT (org_id) DO UPDATE SET last_seq = last_seq + 1
             RETURNING last_seq",
            [org],
            |r| r.get(0),
        )?
        .ok_or_else(|| StoreError::Internal("org_log upsert returned no row".into()))?;
        let entity_type = payload_entity_type(&payload);
        let bytes = encode_event(
            org_epoch(self.db_epoch, org),
            org,
            seq,
            actor,
            self.now,
            payload,
        );
        exec(
            conn,
            "INSERT INTO events (org_id, seq, kind, audience, created_ms, data)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                org,
                seq,
                kind as i32,
                audience,
                millis(self.now),
                &bytes[..]
            ],
        )?;
        self.events.push(CommittedEvent {
            org: org.into(),
            seq,
            kind,
            audience: audience.map(Into::into),
            entity_type,
            bytes,
        });
        Ok(seq)
    }
}

/// Runs a statement through the connection's statement cache: parsed once per connection, not on
/// every write.
fn exec(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> Result<usize> {
    conn.prepare_cached(sql)
        .and_then(|mut st| st.execute(params))
        .map_err(db)
}

/// The first row of a cached query, `None` when there is none.
fn first_row<T>(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    f: impl FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Result<Option<T>> {
    conn.prepare_cached(sql)
        .and_then(|mut st| st.query_row(params, f).optional())
        .map_err(db)
}

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Internal(e.to_string())
}

/// Runs a transaction-control statement (BEGIN, SAVEPOINT, COMMIT, ...); its failure means the
/// store cannot write at the moment.
fn control(conn: &Connection, sql: &str) -> Result<()> {
    conn.prepare_cached(sql)
        .and_then(|mut st| st.execute([]))
        .map(drop)
        .map_err(|e| StoreError::Unavailable(format!("store cannot write: {e}")))
}

fn decode<M: Message + Default>(data: &[u8]) -> Result<M> {
    M::decode(data).map_err(|e| StoreError::Internal(format!("corrupt row: {e}")))
}

fn open(path: &Path, busy_timeout: Duration) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(busy_timeout)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = OFF;",
    )?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating when missing) the database at `path` and starts its writer thread. A write
    /// waits up to `busy_timeout` for a lock another process holds.
    pub fn open(path: &Path, committed: Committed, busy_timeout: Duration) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
        }
        let conn = open(path, busy_timeout)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
        conn.execute_batch(SCHEMA)?;
        let fresh: u64 = rand::random::<u64>() >> 1;
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?1)",
            [fresh.to_string()],
        )?;
        let db_epoch: u64 = conn
            .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
                r.get::<_, String>(0)
            })?
            .parse()?;
        let (tx, rx) = mpsc::sync_channel(WRITE_QUEUE);
        let health = Arc::new(WriterHealth::default());
        let gone = WriterGone::new(health.clone());
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || write_loop(conn, rx, committed, db_epoch, gone))?;
        Ok(SqliteStore {
            writer: tx,
            readers: Arc::new(Readers {
                path: path.to_path_buf(),
                busy_timeout,
                queue: Mutex::default(),
                idle: Mutex::new(Vec::new()),
            }),
            health,
            db_epoch,
        })
    }

    /// Runs `f` as one write of the next group commit.
    async fn write<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection, &mut Appender) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let (tx, rx) = oneshot::channel();
        let op: WriteOp = Box::new(move |txn| {
            let r = txn.map(|(conn, app)| f(conn, app));
            let ok = matches!(r, Some(Ok(_)));
            let finish: Finish = Box::new(move |commit| {
                // `r` is `None` only when the transaction failed, so `commit` is that failure.
                let _ = tx.send(commit.and_then(|()| r.unwrap_or_else(|| Err(writer_stopped()))));
            });
            (ok, finish)
        });
        self.writer.try_send(op).map_err(|e| match e {
            TrySendError::Full(_) => {
                StoreError::Unavailable("store write queue is full; retry shortly".into())
            }
            TrySendError::Disconnected(_) => writer_stopped(),
        })?;
        rx.await.map_err(|_| writer_stopped())?
    }

    /// Runs `f` on a read connection, off the async threads: by a running reader, or by a new
    /// one when fewer than READERS run.
    async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let (tx, rx) = oneshot::channel();
        let op: ReadOp = Box::new(move |conn| {
            // A caller that went away (a client gone) needs no answer.
            if !tx.is_closed() {
                let _ = tx.send(conn.and_then(f));
            }
        });
        let start_reader = {
            let mut queue = self.readers.queue.lock();
            queue.0.push_back(op);
            let start = queue.1 < READERS;
            queue.1 += usize::from(start);
            start
        };
        if start_reader {
            let readers = self.readers.clone();
            tokio::task::spawn_blocking(move || readers.run());
        }
        rx.await
            .map_err(|_| StoreError::Internal("a read was dropped".into()))?
    }
}

impl Readers {
    /// A reader: runs queued reads on one connection until the queue is empty (a burst of reads
    /// stays on the same few threads and connections), then ends.
    fn run(&self) {
        let mut conn = self.idle.lock().pop();
        loop {
            let op = {
                let mut queue = self.queue.lock();
                match queue.0.pop_front() {
                    Some(op) => op,
                    None => {
                        queue.1 -= 1;
                        break;
                    }
                }
            };
            if conn.is_none() {
                conn = open(&self.path, self.busy_timeout)
                    .map_err(
                        |e| tracing::warn!(error = %e, "sqlite: cannot open a read connection"),
                    )
                    .ok();
            }
            let conn = conn.as_ref().ok_or_else(|| {
                StoreError::Unavailable("cannot open a read connection to the database".into())
            });
            // A read that panics fails alone (its caller gets an error); the reader goes on.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| op(conn)));
        }
        // Kept for the next reader: SQLite's unix VFS defers closing a connection's descriptors
        // while another connection of the process holds a lock on the file (main kept ~340 after
        // 5,000 Polls).
        if let Some(c) = conn {
            self.idle.lock().push(c);
        }
    }
}

fn write_loop(
    conn: Connection,
    rx: mpsc::Receiver<WriteOp>,
    committed: Committed,
    db_epoch: u64,
    gone: WriterGone,
) {
    let health = gone.health();
    // Whether the last COMMIT carried more than one write: writers are concurrent.
    let mut concurrent = false;
    loop {
        let first = match rx.recv_timeout(PROBE_IDLE) {
            Ok(op) => op,
            Err(RecvTimeoutError::Timeout) => {
                // Idle: take and release the write lock (writes nothing) so health notices a
                // store that stopped or started being writable without waiting for a write.
                let probe = control(&conn, "BEGIN IMMEDIATE");
                if probe.is_ok() {
                    let _ = control(&conn, "ROLLBACK");
                }
                health.record(&probe);
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        // Let the threads that are about to queue writes do so first (when nothing else is
        // runnable this returns at once): on a busy core, waking for every single write would
        // otherwise make each COMMIT carry just one. A lone sequential writer has nobody to wait
        // for; yielding would only hand the core to the fan-out and delay its next write.
        if concurrent {
            std::thread::yield_now();
        }
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let mut app = Appender {
            db_epoch,
            now: SystemTime::now(),
            events: Vec::new(),
        };
        concurrent = batch.len() > 1;
        let mut finishes = Vec::with_capacity(batch.len());
        let mut result = control(&conn, "BEGIN IMMEDIATE");
        for op in batch {
            result = result.and_then(|()| control(&conn, "SAVEPOINT w"));
            if result.is_err() {
                // Never outside the transaction: the write does not run, its caller gets the
                // failure.
                finishes.push(op(None).1);
                continue;
            }
            let kept = app.events.len();
            let (ok, finish) = op(Some((&conn, &mut app)));
            finishes.push(finish);
            if ok {
                result = control(&conn, "RELEASE w");
            } else {
                app.events.truncate(kept);
                result = control(&conn, "ROLLBACK TO w").and_then(|()| control(&conn, "RELEASE w"));
            }
        }
        result = result.and_then(|()| control(&conn, "COMMIT"));
        if result.is_ok() {
            crate::metrics::METRICS.store_commits.inc();
        } else {
            // Nothing of the batch stays applied (a failed COMMIT may leave the transaction
            // open) and nothing is published.
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            app.events.clear();
        }
        health.record(&result);
        for ev in app.events {
            committed(ev);
        }
        for finish in finishes {
            finish(result.clone());
        }
    }
}

/// Returns the object stored for `request_id`, when it was used within the idempotency window.
fn remembered(
    conn: &Connection,
    org: &str,
    kind: RequestKind,
    request_id: &str,
) -> Result<Option<Vec<u8>>> {
    if !model::is_idempotent(request_id) {
        return Ok(None);
    }
    first_row(
        conn,
        "SELECT data FROM requests WHERE org_id = ?1 AND kind = ?2 AND request_id = ?3 AND created_ms >= ?4",
        params![
            org,
            kind.as_str(),
            request_id,
            model::requests_valid_since(SystemTime::now())
        ],
        |r| r.get(0),
    )
}

fn remember(
    conn: &Connection,
    org: &str,
    kind: RequestKind,
    request_id: &str,
    data: &[u8],
) -> Result<()> {
    if !model::is_idempotent(request_id) {
        return Ok(());
    }
    exec(
        conn,
        "INSERT OR REPLACE INTO requests (org_id, kind, request_id, created_ms, data) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            org,
            kind.as_str(),
            request_id,
            millis(SystemTime::now()),
            data
        ],
    )?;
    Ok(())
}

fn load_job(conn: &Connection, org: &str, id: &str) -> Result<Job> {
    let data: Option<Vec<u8>> = first_row(
        conn,
        "SELECT data FROM jobs WHERE org_id = ?1 AND id = ?2",
        [org, id],
        |r| r.get(0),
    )?;
    match data {
        Some(d) => decode(&d),
        None => Err(model::job_not_found(id)),
    }
}

fn save_job(conn: &Connection, job: &Job) -> Result<()> {
    exec(
        conn,
        "INSERT OR REPLACE INTO jobs (org_id, id, status, data) VALUES (?1, ?2, ?3, ?4)",
        params![job.org_id, job.id, job.status, job.encode_to_vec()],
    )?;
    Ok(())
}

fn unread_count(conn: &Connection, org: &str, user: &str) -> Result<u32> {
    conn.query_row(
        "SELECT COUNT(*) FROM notifications n WHERE n.org_id = ?1 AND n.user_id IN ('', ?2)
         AND NOT EXISTS (SELECT 1 FROM notification_reads r
                         WHERE r.org_id = ?1 AND r.user_id = ?2 AND r.notification_id = n.id)",
        [org, user],
        |r| r.get(0),
    )
    .map_err(db)
}

fn bounds(conn: &Connection, org: &str) -> Result<LogBounds> {
    conn.prepare_cached("SELECT floor_seq, last_seq FROM org_log WHERE org_id = ?1")
        .and_then(|mut st| {
            st.query_row([org], |r| {
                Ok(LogBounds {
                    floor: r.get(0)?,
                    head: r.get(1)?,
                })
            })
            .optional()
        })
        .map(Option::unwrap_or_default)
        .map_err(db)
}

#[async_trait]
impl Store for SqliteStore {
    fn org_epoch(&self, org: &str) -> u64 {
        org_epoch(self.db_epoch, org)
    }

    async fn create_job(&self, org: &str, actor: &str, new: NewJob) -> Result<Job> {
        let (org, actor) = (org.to_string(), actor.to_string());
        self.write(move |conn, app| {
            let request_id = new.request_id.clone();
            if let Some(d) = remembered(conn, &org, RequestKind::Job, &request_id)? {
                return decode(&d);
            }
            let job = model::new_job(&org, &actor, new, app.now);
            save_job(conn, &job)?;
            remember(
                conn,
                &org,
                RequestKind::Job,
                &request_id,
                &job.encode_to_vec(),
            )?;
            app.append(conn, &org, &actor, None, Payload::JobCreated(job.clone()))?;
            Ok(job)
        })
        .await
    }

    async fn get_job(&self, org: &str, job_id: &str) -> Result<Job> {
        let (org, id) = (org.to_string(), job_id.to_string());
        self.read(move |conn| load_job(conn, &org, &id)).await
    }

    async fn list_jobs(
        &self,
        org: &str,
        statuses: Vec<i32>,
        limit: usize,
        after: Option<String>,
    ) -> Result<JobPage> {
        let org = org.to_string();
        self.read(move |conn| {
            let tx = conn.unchecked_transaction().map_err(db)?;
            let head = bounds(&tx, &org)?.head;
            let filter = if statuses.is_empty() {
                String::new()
            } else {
                let list: Vec<String> = statuses.iter().map(|s| s.to_string()).collect();
                format!("AND status IN ({})", list.join(","))
            };
            let sql = format!(
                "SELECT data FROM jobs WHERE org_id = ?1 AND id < ?2 {filter} ORDER BY id DESC LIMIT ?3"
            );
            let mut st = tx.prepare_cached(&sql).map_err(db)?;
            let rows = st
                .query_map(
                    params![org, model::page_start(after), limit as i64 + 1],
                    |r| r.get::<_, Vec<u8>>(0),
                )
                .map_err(db)?;
            let mut jobs = Vec::with_capacity(limit + 1);
            for row in rows {
                jobs.push(decode::<Job>(&row.map_err(db)?)?);
            }
            let (jobs, next) = model::into_page(jobs, limit, |j| &j.id);
            Ok(JobPage { jobs, next, head })
        })
        .await
    }

    async fn update_job(&self, org: &str, actor: &str, patch: JobPatch) -> Result<Job> {
        let (org, actor) = (org.to_string(), actor.to_string());
        self.write(move |conn, app| {
            let mut job = load_job(conn, &org, &patch.job_id)?;
            apply_patch(&mut job, &patch, &actor, app.now)?;
            save_job(conn, &job)?;
            app.append(conn, &org, &actor, None, Payload::JobUpdated(job.clone()))?;
            Ok(job)
        })
        .await
    }

    async fn delete_job(&self, org: &str, actor: &str, job_id: &str) -> Result<()> {
        let (org, actor, id) = (org.to_string(), actor.to_string(), job_id.to_string());
        self.write(move |conn, app| {
            let n = conn
                .execute(
                    "DELETE FROM jobs WHERE org_id = ?1 AND id = ?2",
                    [&org, &id],
                )
                .map_err(db)?;
            if n == 0 {
                return Err(model::job_not_found(&id));
            }
            app.append(conn, &org, &actor, None, job_deleted(&id))?;
            Ok(())
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
        self.write(move |conn, app| {
            let request_id = new.request_id.clone();
            let kind = RequestKind::Notification;
            if let Some(d) = remembered(conn, &org, kind, &request_id)? {
                return decode(&d);
            }
            let n = model::new_notification(&org, &actor, new, app.now);
            let data = n.encode_to_vec();
            conn.execute(
                "INSERT INTO notifications (org_id, id, user_id, data) VALUES (?1, ?2, ?3, ?4)",
                params![org, n.id, n.user_id, data],
            )
            .map_err(db)?;
            remember(conn, &org, kind, &request_id, &data)?;
            app.append(
                conn,
                &org,
                &actor,
                model::audience(&n),
                Payload::NotificationNew(n.clone()),
            )?;
            Ok(n)
        })
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
        let (org, user) = (org.to_string(), user.to_string());
        self.read(move |conn| {
            let tx = conn.unchecked_transaction().map_err(db)?;
            let unread = unread_count(&tx, &org, &user)?;
            let mut st = tx
                .prepare_cached(
                    "SELECT data, is_read FROM (
                       SELECT n.id, n.data, EXISTS (SELECT 1 FROM notification_reads r
                         WHERE r.org_id = n.org_id AND r.user_id = ?2 AND r.notification_id = n.id) AS is_read
                       FROM notifications n
                       WHERE n.org_id = ?1 AND n.user_id IN ('', ?2) AND n.id < ?3)
                     WHERE NOT (?4 AND is_read)
                     ORDER BY id DESC LIMIT ?5",
                )
                .map_err(db)?;
            let after = model::page_start(after);
            let rows = st
                .query_map(params![org, user, after, unread_only, limit as i64 + 1], |r| {
                    Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, bool>(1)?))
                })
                .map_err(db)?;
            let mut notifications = Vec::with_capacity(limit + 1);
            for row in rows {
                let (data, read) = row.map_err(db)?;
                let mut n: Notification = decode(&data)?;
                n.read = read;
                notifications.push(n);
            }
            let (notifications, next) = model::into_page(notifications, limit, |n| &n.id);
            Ok(NotificationPage { notifications, next, unread })
        })
        .await
    }

    async fn mark_read(&self, org: &str, user: &str, ids: Vec<String>) -> Result<u32> {
        let (org, user) = (org.to_string(), user.to_string());
        self.write(move |conn, _| {
            for id in &ids {
                let visible: bool = conn
                    .query_row(
                        "SELECT EXISTS (SELECT 1 FROM notifications
                         WHERE org_id = ?1 AND id = ?2 AND user_id IN ('', ?3))",
                        [&org, id, &user],
                        |r| r.get(0),
                    )
                    .map_err(db)?;
                if !visible {
                    return Err(StoreError::NotFound(format!("notification {id} not found")));
                }
                conn.execute(
                    "INSERT OR IGNORE INTO notification_reads (org_id, user_id, notification_id)
                     VALUES (?1, ?2, ?3)",
                    [&org, &user, id],
                )
                .map_err(db)?;
            }
            unread_count(conn, &org, &user)
        })
        .await
    }

    async fn append_entity_changes(&self, changes: Vec<NewEntityChange>) -> Result<Vec<u64>> {
        self.write(move |conn, app| {
            let mut seqs = Vec::with_capacity(changes.len());
            for c in changes {
                if let Some(d) = remembered(conn, &c.org, c.request_kind, &c.request_id)? {
                    seqs.push(remembered_seq(&d)?);
                    continue;
                }
                let audience = entity_audience(&c.change).map(str::to_string);
                let seq = app.append(
                    conn,
                    &c.org,
                    &c.actor,
                    audience.as_deref(),
                    Payload::EntityChanged(c.change),
                )?;
                let data = remembered_seq_data(seq);
                remember(conn, &c.org, c.request_kind, &c.request_id, &data)?;
                seqs.push(seq);
            }
            Ok(seqs)
        })
        .await
    }

    async fn bounds(&self, org: &str) -> Result<LogBounds> {
        let org = org.to_string();
        self.read(move |conn| bounds(conn, &org)).await
    }

    async fn heads(&self, orgs: &[Arc<str>]) -> Result<Vec<(Arc<str>, u64)>> {
        // One bound parameter whatever the count: a JSON array, unpacked by json_each.
        let names: Vec<&str> = orgs.iter().map(|o| &**o).collect();
        let list = serde_json::to_string(&names)
            .map_err(|e| StoreError::Internal(format!("encoding org list: {e}")))?;
        self.read(move |conn| {
            let mut st = conn
                .prepare_cached(
                    "SELECT org_id, last_seq FROM org_log
                     WHERE org_id IN (SELECT value FROM json_each(?1))",
                )
                .map_err(db)?;
            let rows = st
                .query_map([list], |r| {
                    Ok((Arc::from(r.get::<_, String>(0)?), r.get::<_, u64>(1)?))
                })
                .map_err(db)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(db)
        })
        .await
    }

    async fn read_after(&self, org: &str, after: u64, limit: usize) -> Result<LogRead> {
        let org: Arc<str> = org.into();
        self.read(move |conn| {
            // One read transaction: the floor and the rows come from the same snapshot.
            let tx = conn.unchecked_transaction().map_err(db)?;
            let b = bounds(&tx, &org)?;
            let mut st = tx
                .prepare_cached(
                    "SELECT seq, kind, audience, data FROM events
                     WHERE org_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
                )
                .map_err(db)?;
            let rows = st
                .query_map(params![&*org, after, limit as i64], |r| {
                    Ok(CommittedEvent::from_log(
                        org.clone(),
                        r.get(0)?,
                        EventKind::try_from(r.get::<_, i32>(1)?).unwrap_or(EventKind::Unspecified),
                        r.get::<_, Option<String>>(2)?.map(Into::into),
                        Bytes::from(r.get::<_, Vec<u8>>(3)?),
                    ))
                })
                .map_err(db)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(db)?;
            Ok(LogRead::of(after, b, rows))
        })
        .await
    }

    /// Plans on a read connection, then deletes in writes of at most `TRIM_BATCH` rows, each
    /// raising the org's floor together with its rows: writes never wait behind one huge delete.
    async fn trim(&self, before: SystemTime) -> Result<u64> {
        let cutoff = millis(before);
        let plan: Vec<(String, LogBounds, u64)> = self
            .read(move |conn| {
                let orgs: Vec<(String, LogBounds)> = conn
                    .prepare_cached("SELECT org_id, floor_seq, last_seq FROM org_log")
                    .and_then(|mut st| {
                        st.query_map([], |r| {
                            Ok((
                                r.get(0)?,
                                LogBounds {
                                    floor: r.get(1)?,
                                    head: r.get(2)?,
                                },
                            ))
                        })?
                        .collect()
                    })
                    .map_err(db)?;
                let mut plan = Vec::new();
                for (org, b) in orgs {
                    let upto = last_older_than(conn, &org, b, cutoff)?;
                    if upto > b.floor {
                        plan.push((org, b, upto));
                    }
                }
                Ok(plan)
            })
            .await?;
        let mut n = 0;
        for (org, b, upto) in plan {
            let mut floor = b.floor;
            while floor < upto {
                let to = upto.min(floor + TRIM_BATCH);
                let org = org.clone();
                n += self
                    .write(move |conn, _| {
                        let n = exec(
                            conn,
                            "DELETE FROM events WHERE org_id = ?1 AND seq <= ?2",
                            params![org, to],
                        )?;
                        exec(
                            conn,
                            "UPDATE org_log SET floor_seq = MAX(floor_seq, ?2) WHERE org_id = ?1",
                            params![org, to],
                        )?;
                        Ok(n as u64)
                    })
                    .await?;
                floor = to;
            }
        }
        let requests_cutoff = model::requests_valid_since(SystemTime::now());
        loop {
            let deleted = self
                .write(move |conn, _| {
                    exec(
                        conn,
                        "DELETE FROM requests WHERE (org_id, kind, request_id) IN (
                           SELECT org_id, kind, request_id FROM requests WHERE created_ms < ?1 LIMIT ?2)",
                        params![requests_cutoff, TRIM_BATCH],
                    )
                })
                .await?;
            if (deleted as u64) < TRIM_BATCH {
                break;
            }
        }
        Ok(n)
    }

    fn health(&self) -> std::result::Result<(), String> {
        self.health.state()
    }
}

/// The last seq of `org`'s retained log (`b.floor+1 ..= b.head`) committed before `cutoff`, or
/// `b.floor` when there is none (the model's search over seq, probing this file's rows).
fn last_older_than(conn: &Connection, org: &str, b: LogBounds, cutoff: i64) -> Result<u64> {
    let mut search = RetentionSearch::new(b, cutoff);
    while let Some(seq) = search.probe() {
        search.observe(first_row(
            conn,
            "SELECT created_ms FROM events WHERE org_id = ?1 AND seq = ?2",
            params![org, seq],
            |r| r.get::<_, i64>(0),
        )?);
    }
    Ok(search.result())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use futures::FutureExt;

    use super::*;
    /// A store whose committed events are counted; the count, and the file.
    fn temp_store(
        tag: &str,
        busy: Duration,
    ) -> (SqliteStore, Arc<AtomicUsize>, std::path::PathBuf) {
        let path = std::env::temp_dir()
            .join(format!(
                "orgpulse-sqlite-{tag}-{}-{}",
                std::process::id(),
                rand::random::<u32>()
            ))
            .join("db.sqlite");
        let count = Arc::new(AtomicUsize::new(0));
        let counter = count.clone();
        let committed: Committed = Arc::new(move |_| {
            counter.fetch_add(1, Ordering::Relaxed);
        });
        (
            SqliteStore::open(&path, committed, busy).unwrap(),
            count,
            path,
        )
    }

    async fn commit_job(store: &SqliteStore) -> Result<Job> {
        let new = NewJob {
            title: "t".into(),
            labels: Default::default(),
            request_id: String::new(),
        };
        store.create_job("o", "u", new).await
    }

    fn seqs(read: LogRead) -> Vec<u64> {
        match read {
            LogRead::Events(evs) => evs.iter().map(|e| e.seq).collect(),
            LogRead::Unreachable(b) => panic!("unreachable, log is {b:?}"),
        }
    }

    #[tokio::test]
    async fn reading_after_a_trimmed_seq_says_the_log_no_longer_reaches_back() {
        let (store, _, _) = temp_store("trim", Duration::from_secs(10));
        for _ in 0..10 {
            commit_job(&store).await.unwrap();
        }
        assert_eq!(seqs(store.read_after("o", 2, 3).await.unwrap()), [3, 4, 5]);
        // A replay was at seq 2 when retention raised the floor to 10.
        let trimmed = store
            .trim(SystemTime::now() + Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(trimmed, 10);
        commit_job(&store).await.unwrap();
        let after_2 = store.read_after("o", 2, 100).await.unwrap();
        assert!(
            matches!(
                after_2,
                LogRead::Unreachable(LogBounds {
                    floor: 10,
                    head: 11
                })
            ),
            "events 3..=10 are gone, yet the read answered {after_2:?}"
        );
        assert_eq!(seqs(store.read_after("o", 10, 100).await.unwrap()), [11]);
        assert_eq!(
            seqs(store.read_after("o", 11, 100).await.unwrap()),
            [0u64; 0]
        );
        // A position past the head is not in this log either.
        assert!(matches!(
            store.read_after("o", 12, 100).await.unwrap(),
            LogRead::Unreachable(_)
        ));
    }

    #[tokio::test]
    async fn trim_deletes_in_bounded_batches() {
        let (store, _, path) = temp_store("batches", Duration::from_secs(10));
        let n = 2 * TRIM_BATCH + 5;
        let writes: Vec<_> = (0..n).map(|_| commit_job(&store)).collect();
        for r in futures::future::join_all(writes).await {
            r.unwrap();
        }
        let trimmed = store
            .trim(SystemTime::now() + Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(trimmed, n);
        let conn = Connection::open(&path).unwrap();
        assert_eq!(bounds(&conn, "o").unwrap(), LogBounds { floor: n, head: n });
        let left: u64 = conn
            .query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0);
    }

    #[tokio::test]
    async fn a_batch_whose_transaction_cannot_begin_runs_nothing_and_health_says_so() {
        let (store, bus, path) = temp_store("begin", Duration::from_millis(200));
        commit_job(&store).await.unwrap();
        assert_eq!(store.health(), Ok(()));
        // Another process holds the write lock longer than the store waits for it.
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let ran = Arc::new(AtomicBool::new(false));
        let flag = ran.clone();
        let failed = store
            .write(move |conn, app| {
                flag.store(true, Ordering::Relaxed);
                app.append(conn, "o", "u", None, job_deleted("x"))
            })
            .await;
        assert!(
            matches!(&failed, Err(StoreError::Unavailable(m)) if m.contains("locked")),
            "{failed:?}"
        );
        assert!(
            !ran.load(Ordering::Relaxed),
            "a write ran outside any transaction"
        );
        let why = store.health().unwrap_err();
        assert!(why.contains("store cannot write"), "{why}");
        // A full queue refuses at once instead of holding more (the writer, waiting for the lock,
        // takes at most one batch per busy timeout meanwhile).
        let refused = (0..WRITE_QUEUE + 4 * MAX_BATCH)
            .filter_map(|_| commit_job(&store).now_or_never())
            .filter(|r| matches!(r, Err(StoreError::Unavailable(m)) if m.contains("queue is full")))
            .count();
        assert!(refused > 0, "a queue of {WRITE_QUEUE} took more");
        other.execute_batch("ROLLBACK").unwrap();
        // Once the lock is free the store writes (and reports healthy) again.
        let job = loop {
            if let Ok(job) = commit_job(&store).await {
                break job;
            }
        };
        assert_eq!(store.get_job("o", &job.id).await.unwrap().id, job.id);
        assert_eq!(store.health(), Ok(()));
        // What was applied is exactly what was published: none of the failed batches' events.
        let head = bounds(&other, "o").unwrap().head;
        assert!(head >= 2);
        assert_eq!(bus.load(Ordering::Relaxed) as u64, head);
    }

    #[test]
    fn retention_boundary_is_found_by_seq() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        // seqs 4..=13 committed at t = 40, 50, ... 130 (seqs 1-3 already trimmed: floor 3)
        for seq in 4..=13u64 {
            exec(
                &conn,
                "INSERT INTO events (org_id, seq, kind, audience, created_ms, data) VALUES ('o', ?1, 1, NULL, ?2, x'')",
                params![seq, seq as i64 * 10],
            )
            .unwrap();
        }
        // The search itself is the model's (tested there); this checks the probes read the rows.
        let b = LogBounds { floor: 3, head: 13 };
        assert_eq!(last_older_than(&conn, "o", b, 40).unwrap(), 3);
        assert_eq!(last_older_than(&conn, "o", b, 85).unwrap(), 8);
        assert_eq!(last_older_than(&conn, "o", b, 1000).unwrap(), 13);
        let empty = LogBounds {
            floor: 13,
            head: 13,
        };
        assert_eq!(last_older_than(&conn, "o", empty, 1000).unwrap(), 13);
    }
}
