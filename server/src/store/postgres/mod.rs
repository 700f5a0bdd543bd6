//! The cluster engine: PostgreSQL, shared by every node of a cluster.
//!
//! The schema is migrated at start (`schema`). Writes go through one group-commit writer task per
//! node (`writer`), running the write operations (`ops`) on its pipelined transaction (`tx`); the
//! same-database outbox pass runs there too, through the one capability this engine offers beyond
//! the store's interfaces (`shared`). Reads and retention run here, on a connection pool. A lost
//! database answers UNAVAILABLE.
mod schema;
mod shared;
mod tx;
mod writer;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_postgres::{
    GenericClient, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
};
use orgpulse::proto::{EventKind, Notification};
use tokio::sync::mpsc;
use tokio_postgres::{NoTls, Row, types::ToSql};

pub use self::shared::{SharedTx, SharedWrites};
use self::tx::Tx;
use super::{
    Committed, CommittedEvent, JobPage, JobQuery, Log, LogBounds, LogRead, NotificationPage,
    NotificationQuery, PoolStats, Result, Status, StoreError, millis,
    model::{self, JobPager, RetentionSearch, WriterGone, WriterHealth},
    ops::{Engine, Write, WriteTx, decode, dropped_write},
};
use crate::cursor::org_epoch;

/// Connections of readers and retention.
const POOL_SIZE: usize = 8;
/// Connections of the writer (a batch, and its idle probe), on its own thread.
const WRITER_POOL_SIZE: usize = 2;
/// How long a call waits for a connection (or for the database to answer a connect) before it
/// fails with UNAVAILABLE.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Session limits on every connection of this node, so that a stuck peer costs the others bounded
/// time (docs/design.md "Limits at the door"): a node paused or cut off inside a transaction loses
/// it (and the org counter locks it holds) after 1 s without a statement (this node never waits
/// for anything but its own CPU inside a transaction), and a statement that waits more than 2 s for
/// a lock another session holds fails (UNAVAILABLE, the caller retries) instead of stalling.
const SESSION_LIMITS: &str = "-c lock_timeout=2000 -c idle_in_transaction_session_timeout=1000";
/// Events deleted per retention transaction.
const TRIM_BATCH: u64 = 10_000;

pub struct PostgresStore {
    writer: mpsc::Sender<Write<Tx>>,
    pool: Pool,
    health: Arc<WriterHealth>,
    db_epoch: u64,
}

/// The writer's transaction as the operations see it.
fn as_write_tx(tx: &mut Tx) -> &mut (dyn WriteTx + 'static) {
    tx
}

/// The notifications a user may see and has not read ($1 org, $2 user).
pub(super) const UNREAD_COUNT: &str = "SELECT COUNT(*) FROM notifications n
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
impl Engine for PostgresStore {
    async fn enqueue(&self, w: Write<dyn WriteTx>) -> Result<()> {
        self.queue(w.on(as_write_tx)).await
    }

    async fn job_row(&self, org: &str, job_id: &str) -> Result<Option<Vec<u8>>> {
        Ok(first_row(
            &self.conn().await?,
            "SELECT data FROM jobs WHERE org_id = $1 AND id = $2",
            &[&org, &job_id],
        )
        .await?
        .map(|r| r.get(0)))
    }

    async fn list_jobs(&self, q: JobQuery) -> Result<JobPage> {
        let mut client = self.conn().await?;
        let tx = snapshot(&mut client).await?;
        let head = bounds(&tx, &q.org).await?.head;
        let mut pager = JobPager::new(&q);
        while pager.want() > 0 {
            let want = pager.want();
            let rows = rows(
                &tx,
                "SELECT id, data FROM jobs WHERE org_id = $1 AND id < $2
                 AND (cardinality($3::int4[]) = 0 OR status = ANY($3))
                 ORDER BY id DESC LIMIT $4",
                &[&q.org, &pager.after(), &q.statuses, &(want as i64)],
            )
            .await?;
            for r in &rows {
                pager.feed(r.get(0), r.get(1))?;
            }
            if rows.len() < want {
                pager.end();
            }
        }
        tx.commit().await.map_err(db)?;
        Ok(pager.page(head))
    }

    async fn list_notifications(&self, q: NotificationQuery) -> Result<NotificationPage> {
        let mut client = self.conn().await?;
        let tx = snapshot(&mut client).await?;
        let unread = first_row(&tx, UNREAD_COUNT, &[&q.org, &q.user])
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
                &q.org,
                &q.user,
                &model::page_start(q.after),
                &q.unread_only,
                &(q.limit as i64 + 1),
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
        let (notifications, next) = model::into_page(notifications, q.limit, |n| &n.id);
        Ok(NotificationPage {
            notifications,
            next,
            unread,
        })
    }
}

#[async_trait]
impl Log for PostgresStore {
    fn org_epoch(&self, org: &str) -> u64 {
        org_epoch(self.db_epoch, org)
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
                    r.get::<_, Option<&str>>(4),
                    Bytes::from(r.get::<_, Vec<u8>>(5)),
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(LogRead::of(after, bounds, events))
    }

    async fn trim(&self, before: SystemTime) -> Result<u64> {
        let cutoff = millis(before);
        // Only the orgs whose oldest retained event is past the cutoff, in one statement: a
        // lookup per org would make every idle org cost a transaction per pass.
        let logs = rows(
            &self.conn().await?,
            "SELECT l.org_id, l.floor_seq, l.last_seq, e.created_ms
             FROM org_log l JOIN events e ON e.org_id = l.org_id AND e.seq = l.floor_seq + 1
             WHERE l.last_seq > l.floor_seq AND e.created_ms < $1",
            &[&cutoff],
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
            // The search's first probe, the oldest retained event, came with the bounds.
            search.observe(Some(r.get(3)));
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
}

impl Status for PostgresStore {
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
pub(crate) fn explain(e: &dyn std::error::Error) -> String {
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

/// `host:port/dbname` of a connection config, for messages (never the password).
pub(crate) fn describe(cfg: &tokio_postgres::Config) -> String {
    let host = match cfg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", cfg.get_dbname().unwrap_or_default())
}

/// A pool of at most `size` connections to `cfg`'s database.
fn pool_of(cfg: tokio_postgres::Config, size: usize) -> anyhow::Result<Pool> {
    let manager = Manager::from_config(
        cfg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Ok(Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(CONNECT_TIMEOUT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(CONNECT_TIMEOUT))
        .build()?)
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
        let pool = pool_of(cfg.clone(), POOL_SIZE)?;
        let mut client = pool.get().await.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the PostgreSQL database {name}: {}",
                no_connection(e)
            )
        })?;
        let db_epoch = schema::migrate(&mut client).await.map_err(|e| {
            anyhow::anyhow!("migrating the PostgreSQL database {name}: {}", explain(&e))
        })?;
        drop(client);
        let (tx, rx) = mpsc::channel(writer::QUEUE);
        let health = Arc::new(WriterHealth::default());
        let gone = WriterGone::new(health.clone());
        // The writer runs on a thread and a runtime of its own, with connections of its own (their
        // drivers run there too): on a node saturated by requests (a reconnect storm) a shared
        // runtime could delay a transaction's next statement past
        // idle_in_transaction_session_timeout, and PostgreSQL would end the session and the batch.
        let writing = writer::write_loop(
            pool_of(cfg, WRITER_POOL_SIZE)?,
            rx,
            committed,
            db_epoch,
            gone,
        );
        std::thread::Builder::new()
            .name("orgpulse-pg-writer".into())
            .spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the PostgreSQL writer")
                    .block_on(writing)
            })?;
        Ok(PostgresStore {
            writer: tx,
            pool,
            health,
            db_epoch,
        })
    }

    /// Queues `w` for the writer (waiting while its queue is full).
    async fn queue(&self, w: Write<Tx>) -> Result<()> {
        self.writer.send(w).await.map_err(|_| dropped_write())
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
