//! The `outbox` scenario's PostgreSQL side. A database of its own on the local server (created
//! through `--pg-admin-url`, dropped with its connections at the end) is handed to the started
//! server as `--outbox` with `--outbox-poll` [`POLL`], so a row is delivered fast only through
//! the NOTIFY wake-up. The product's side: rows inserted one per transaction at a fixed rate,
//! each one's time recorded just after its COMMIT returned, against which the subscribers measure.
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use serde_json::Value;
use tokio::time::Instant;
use tokio_postgres::{Client, Statement};

use super::{
    database::{Database, connect, sql_error},
    histogram::Histogram,
    subscriber::{Tally, now_us},
    writer::Published,
};
use crate::error::CliError;

/// The started server's `--outbox-poll`: far above any latency measured, so the figure is the
/// NOTIFY path's.
pub const POLL: &str = "10s";
/// The entity type of the bench rows (the subscribers filter on it).
pub const ENTITY_TYPE: &str = "bench_row";

/// The flags that make the started server consume `db`'s outbox.
pub fn server_args(db: &Database) -> Vec<String> {
    vec![
        format!("--outbox={}", db.url),
        format!("--outbox-poll={POLL}"),
    ]
}

/// When each row's COMMIT returned to the inserter (µs since the epoch; 0 = not yet).
pub struct CommitTimes(Vec<AtomicU64>);

impl CommitTimes {
    fn new(rows: u64) -> CommitTimes {
        CommitTimes((0..rows).map(|_| AtomicU64::new(0)).collect())
    }

    pub fn get(&self, row: usize) -> Option<u64> {
        self.0.get(row).map(|t| t.load(Relaxed)).filter(|&t| t != 0)
    }
}

/// The product: one connection inserting outbox rows.
pub struct Inserter {
    client: Client,
    insert: Statement,
    org: String,
    commits: Arc<CommitTimes>,
}

impl Inserter {
    /// Connects to the database (whose outbox table the started server created) for `rows` rows.
    pub async fn connect(db: &Database, org: &str, rows: u64) -> Result<Inserter, CliError> {
        let client = connect(&db.url).await?;
        let insert = client
            .prepare(
                "INSERT INTO orgpulse_outbox (org_id, entity_type, entity_id, action, data)
                 VALUES ($1, $2, $3, 'inserted', jsonb_build_object('row', $3::text))",
            )
            .await
            .map_err(sql_error("preparing the outbox INSERT"))?;
        Ok(Inserter {
            client,
            insert,
            org: org.to_string(),
            commits: Arc::new(CommitTimes::new(rows)),
        })
    }

    pub fn commits(&self) -> Arc<CommitTimes> {
        self.commits.clone()
    }

    /// `total` rows (at most the `rows` of connect), one per transaction, the i-th not before
    /// `start + i / rate` (rate 0: at once); returns when every one is committed.
    pub async fn publish(&mut self, total: u64, rate: f64) -> Result<Published, CliError> {
        let rows = total.min(self.commits.0.len() as u64);
        let start = Instant::now();
        for row in 0..rows {
            if rate > 0.0 {
                tokio::time::sleep_until(start + Duration::from_secs_f64(row as f64 / rate)).await;
            }
            let tx = self
                .client
                .transaction()
                .await
                .map_err(sql_error("BEGIN"))?;
            tx.execute(&self.insert, &[&self.org, &ENTITY_TYPE, &row.to_string()])
                .await
                .map_err(sql_error("INSERT INTO orgpulse_outbox"))?;
            tx.commit().await.map_err(sql_error("COMMIT"))?;
            self.commits.0[row as usize].store(now_us(), Relaxed);
        }
        Ok(Published {
            writes: rows,
            elapsed: start.elapsed(),
            calls: Histogram::new(),
            timeline: Vec::new(),
        })
    }

    /// Adds the latency of the rows received before their COMMIT returned (their commit times are
    /// known now), and the outbox fields: the poll interval, how many arrived that early, and the
    /// rows the server rejected.
    pub async fn report(&self, tally: &Tally, out: &mut Value) -> Result<(), CliError> {
        let early = std::mem::take(&mut *tally.early.lock().unwrap());
        {
            let mut latency = tally.latency.lock().unwrap();
            for &(row, received_us) in &early {
                match self.commits.get(row) {
                    Some(committed_us) => latency.record(received_us.saturating_sub(committed_us)),
                    None => tally.error(format!("row {row} was received but never committed")),
                }
            }
        }
        let rejected: i64 = self
            .client
            .query_one("SELECT count(*) FROM orgpulse_outbox_rejected", &[])
            .await
            .map_err(sql_error("counting rejected rows"))?
            .get(0);
        out["outboxPoll"] = POLL.into();
        out["receivedBeforeCommitReturned"] = early.len().into();
        out["rejectedRows"] = rejected.into();
        Ok(())
    }
}
