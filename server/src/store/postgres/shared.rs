//! The one capability the PostgreSQL engine offers beyond the store's interfaces: writes that run
//! statements of their own in the store's write transaction, for a consumer of a table in the
//! store's own database (the outbox), so that what it reads and deletes commits together with the
//! events it appends. Nothing else of the engine is reachable through it.
use std::sync::Arc;

use futures::future::BoxFuture;
use tokio_postgres::{Client, Row, types::ToSql};

use super::{PostgresStore, tx::Tx};
use crate::store::{NewEntityChange, Result, ops};

/// Shared writes on one PostgreSQL store.
#[derive(Clone)]
pub struct SharedWrites(Arc<PostgresStore>);

/// The store's open write transaction, as a shared write sees it.
pub struct SharedTx<'a>(&'a mut Tx);

impl SharedWrites {
    pub(crate) fn new(store: Arc<PostgresStore>) -> SharedWrites {
        SharedWrites(store)
    }

    /// Whether `client` is connected to this store's database: the same server (its
    /// `system_identifier`, whatever address or spelling reached it) and the same database (its
    /// oid).
    pub async fn is_database_of(&self, client: &Client) -> anyhow::Result<bool> {
        const WHICH: &str = "SELECT system_identifier::text || '/' || d.oid::text
             FROM pg_control_system(), pg_database d WHERE d.datname = current_database()";
        let ours = self.0.conn().await?;
        let ours: String = ours.query_one(WHICH, &[]).await?.get(0);
        let theirs: String = client.query_one(WHICH, &[]).await?.get(0);
        Ok(ours == theirs)
    }

    /// Runs `f` as one write of the store's next group commit (possibly more than once, each
    /// time in a fresh transaction: `f` must not consume what it captured).
    pub async fn write<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: for<'a> Fn(SharedTx<'a>) -> BoxFuture<'a, Result<R>> + Send + 'static,
    {
        let (write, answer) = ops::Write::new(None, move |tx: &mut Tx| f(SharedTx(tx)));
        self.0.queue(write).await?;
        answer.await
    }
}

impl SharedTx<'_> {
    /// The rows of `sql`, in the store's transaction.
    pub async fn rows(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        self.0.query(sql, params).await
    }

    /// Runs `sql` in the store's transaction; the rows it changed.
    pub async fn exec(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        self.0.execute(sql, params).await
    }

    /// `Entities::append_entity_changes`, in the store's transaction: the events are published
    /// once it commits.
    pub async fn append_entity_changes(
        &mut self,
        changes: Vec<NewEntityChange>,
    ) -> Result<Vec<u64>> {
        ops::append_entity_changes(&mut *self.0, changes).await
    }
}
