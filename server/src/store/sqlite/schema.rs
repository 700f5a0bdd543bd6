//! The SQLite engine's schema, created when missing, and how its connections are opened.
use std::{path::Path, time::Duration};

use rusqlite::Connection;

pub(super) const SCHEMA: &str = "
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

/// A connection to the file at `path` (WAL), waiting up to `busy_timeout` for another process's
/// lock.
pub(super) fn connect(path: &Path, busy_timeout: Duration) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(busy_timeout)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = OFF;",
    )?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// Creates what is missing and returns the database's log epoch.
pub(super) fn migrate(conn: &Connection) -> anyhow::Result<u64> {
    conn.execute_batch(SCHEMA)?;
    let fresh: u64 = rand::random::<u64>() >> 1;
    conn.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('epoch', ?1)",
        [fresh.to_string()],
    )?;
    Ok(conn
        .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
            r.get::<_, String>(0)
        })?
        .parse()?)
}
