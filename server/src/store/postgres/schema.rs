//! The PostgreSQL engine's schema: versioned in `schema_version`, migrated at start in one
//! transaction under an advisory lock (nodes starting together migrate once), and the database's
//! log epoch (the `meta` table), which makes a cursor valid on every node.
use deadpool_postgres::Object;

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
/// Brings the schema to the newest version and returns the database's log epoch.
pub(super) async fn migrate(
    client: &mut Object,
) -> std::result::Result<u64, tokio_postgres::Error> {
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
