//! The embedded engine: one SQLite file in WAL mode.
//!
//! Writes go through one writer thread that group-commits (`writer`), running the write
//! operations (`ops`) on its transaction (`tx`); the schema is `schema`. Reads run here, on at
//! most READERS blocking threads, each with its own read connection (WAL readers never block the
//! writer); more wait in a queue holding neither a thread nor a connection.
mod schema;
mod tx;
mod writer;

use std::{
    path::Path,
    sync::{
        Arc,
        mpsc::{self, TrySendError},
    },
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use bytes::Bytes;
use orgpulse::proto::{EventKind, Notification};
use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use self::{tx::Tx, writer::SqliteWrite};
use super::{
    Committed, CommittedEvent, JobPage, JobQuery, Log, LogBounds, LogRead, NotificationPage,
    NotificationQuery, Result, Status, StoreError, millis,
    model::{self, JobPager, RetentionSearch, WriterGone, WriterHealth, writer_stopped},
    ops::{Engine, Write, WriteTx, decode},
};
use crate::cursor::org_epoch;

/// Most writes waiting for the writer; beyond that a write is refused (UNAVAILABLE) rather than
/// held in memory: 16 full group commits, a few hundred milliseconds of work.
const WRITE_QUEUE: usize = 16 * writer::MAX_BATCH;
/// Log rows (or idempotency keys) one retention write deletes: trimming is many short writes.
const TRIM_BATCH: u64 = 1000;
/// Reads that run at once, and read connections (opened on demand, then kept for the next read).
const READERS: usize = 4;

/// A read: given a connection (or why none could be opened), runs and answers its caller.
type ReadOp = Box<dyn FnOnce(Result<&Connection>) + Send>;

pub struct SqliteStore {
    writer: mpsc::SyncSender<SqliteWrite>,
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

impl SqliteStore {
    /// Opens (creating when missing) the database at `path` and starts its writer thread. A write
    /// waits up to `busy_timeout` for a lock another process holds.
    pub fn open(path: &Path, committed: Committed, busy_timeout: Duration) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
        }
        let conn = schema::connect(path, busy_timeout)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
        let db_epoch = schema::migrate(&conn)?;
        let (tx, rx) = mpsc::sync_channel(WRITE_QUEUE);
        let health = Arc::new(WriterHealth::default());
        let gone = WriterGone::new(health.clone());
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || writer::write_loop(conn, rx, committed, db_epoch, gone))?;
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

    /// Queues `w` for the writer; refused at once when the queue is full.
    fn queue(&self, w: SqliteWrite) -> Result<()> {
        self.writer.try_send(w).map_err(|e| match e {
            TrySendError::Full(_) => {
                StoreError::Unavailable("store write queue is full; retry shortly".into())
            }
            TrySendError::Disconnected(_) => writer_stopped(),
        })
    }

    /// Runs `f` as one write of the next group commit (retention's deletes).
    async fn write<R: Send + 'static>(
        &self,
        f: impl for<'a> Fn(&'a mut Tx) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let (w, answer) = Write::new(None, move |tx: &mut Tx| {
            let r = f(tx);
            Box::pin(async move { r })
        });
        self.queue(w)?;
        answer.await
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
                conn = schema::connect(&self.path, self.busy_timeout)
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

/// The writer's transaction as the operations see it.
fn as_write_tx(tx: &mut Tx) -> &mut (dyn WriteTx + 'static) {
    tx
}

/// A job's stored row, `None` when the org has no such job.
fn job_row(conn: &Connection, org: &str, id: &str) -> Result<Option<Vec<u8>>> {
    first_row(
        conn,
        "SELECT data FROM jobs WHERE org_id = ?1 AND id = ?2",
        [org, id],
        |r| r.get(0),
    )
}

/// The notifications `user` may see and has not read.
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
impl Engine for SqliteStore {
    async fn enqueue(&self, w: Write<dyn WriteTx>) -> Result<()> {
        self.queue(w.on(as_write_tx))
    }

    async fn job_row(&self, org: &str, job_id: &str) -> Result<Option<Vec<u8>>> {
        let (org, id) = (org.to_string(), job_id.to_string());
        self.read(move |conn| job_row(conn, &org, &id)).await
    }

    async fn list_jobs(&self, q: JobQuery) -> Result<JobPage> {
        self.read(move |conn| {
            let tx = conn.unchecked_transaction().map_err(db)?;
            let head = bounds(&tx, &q.org)?.head;
            let filter = if q.statuses.is_empty() {
                String::new()
            } else {
                let list: Vec<String> = q.statuses.iter().map(|s| s.to_string()).collect();
                format!("AND status IN ({})", list.join(","))
            };
            let sql = format!(
                "SELECT id, data FROM jobs WHERE org_id = ?1 AND id < ?2 {filter} ORDER BY id DESC LIMIT ?3"
            );
            let mut st = tx.prepare_cached(&sql).map_err(db)?;
            let mut pager = JobPager::new(&q);
            while pager.want() > 0 {
                let want = pager.want();
                let mut rows = st
                    .query(params![q.org, pager.after(), want as i64])
                    .map_err(db)?;
                let mut read = 0;
                while let Some(r) = rows.next().map_err(db)? {
                    read += 1;
                    let (id, row): (String, Vec<u8>) = (r.get(0).map_err(db)?, r.get(1).map_err(db)?);
                    pager.feed(&id, &row)?;
                }
                if read < want {
                    pager.end();
                }
            }
            Ok(pager.page(head))
        })
        .await
    }

    async fn list_notifications(&self, q: NotificationQuery) -> Result<NotificationPage> {
        self.read(move |conn| {
            let tx = conn.unchecked_transaction().map_err(db)?;
            let unread = unread_count(&tx, &q.org, &q.user)?;
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
            let after = model::page_start(q.after);
            let rows = st
                .query_map(params![q.org, q.user, after, q.unread_only, q.limit as i64 + 1], |r| {
                    Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, bool>(1)?))
                })
                .map_err(db)?;
            let mut notifications = Vec::with_capacity(q.limit + 1);
            for row in rows {
                let (data, read) = row.map_err(db)?;
                let mut n: Notification = decode(&data)?;
                n.read = read;
                notifications.push(n);
            }
            let (notifications, next) = model::into_page(notifications, q.limit, |n| &n.id);
            Ok(NotificationPage { notifications, next, unread })
        })
        .await
    }
}

#[async_trait]
impl Log for SqliteStore {
    fn org_epoch(&self, org: &str) -> u64 {
        org_epoch(self.db_epoch, org)
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
                    Ok((
                        r.get::<_, u64>(0)?,
                        EventKind::try_from(r.get::<_, i32>(1)?).unwrap_or(EventKind::Unspecified),
                        r.get::<_, Option<String>>(2)?,
                        Bytes::from(r.get::<_, Vec<u8>>(3)?),
                    ))
                })
                .map_err(db)?
                .map(|row| {
                    let (seq, kind, audience, bytes) = row.map_err(db)?;
                    CommittedEvent::from_log(org.clone(), seq, kind, audience.as_deref(), bytes)
                })
                .collect::<Result<Vec<_>>>()?;
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
                    .write(move |tx| {
                        let n = exec(
                            &tx.conn,
                            "DELETE FROM events WHERE org_id = ?1 AND seq <= ?2",
                            params![org, to],
                        )?;
                        exec(
                            &tx.conn,
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
                .write(move |tx| {
                    exec(
                        &tx.conn,
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
}

impl Status for SqliteStore {
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
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures::FutureExt;

    use super::*;
    use crate::store::{Entities, NewJob};

    /// A store whose committed events are counted; the count, and the file.
    fn temp_store(
        tag: &str,
        busy: Duration,
    ) -> (Arc<SqliteStore>, Arc<AtomicUsize>, std::path::PathBuf) {
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
            Arc::new(SqliteStore::open(&path, committed, busy).unwrap()),
            count,
            path,
        )
    }

    async fn commit_job(store: &Arc<SqliteStore>) -> Result<orgpulse::proto::Job> {
        let new = NewJob {
            title: "t".into(),
            ..Default::default()
        };
        Entities::new(store.clone()).create_job("o", "u", new).await
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
    async fn a_store_that_cannot_begin_says_so_in_health_and_refuses_beyond_its_queue() {
        let (store, bus, path) = temp_store("begin", Duration::from_millis(200));
        commit_job(&store).await.unwrap();
        assert_eq!(store.health(), Ok(()));
        // Another process holds the write lock longer than the store waits for it.
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let failed = commit_job(&store).await;
        assert!(
            matches!(&failed, Err(StoreError::Unavailable(m)) if m.contains("locked")),
            "{failed:?}"
        );
        let why = store.health().unwrap_err();
        assert!(why.contains("store cannot write"), "{why}");
        // A full queue refuses at once instead of holding more (the writer, waiting for the lock,
        // takes at most one batch per busy timeout meanwhile).
        let refused = (0..WRITE_QUEUE + 4 * writer::MAX_BATCH)
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
        assert!(store.job_row("o", &job.id).await.unwrap().is_some());
        assert_eq!(store.health(), Ok(()));
        // What was applied is exactly what was published: none of the failed batches' events.
        let head = bounds(&other, "o").unwrap().head;
        assert!(head >= 2);
        assert_eq!(bus.load(Ordering::Relaxed) as u64, head);
    }

    #[test]
    fn retention_boundary_is_found_by_seq() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(schema::SCHEMA).unwrap();
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
