//! The outbox consumer (`--outbox postgres://...`): the product inserts a row into its outbox table
//! in the same transaction as its own change, and orgpulse turns every committed row into exactly
//! one `entity_changed` event, then deletes the row.
//!
//! Creates the table, `<table>_rejected` and an `AFTER INSERT` NOTIFY trigger when missing. A pass
//! takes the table's advisory lock (so the rows of an org become events in id order even with
//! several nodes), reads up to [`BATCH`] committed rows in id order `FOR UPDATE SKIP LOCKED`,
//! appends the valid ones to the Store with the row's key as idempotency key, moves the invalid
//! ones to `<table>_rejected` with the reason, deletes them all and commits. Where that runs is
//! chosen at start, by comparing the server (`system_identifier`) and database (oid) of both
//! connections:
//!
//! - same database (`--database` is the PostgreSQL database of `--outbox`): the whole pass is one
//!   write of the store's writer, so one transaction holds the reads, the events, the rejected
//!   rows and the deletes; the writer publishes the events after its COMMIT. A crash leaves all of
//!   it or none. The idempotency key is kept (one statement per row): the appends are the store's
//!   own, unchanged.
//! - otherwise (another database, or SQLite): the pass is a transaction on the outbox connection
//!   and the append commits first in the store; a pass that dies between the two is redone, and
//!   the row keys make the redo add no second event.
//!
//! Passes run on every NOTIFY and at least every `--outbox-poll`; a lost connection is reopened
//! with backoff.
use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use futures::StreamExt;
use orgpulse::proto::EntityChanged;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, Client, NoTls, Row, types::ToSql};
use tokio_util::sync::CancellationToken;

use crate::{
    audience::{self, Audience},
    metrics::METRICS,
    store::{
        self, Entities, NewEntityChange, Store, StoreError,
        model::RequestKind,
        postgres::{SharedTx, SharedWrites, describe, explain as chain},
    },
    validate,
};

/// Most rows one pass takes.
pub const BATCH: i64 = 100;
/// Longest wait before reconnecting after a failure.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The actor of a row whose `actor` is NULL.
const DEFAULT_ACTOR: &str = "outbox";

/// Where the outbox is and how often it is polled without a NOTIFY.
pub struct OutboxConfig {
    pub url: String,
    pub table: String,
    pub poll: Duration,
}

/// The consumer of one outbox table.
struct Consumer {
    pg: tokio_postgres::Config,
    table: Arc<Table>,
    poll: Duration,
    store: Arc<Entities>,
    /// The store's shared writes when the table is in the store's database: then a pass is one
    /// of the store's writes.
    same_database: Option<SharedWrites>,
}

/// What a pass needs of the table: its statements and how its rows become changes.
struct Table {
    /// `host:port/db`, for messages (never the password).
    outbox: String,
    sql: Sql,
    /// Prefix of the rows' idempotency keys: the table's oid, so a table dropped and created
    /// again (ids restarting at 1) never matches the keys of the old one.
    key_prefix: String,
}

/// The transaction a pass runs in: its own on the outbox connection, or the store writer's.
#[async_trait]
trait PassTx: Send {
    async fn rows(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> store::Result<Vec<Row>>;
    async fn exec(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> store::Result<u64>;
    /// Appends the events of `changes`; they are published once they are committed.
    async fn append(&mut self, changes: Vec<NewEntityChange>) -> store::Result<()>;
}

/// A transaction on the outbox connection; the Store commits the appends on its own.
struct OwnTx<'a> {
    client: &'a Client,
    store: &'a Entities,
}

/// The statements of one table.
struct Sql {
    table: String,
    lock: String,
    select: String,
    reject: String,
    delete: String,
}

/// An open connection LISTENing on the table's channel.
struct Session {
    client: Client,
    /// Notified on every NOTIFY, and when the connection ends.
    wake: Arc<Notify>,
}

/// Connects, creates what is missing and starts consuming in the background; fails (so the
/// server does not start) when the database cannot be reached or the table cannot be created.
pub async fn start(
    cfg: OutboxConfig,
    store: &Store,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    check_table_name(&cfg.table)?;
    let mut pg: tokio_postgres::Config = cfg
        .url
        .parse()
        .map_err(|e| anyhow::anyhow!("--outbox: not a PostgreSQL URL: {e}"))?;
    pg.connect_timeout(Duration::from_secs(5));
    if pg.get_application_name().is_none() {
        pg.application_name("orgpulse-outbox");
    }
    let name = describe(&pg);
    let sql = Sql::for_table(&cfg.table);
    let session = Session::open(&pg, &sql.table)
        .await
        .map_err(|e| anyhow::anyhow!("--outbox {name}: {}", chain(&e)))?;
    let key_prefix = install(&session.client, &sql.table).await.map_err(|e| {
        anyhow::anyhow!(
            "--outbox {name}: creating table {}: {}",
            sql.table,
            chain(&e)
        )
    })?;
    // A table the product created itself must have the columns orgpulse reads and copies.
    for statement in [&sql.select, &sql.reject, &sql.delete] {
        session.client.prepare(statement).await.map_err(|e| {
            anyhow::anyhow!(
                "--outbox {name}: table {} does not fit: {}",
                sql.table,
                chain(&e)
            )
        })?;
    }
    let same_database = match &store.shared {
        Some(shared) => match shared.is_database_of(&session.client).await {
            Ok(same) => same.then(|| shared.clone()),
            Err(e) => {
                tracing::warn!(outbox = name, error = %e, "outbox: cannot tell whether it is the store's database; assuming not");
                None
            }
        },
        None => None,
    };
    let mode = if same_database.is_some() {
        "the store's database: each pass commits with its events in one transaction"
    } else {
        "not the store's database: events commit first, keyed by row, then the pass"
    };
    tracing::info!(
        outbox = name,
        table = sql.table,
        mode,
        "consuming the outbox"
    );
    let consumer = Consumer {
        table: Arc::new(Table {
            outbox: name,
            sql,
            key_prefix,
        }),
        pg,
        poll: cfg.poll,
        store: store.entities.clone(),
        same_database,
    };
    tokio::spawn(consumer.run(session, stop));
    Ok(())
}

/// A plain lower-case identifier short enough for its `_rejected` and `_notify` companions.
fn check_table_name(table: &str) -> anyhow::Result<()> {
    let ok = table.len() <= 50
        && table.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && table
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    anyhow::ensure!(
        ok,
        "--outbox-table {table:?}: expected 1-50 characters of [a-z0-9_], not starting with a digit"
    );
    Ok(())
}

/// Creates the table, `<table>_rejected` and the NOTIFY trigger when missing (under an advisory
/// lock, so nodes starting together do not race), adds the columns a table made by an older
/// orgpulse lacks; returns the idempotency key prefix. What needs a lock on the product's table
/// (the trigger, a column) is done only when missing, and never queues the product's inserts
/// for long ([`change_table`]).
async fn install(client: &Client, t: &str) -> Result<String, tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "BEGIN;
             SELECT pg_advisory_xact_lock(hashtext('orgpulse_outbox_schema'));
             CREATE TABLE IF NOT EXISTS {t} (
               id          bigserial PRIMARY KEY,
               org_id      text        NOT NULL,
               entity_type text        NOT NULL,
               entity_id   text        NOT NULL,
               action      text        NOT NULL,
               data        jsonb       NOT NULL DEFAULT '{{}}',
               user_id     text,
               actor       text,
               created_at  timestamptz NOT NULL DEFAULT now(),
               audience    jsonb,
               topics      text[]
             );
             CREATE TABLE IF NOT EXISTS {t}_rejected (
               id          bigint PRIMARY KEY,
               org_id      text,
               entity_type text,
               entity_id   text,
               action      text,
               data        jsonb,
               user_id     text,
               actor       text,
               created_at  timestamptz,
               error       text        NOT NULL,
               rejected_at timestamptz NOT NULL DEFAULT now(),
               audience    jsonb,
               topics      text[]
             );
             CREATE OR REPLACE FUNCTION {t}_notify() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN PERFORM pg_notify('{t}', ''); RETURN NULL; END $$;
             COMMIT;"
        ))
        .await?;
    let trigger = format!("{t}_notify");
    change_table(
        client,
        "SELECT 1 FROM pg_trigger WHERE tgrelid = $1::text::regclass AND tgname = $2::text",
        [t, &trigger],
        &format!(
            "CREATE OR REPLACE TRIGGER {t}_notify AFTER INSERT ON {t}
               FOR EACH STATEMENT EXECUTE FUNCTION {t}_notify()"
        ),
    )
    .await?;
    for table in [t.to_string(), format!("{t}_rejected")] {
        for (column, kind) in ADDED_COLUMNS {
            change_table(
                client,
                "SELECT 1 FROM pg_attribute
                 WHERE attrelid = $1::text::regclass AND attname = $2::text AND NOT attisdropped",
                [&table, column],
                &format!("ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}"),
            )
            .await?;
        }
    }
    let oid: i64 = client
        .query_one(&format!("SELECT '{t}'::regclass::oid::int8"), &[])
        .await?
        .get(0);
    Ok(format!("{oid}:"))
}

/// Columns added after the first release: a table made before them gets them at start.
const ADDED_COLUMNS: [(&str, &str); 2] = [("audience", "jsonb"), ("topics", "text[]")];
/// How long a change of the product's table may wait for its lock before it lets go and tries
/// again.
const TABLE_LOCK_WAIT: &str = "500ms";
/// Tries at a change of the product's table before start fails.
const TABLE_CHANGE_TRIES: u32 = 60;

/// Runs `ddl` on the product's table unless `exists` (a query of two text parameters) finds
/// it done, safely while the product keeps writing: the change (a catalog change, no rewrite)
/// needs a lock that conflicts with inserts, and a waiting lock request queues every insert
/// behind it; so it waits at most [`TABLE_LOCK_WAIT`] for the lock, then lets go, and tries
/// again a moment later.
async fn change_table(
    client: &Client,
    exists: &str,
    params: [&str; 2],
    ddl: &str,
) -> Result<(), tokio_postgres::Error> {
    let mut tries = 0;
    while client
        .query_opt(exists, &[&params[0], &params[1]])
        .await?
        .is_none()
    {
        let change = format!("BEGIN; SET LOCAL lock_timeout = '{TABLE_LOCK_WAIT}'; {ddl}; COMMIT;");
        match client.batch_execute(&change).await {
            Ok(()) => tracing::debug!(change = ddl, "outbox: table changed"),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                client.batch_execute("ROLLBACK").await?;
                tries += 1;
                if tries == TABLE_CHANGE_TRIES {
                    return Err(e);
                }
                tracing::warn!(
                    change = ddl,
                    "outbox: the table is busy; trying again shortly"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl Sql {
    fn for_table(t: &str) -> Sql {
        Sql {
            table: t.to_string(),
            lock: format!("SELECT pg_try_advisory_xact_lock(hashtext('orgpulse_outbox:{t}'))"),
            select: format!(
                "SELECT id, org_id, entity_type, entity_id, action, data::text, user_id, actor,
                   audience::text, topics
                 FROM {t} ORDER BY id LIMIT {BATCH} FOR UPDATE SKIP LOCKED"
            ),
            reject: format!(
                "INSERT INTO {t}_rejected
                   (id, org_id, entity_type, entity_id, action, data, user_id, actor, created_at,
                    audience, topics, error)
                 SELECT id, org_id, entity_type, entity_id, action, data, user_id, actor, created_at,
                   audience, topics, $2
                 FROM {t} WHERE id = $1
                 ON CONFLICT (id) DO NOTHING"
            ),
            delete: format!("DELETE FROM {t} WHERE id = ANY($1)"),
        }
    }
}

impl Session {
    async fn open(
        pg: &tokio_postgres::Config,
        channel: &str,
    ) -> Result<Session, tokio_postgres::Error> {
        let (client, mut conn) = pg.connect(NoTls).await?;
        let wake = Arc::new(Notify::new());
        let woken = wake.clone();
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(_)) => woken.notify_one(),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = chain(&e), "outbox connection lost");
                        break;
                    }
                }
            }
            // The consumer finds the client closed and reconnects.
            woken.notify_one();
        });
        client.batch_execute(&format!("LISTEN {channel}")).await?;
        Ok(Session { client, wake })
    }
}

impl Consumer {
    async fn run(self, first: Session, stop: CancellationToken) {
        let mut session = Some(first);
        let mut backoff = Duration::from_millis(100);
        loop {
            let current = match session.take() {
                Some(s) => s,
                None => match Session::open(&self.pg, &self.table.sql.table).await {
                    Ok(s) => {
                        tracing::info!(outbox = self.table.outbox, "outbox connection reopened");
                        s
                    }
                    Err(e) => {
                        tracing::warn!(
                            outbox = self.table.outbox,
                            error = chain(&e),
                            "outbox: cannot connect; retrying"
                        );
                        if pause(&stop, backoff).await {
                            return;
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                },
            };
            match self.drain(&current.client).await {
                Ok(()) => {
                    backoff = Duration::from_millis(100);
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = current.wake.notified() => {}
                        _ = tokio::time::sleep(self.poll) => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(outbox = self.table.outbox, error = %e, "outbox pass failed; retrying");
                    if pause(&stop, backoff).await {
                        return;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
            if !current.client.is_closed() {
                session = Some(current);
            }
        }
    }

    /// Passes until one takes less than a full batch (or another node holds the table).
    async fn drain(&self, client: &Client) -> anyhow::Result<()> {
        while self.pass(client).await? == BATCH as usize {}
        Ok(())
    }

    /// One transaction: up to BATCH rows become events (or rejected rows) and are deleted.
    /// Returns the rows taken.
    async fn pass(&self, client: &Client) -> anyhow::Result<usize> {
        let (taken, rejected) = match &self.same_database {
            Some(shared) => {
                let table = self.table.clone();
                shared
                    .write(move |mut tx| {
                        let table = table.clone();
                        Box::pin(async move { table.take(&mut tx).await })
                    })
                    .await?
            }
            None => self.pass_on(client).await?,
        };
        METRICS.outbox_rows.add(taken as u64);
        METRICS.outbox_rejected.add(rejected);
        Ok(taken)
    }

    /// A pass in a transaction of its own on the outbox connection.
    async fn pass_on(&self, client: &Client) -> anyhow::Result<(usize, u64)> {
        client.batch_execute("BEGIN").await.map_err(pg)?;
        let mut tx = OwnTx {
            client,
            store: &self.store,
        };
        let taken = self.table.take(&mut tx).await;
        let end = if taken.is_ok() { "COMMIT" } else { "ROLLBACK" };
        let ended = client.batch_execute(end).await.map_err(pg);
        let taken = taken?;
        ended?;
        Ok(taken)
    }
}

impl Table {
    /// Up to BATCH rows become events (or rejected rows) and are deleted in `tx`. Returns the rows
    /// taken and how many of them were rejected.
    async fn take(&self, tx: &mut impl PassTx) -> store::Result<(usize, u64)> {
        let locked: bool = tx
            .rows(&self.sql.lock, &[])
            .await?
            .first()
            .is_some_and(|r| r.get(0));
        if !locked {
            // Another node is on it; its COMMIT will not notify, so the poll picks up what it
            // leaves.
            return Ok((0, 0));
        }
        let rows = tx.rows(&self.sql.select, &[]).await?;
        let mut rejected = 0;
        let mut ids = Vec::with_capacity(rows.len());
        let mut changes = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: i64 = row.get(0);
            ids.push(id);
            match self.change_of(id, row) {
                Ok(change) => changes.push(change),
                Err(why) => {
                    tracing::warn!(outbox = self.outbox, id, error = why, "outbox row rejected");
                    tx.exec(&self.sql.reject, &[&id, &why]).await?;
                    rejected += 1;
                }
            }
        }
        if !changes.is_empty() {
            tx.append(changes).await?;
        }
        if !ids.is_empty() {
            tx.exec(&self.sql.delete, &[&ids]).await?;
        }
        Ok((rows.len(), rejected))
    }

    /// The entity change a row asks for, or why it is rejected.
    fn change_of(&self, id: i64, row: &Row) -> Result<NewEntityChange, String> {
        let text = |i: usize, column: &str| -> Result<String, String> {
            row.try_get::<_, Option<String>>(i)
                .map_err(|e| format!("{column}: {e}"))?
                .ok_or_else(|| format!("{column} is required"))
        };
        let org = text(1, "org_id")?;
        validate::id("org_id", &org).map_err(|e| e.to_string())?;
        let data = match text(5, "data")?.as_str() {
            "" => None,
            json => match serde_json::from_str(json) {
                Ok(serde_json::Value::Object(o)) => Some(json_struct(o)),
                Ok(_) => return Err("data must be a JSON object".into()),
                Err(e) => return Err(format!("data: {e}")),
            },
        };
        let change = EntityChanged {
            entity_type: text(2, "entity_type")?,
            entity_id: text(3, "entity_id")?,
            action: text(4, "action")?,
            data,
            user_id: row.get::<_, Option<String>>(6).unwrap_or_default(),
        };
        validate::entity_change(&change).map_err(|e| e.to_string())?;
        let actor = row
            .get::<_, Option<String>>(7)
            .unwrap_or_else(|| DEFAULT_ACTOR.into());
        validate::id("actor", &actor).map_err(|e| e.to_string())?;
        let audience = match row.get::<_, Option<String>>(8) {
            None => Audience::from_request(None, &change.user_id),
            Some(json) => Audience::from_json(&json, &change.user_id),
        }
        .map_err(|e| e.to_string())?;
        let topics = row
            .try_get::<_, Option<Vec<String>>>(9)
            .map_err(|e| format!("topics: {e}"))?
            .unwrap_or_default();
        audience::event_topics("topics", &topics).map_err(|e| e.to_string())?;
        Ok(NewEntityChange {
            org,
            actor,
            change,
            audience,
            topics,
            request_kind: RequestKind::Outbox,
            request_id: format!("{}{id}", self.key_prefix),
        })
    }
}

#[async_trait]
impl PassTx for OwnTx<'_> {
    async fn rows(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> store::Result<Vec<Row>> {
        self.client.query(sql, params).await.map_err(internal)
    }

    async fn exec(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> store::Result<u64> {
        self.client.execute(sql, params).await.map_err(internal)
    }

    async fn append(&mut self, changes: Vec<NewEntityChange>) -> store::Result<()> {
        self.store.append_entity_changes(changes).await.map(drop)
    }
}

#[async_trait]
impl PassTx for SharedTx<'_> {
    async fn rows(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> store::Result<Vec<Row>> {
        SharedTx::rows(self, sql, params).await
    }

    async fn exec(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> store::Result<u64> {
        SharedTx::exec(self, sql, params).await
    }

    async fn append(&mut self, changes: Vec<NewEntityChange>) -> store::Result<()> {
        self.append_entity_changes(changes).await.map(drop)
    }
}

/// Waits `delay` unless `stop` comes first (then true).
async fn pause(stop: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(delay) => false,
    }
}

fn pg(e: tokio_postgres::Error) -> anyhow::Error {
    anyhow::anyhow!("{}", chain(&e))
}

fn internal(e: tokio_postgres::Error) -> StoreError {
    StoreError::Internal(chain(&e))
}

/// A JSON object as a protobuf Struct.
fn json_struct(object: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    fn value(v: serde_json::Value) -> prost_types::Value {
        use prost_types::value::Kind;
        let kind = match v {
            serde_json::Value::Null => Kind::NullValue(0),
            serde_json::Value::Bool(b) => Kind::BoolValue(b),
            serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
            serde_json::Value::String(s) => Kind::StringValue(s),
            serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
                values: a.into_iter().map(value).collect(),
            }),
            serde_json::Value::Object(o) => Kind::StructValue(json_struct(o)),
        };
        prost_types::Value { kind: Some(kind) }
    }
    prost_types::Struct {
        fields: object.into_iter().map(|(k, v)| (k, value(v))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers() {
        assert!(check_table_name("orgpulse_outbox").is_ok());
        assert!(check_table_name("_o2").is_ok());
        for bad in ["", "2x", "Outbox", "a;drop", "a.b", &"a".repeat(51)] {
            assert!(check_table_name(bad).is_err(), "{bad:?}");
        }
    }
}
