//! The SQLite engine's group-commit writer: one thread takes every write waiting in its bounded
//! queue, runs each inside its own SAVEPOINT of one transaction (a failing write rolls back
//! alone), commits once, then hands the committed events on in seq order (`Committed`) and
//! answers the callers. A batch whose transaction cannot begin or commit applies and publishes
//! nothing. The writer's last transaction outcome (refreshed by a lock-only probe when idle) is
//! the store's health.
use std::{
    sync::mpsc::{self, RecvTimeoutError},
    time::{Duration, SystemTime},
};

use rusqlite::Connection;

use super::tx::Tx;
use crate::store::{Committed, Result, StoreError, model::WriterGone, ops::Write};

/// Most writes one transaction takes.
pub(super) const MAX_BATCH: usize = 512;
/// How long the writer may sit idle before it probes that it can still take the write lock.
const PROBE_IDLE: Duration = Duration::from_secs(1);

/// A write as the SQLite writer queues it.
pub(super) type SqliteWrite = Write<Tx>;

/// Runs a transaction-control statement (BEGIN, SAVEPOINT, COMMIT, ...); its failure means the
/// store cannot write at the moment.
fn control(conn: &Connection, sql: &str) -> Result<()> {
    conn.prepare_cached(sql)
        .and_then(|mut st| st.execute([]))
        .map(drop)
        .map_err(|e| StoreError::Unavailable(format!("store cannot write: {e}")))
}

pub(super) fn write_loop(
    conn: Connection,
    rx: mpsc::Receiver<SqliteWrite>,
    committed: Committed,
    db_epoch: u64,
    gone: WriterGone,
) {
    let health = gone.health();
    let mut tx = Tx {
        conn,
        db_epoch,
        now: SystemTime::now(),
        events: Vec::new(),
    };
    // Whether the last COMMIT carried more than one write: writers are concurrent.
    let mut concurrent = false;
    loop {
        let first = match rx.recv_timeout(PROBE_IDLE) {
            Ok(w) => w,
            Err(RecvTimeoutError::Timeout) => {
                // Idle: take and release the write lock (writes nothing) so health notices a
                // store that stopped or started being writable without waiting for a write.
                let probe = control(&tx.conn, "BEGIN IMMEDIATE");
                if probe.is_ok() {
                    let _ = control(&tx.conn, "ROLLBACK");
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
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        concurrent = batch.len() > 1;
        let result = run_batch(&mut tx, &mut batch);
        health.record(&result);
        for ev in tx.events.drain(..) {
            committed(ev);
        }
        for w in batch {
            w.answer(result.clone());
        }
    }
}

/// Runs `batch` in one transaction, each write in a savepoint of its own, and commits. On
/// failure (BEGIN, a savepoint or COMMIT) nothing of the batch stays applied, no write runs
/// outside the transaction, and `tx` keeps no events.
fn run_batch(tx: &mut Tx, batch: &mut [SqliteWrite]) -> Result<()> {
    tx.now = SystemTime::now();
    tx.events.clear();
    let mut result = control(&tx.conn, "BEGIN IMMEDIATE");
    for w in batch.iter_mut() {
        result = result.and_then(|()| control(&tx.conn, "SAVEPOINT w"));
        if result.is_err() {
            // Never outside the transaction: the write does not run, its caller gets the failure.
            continue;
        }
        let kept = tx.events.len();
        // The engine's steps never wait, so the write's future completes in one poll.
        let ok = futures::executor::block_on((w.run)(&mut *tx));
        if ok {
            result = control(&tx.conn, "RELEASE w");
        } else {
            tx.events.truncate(kept);
            result =
                control(&tx.conn, "ROLLBACK TO w").and_then(|()| control(&tx.conn, "RELEASE w"));
        }
    }
    result = result.and_then(|()| control(&tx.conn, "COMMIT"));
    if result.is_ok() {
        crate::metrics::METRICS.store_commits.inc();
    } else {
        // Nothing of the batch stays applied (a failed COMMIT may leave the transaction open)
        // and nothing is published.
        if !tx.conn.is_autocommit() {
            let _ = tx.conn.execute_batch("ROLLBACK");
        }
        tx.events.clear();
    }
    result
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use parking_lot::Mutex;

    use super::*;
    use crate::store::{CommittedEvent, ops::testing::appending, sqlite::schema};

    /// A writer thread on a fresh file; what it publishes, and the file.
    fn writer(
        tag: &str,
        busy: Duration,
    ) -> (
        mpsc::SyncSender<SqliteWrite>,
        Arc<Mutex<Vec<CommittedEvent>>>,
        std::path::PathBuf,
    ) {
        let path = std::env::temp_dir()
            .join(format!(
                "orgpulse-sqlite-writer-{tag}-{}-{}",
                std::process::id(),
                rand::random::<u32>()
            ))
            .join("db.sqlite");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let conn = schema::connect(&path, busy).unwrap();
        let epoch = schema::migrate(&conn).unwrap();
        let published = Arc::new(Mutex::new(Vec::new()));
        let log = published.clone();
        let committed: Committed = Arc::new(move |ev| log.lock().push(ev));
        let (tx, rx) = mpsc::sync_channel(64);
        let health = Arc::new(crate::store::model::WriterHealth::default());
        let gone = WriterGone::new(health);
        std::thread::spawn(move || write_loop(conn, rx, committed, epoch, gone));
        (tx, published, path)
    }

    #[tokio::test]
    async fn a_failing_write_rolls_back_alone_and_the_rest_of_its_batch_commits() {
        let (queue, published, _) = writer("alone", Duration::from_secs(10));
        let runs = Arc::new(AtomicUsize::new(0));
        // Queued before the writer looks: one batch.
        let (a, a_answer) = appending("o", false, runs.clone());
        let (b, b_answer) = appending("o", true, runs.clone());
        let (c, c_answer) = appending("o", false, runs.clone());
        for w in [a, b, c] {
            queue.send(w).unwrap();
        }
        assert_eq!(a_answer.await.unwrap(), 1);
        assert!(matches!(b_answer.await, Err(StoreError::Aborted(_))));
        // b's seq was rolled back with it: no gap.
        assert_eq!(c_answer.await.unwrap(), 2);
        let seqs: Vec<u64> = published.lock().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2]);
    }

    #[tokio::test]
    async fn a_batch_whose_transaction_cannot_begin_runs_nothing() {
        let (queue, published, path) = writer("begin", Duration::from_millis(100));
        // Another process holds the write lock longer than the writer waits for it.
        let other = Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        let runs = Arc::new(AtomicUsize::new(0));
        let (w, answer) = appending("o", false, runs.clone());
        queue.send(w).unwrap();
        let failed = answer.await;
        assert!(
            matches!(&failed, Err(StoreError::Unavailable(m)) if m.contains("locked")),
            "{failed:?}"
        );
        assert_eq!(
            runs.load(Ordering::Relaxed),
            0,
            "a write ran outside any transaction"
        );
        assert!(published.lock().is_empty());
        other.execute_batch("ROLLBACK").unwrap();
    }
}
