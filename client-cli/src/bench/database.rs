//! A PostgreSQL database of the bench's own on the server of `--pg-admin-url`: the `outbox`
//! scenario's product database, or the store of the started nodes (`--postgres`, `--nodes N`).
//! Created as `orgpulse_bench_<random>`, dropped with whatever is still connected at the end.
use tokio_postgres::{Client, NoTls};

use super::server::fail;
use crate::error::CliError;

/// The bench's own database on the PostgreSQL server of the admin URL.
pub struct Database {
    admin_url: String,
    pub name: String,
    pub url: String,
}

pub async fn connect(url: &str) -> Result<Client, CliError> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| fail(format!("connecting to PostgreSQL {url}: {e}")))?;
    tokio::spawn(conn);
    Ok(client)
}

pub fn sql_error(what: &str) -> impl Fn(tokio_postgres::Error) -> CliError + '_ {
    move |e| fail(format!("{what}: {e}"))
}

impl Database {
    /// `CREATE DATABASE orgpulse_bench_<random>` through `admin_url`
    /// (`postgres://USER@HOST:PORT/DB`, any existing DB).
    pub async fn create(admin_url: &str) -> Result<Database, CliError> {
        let (server, _) = admin_url.rsplit_once('/').ok_or_else(|| {
            CliError::usage(format!(
                "--pg-admin-url {admin_url:?}: expected postgres://USER@HOST:PORT/DB"
            ))
        })?;
        let name = format!("orgpulse_bench_{:016x}", rand::random::<u64>());
        connect(admin_url)
            .await?
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .map_err(sql_error("CREATE DATABASE"))?;
        Ok(Database {
            admin_url: admin_url.to_string(),
            url: format!("{server}/{name}"),
            name,
        })
    }

    /// Drops the database and whatever is still connected to it.
    pub async fn drop(self) -> Result<(), CliError> {
        connect(&self.admin_url)
            .await?
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .map_err(sql_error("DROP DATABASE"))
    }
}
