//! The PostgreSQL engine's group-commit writer: one task per node takes every write waiting in
//! its queue, runs them in one transaction, commits once, then hands the committed events on in
//! seq order (`Committed`). The batch uses no savepoints (round trips are what a write costs
//! here): a write that fails before it wrote anything is simply skipped, and one that fails later
//! (or any failed statement) rolls the batch back, after which each of its writes runs again
//! alone in its own transaction. The job rows of a batch's updates are read ahead in one round
//! trip (`Tx::prefetch_jobs`), each taken by the first write that asks.
use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use deadpool_postgres::{Object, Pool};
use tokio::sync::mpsc;

use super::{
    db, no_connection, pool_error,
    tx::{OrgLogs, Tx},
};
use crate::store::{
    Committed, Result, StoreError,
    model::WriterGone,
    ops::{JobKey, Write},
};

/// Most writes one transaction takes.
const MAX_BATCH: usize = 256;
/// Longest wait for the writers the last transaction answered before the next one starts.
const LINGER: Duration = Duration::from_millis(1);
/// Writes queued before callers wait for the writer.
pub(super) const QUEUE: usize = 4096;
/// How long the writer may sit idle before it probes that the database still answers.
const PROBE_IDLE: Duration = Duration::from_secs(1);

pub(super) async fn write_loop(
    pool: Pool,
    mut rx: mpsc::Receiver<Write<Tx>>,
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
            logs: OrgLogs {
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
        let results: Vec<(Write<Tx>, Result<()>)> = match together {
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
            w.answer(r);
        }
    }
}

/// What an outcome says about whether the store can write (the health reason).
fn writable(outcome: Result<()>) -> Result<()> {
    outcome.map_err(|e| StoreError::Unavailable(format!("store cannot write: {e}")))
}

/// Hands the events of the transaction that just committed on, in seq order.
fn publish(tx: &mut Tx, committed: &Committed) {
    for ev in tx.logs.events.drain(..) {
        committed(ev);
    }
}

/// Runs the batch in one transaction and commits it. A write that failed before it changed a
/// row is skipped (its caller gets its own error); any other failure rolls the whole batch back
/// and is returned. A lone write's own failure is its answer, not the batch's.
async fn run_together(tx: &mut Tx, batch: &mut [Write<Tx>]) -> Result<()> {
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
async fn run_alone(tx: &mut Tx, w: &mut Write<Tx>) -> Result<()> {
    tx.begin();
    tx.wrote = false;
    if (w.run)(tx).await {
        tx.commit().await
    } else {
        tx.rollback().await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use parking_lot::Mutex;

    use super::*;
    use crate::audience::Viewer;
    use futures::future::BoxFuture;

    use crate::store::{
        CommittedEvent, Entities, JobPatch, NewJob, Status, job_deleted,
        ops::{NewEvent, WriteTx, testing::appending},
        postgres::PostgresStore,
    };

    /// The test PostgreSQL server's admin database (`ORGPULSE_TEST_POSTGRES`, else the local one).
    fn admin() -> String {
        std::env::var("ORGPULSE_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
    }

    /// Runs `sql` on the admin database.
    async fn on_admin(sql: &str) -> std::result::Result<(), tokio_postgres::Error> {
        let (client, conn) = tokio_postgres::connect(&admin(), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        client.batch_execute(sql).await
    }

    fn database_name(tag: &str) -> String {
        format!("orgpulse_writer_{tag}_{}", std::process::id())
    }

    /// Drops the database of [`store`]`(tag)` (its connections with it).
    async fn drop_database(tag: &str) {
        let sql = format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            database_name(tag)
        );
        on_admin(&sql).await.unwrap();
    }

    /// A store on a fresh database `orgpulse_writer_<tag>` of the test PostgreSQL server (dropped
    /// first when a run left it), and what it publishes; `None` (the test is skipped) when there
    /// is no server, except under CI, where that fails.
    async fn store(tag: &str) -> Option<(Arc<PostgresStore>, Arc<Mutex<Vec<CommittedEvent>>>)> {
        let admin = admin();
        let name = database_name(tag);
        // Two calls: CREATE DATABASE cannot share an implicit transaction with another statement.
        let mut created = on_admin(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
        if created.is_ok() {
            created = on_admin(&format!("CREATE DATABASE {name}")).await;
        }
        match created {
            Ok(()) => {}
            Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("PostgreSQL at {admin}: {e}")
            }
            Err(e) => {
                eprintln!("skipped: no PostgreSQL at {admin}: {e}");
                return None;
            }
        }
        let (base, _) = admin.rsplit_once('/').unwrap();
        let published = Arc::new(Mutex::new(Vec::new()));
        let log = published.clone();
        let committed: Committed = Arc::new(move |ev| log.lock().push(ev));
        let store = PostgresStore::open(&format!("{base}/{name}"), committed)
            .await
            .unwrap();
        Some((Arc::new(store), published))
    }

    #[tokio::test]
    async fn a_batch_rolled_back_for_one_write_reruns_each_write_alone() {
        let Some((store, published)) = store("rerun").await else {
            return;
        };
        let runs: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::default()).collect();
        let (a, a_answer) = appending("o", false, runs[0].clone());
        let (b, b_answer) = appending("o", true, runs[1].clone());
        let (c, c_answer) = appending("o", false, runs[2].clone());
        // Queued before the writer looks: one batch.
        for w in [a, b, c] {
            store.queue(w).await.unwrap();
        }
        assert_eq!(a_answer.await.unwrap(), 1);
        assert!(matches!(b_answer.await, Err(StoreError::Aborted(_))));
        // b's seq was rolled back with it: no gap.
        assert_eq!(c_answer.await.unwrap(), 2);
        let ran: Vec<usize> = runs.iter().map(|r| r.load(Ordering::Relaxed)).collect();
        // The batch stopped at b and rolled back; then each write ran alone.
        assert_eq!(ran, [2, 2, 1]);
        let seqs: Vec<u64> = published.lock().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2], "only what committed was published");
        drop_database("rerun").await;
    }

    /// A node whose request runtime is saturated (a reconnect storm) in the middle of a write's
    /// transaction still commits it: the writer runs on a thread and runtime of its own, so the
    /// transaction is never left idle past `idle_in_transaction_session_timeout` (1 s), after
    /// which PostgreSQL would end the session and the write would fail.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_saturated_runtime_does_not_stall_a_transaction() {
        let Some((store, published)) = store("saturated").await else {
            return;
        };
        let node = tokio::runtime::Handle::current();
        let (w, answer) = Write::new(None, move |tx: &mut Tx| -> BoxFuture<'_, Result<u64>> {
            let node = node.clone();
            Box::pin(async move {
                tx.append(NewEvent::to_all("o", "u", job_deleted("a")))
                    .await?;
                // The node's only worker is busy for 1.5 s without yielding; the rest of the
                // transaction must not wait for it.
                node.spawn(async { std::thread::sleep(Duration::from_millis(1500)) });
                tokio::task::yield_now().await;
                tx.append(NewEvent::to_all("o", "u", job_deleted("b")))
                    .await
            })
        });
        store.queue(w).await.unwrap();
        assert_eq!(answer.await.unwrap(), 2, "both events committed");
        let seqs: Vec<u64> = published.lock().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2]);
        drop_database("saturated").await;
    }

    #[tokio::test]
    async fn a_batch_whose_transaction_cannot_begin_runs_nothing() {
        let Some((store, published)) = store("begin").await else {
            return;
        };
        let runs = Arc::new(AtomicUsize::new(0));
        let (w, answer) = appending("o", false, runs.clone());
        store.queue(w).await.unwrap();
        assert_eq!(answer.await.unwrap(), 1);
        // The database takes no new sessions and ends the store's: the next batch has no
        // connection to begin its transaction on.
        let name = database_name("begin");
        on_admin(&format!(
            "ALTER DATABASE {name} ALLOW_CONNECTIONS false; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
        ))
        .await
        .unwrap();
        // The writer's idle probe finds that out (and the pool drops the ended session).
        while store.health().is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (w, answer) = appending("o", false, runs.clone());
        store.queue(w).await.unwrap();
        let failed = answer.await;
        assert!(
            matches!(&failed, Err(StoreError::Unavailable(_))),
            "{failed:?}"
        );
        assert_eq!(
            runs.load(Ordering::Relaxed),
            1,
            "a write ran without a transaction"
        );
        on_admin(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
            .await
            .unwrap();
        // The writer goes on; the failed write left no seq and no event behind.
        let (w, answer) = appending("o", false, runs.clone());
        store.queue(w).await.unwrap();
        assert_eq!(answer.await.unwrap(), 2);
        let seqs: Vec<u64> = published.lock().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2]);
        drop_database("begin").await;
    }

    #[tokio::test]
    async fn a_row_read_ahead_is_never_reused_by_a_later_write_of_the_batch() {
        let Some((store, _)) = store("readahead").await else {
            return;
        };
        let entities = Entities::new(store);
        let by = Viewer::service("u");
        let new = NewJob {
            title: "t".into(),
            ..Default::default()
        };
        let job = entities.create_job("o", "u", new).await.unwrap();
        let patch = |title: &str| JobPatch {
            job_id: job.id.clone(),
            status: None,
            progress: None,
            title: Some(title.into()),
            message: None,
            expected_version: 0,
        };
        // Three writes of one batch on the same row: each must see the one before it.
        let (first, deleted, after_delete) = futures::join!(
            entities.update_job("o", &by, patch("a")),
            entities.delete_job("o", &by, &job.id),
            entities.update_job("o", &by, patch("b")),
        );
        assert_eq!(first.unwrap().version, 2);
        deleted.unwrap();
        assert!(
            matches!(&after_delete, Err(StoreError::NotFound(_))),
            "an update after the delete found {after_delete:?}"
        );
        let job = entities
            .create_job(
                "o",
                "u",
                NewJob {
                    title: "t2".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let patch = |title: &str| JobPatch {
            job_id: job.id.clone(),
            ..patch(title)
        };
        let (a, b) = futures::join!(
            entities.update_job("o", &by, patch("a")),
            entities.update_job("o", &by, patch("b")),
        );
        let mut versions = [a.unwrap().version, b.unwrap().version];
        versions.sort();
        assert_eq!(versions, [2, 3], "the second update saw the first");
        assert_eq!(
            entities.get_job("o", &job.id, &by).await.unwrap().version,
            3
        );
        drop_database("readahead").await;
    }
}
