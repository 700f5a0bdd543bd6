//! Support for the cluster tests: several real `orgpulse-server` nodes on one fresh PostgreSQL
//! database and one NATS server (the machine's on 4222 with a random subject prefix per test, or
//! a `nats-server` of the test's own on a free port when the test kills it).
//!
//! Without PostgreSQL or NATS the tests skip with the reason printed; under `CI=true` they fail.
#![allow(dead_code)]

use std::{
    net::{TcpListener, TcpStream},
    process::Stdio,
    time::Duration,
};

use tokio::process::{Child, Command};

use crate::support::{
    ServerOpts, TempDir, TestServer, name_connections, new_postgres_database, share_database,
};

const POSTGRES: &str = "127.0.0.1:5432";
const MACHINE_NATS: &str = "127.0.0.1:4222";
const NATS_SERVER: &str = "/usr/sbin/nats-server";

/// Whether PostgreSQL and NATS (and, with `own_nats`, the `nats-server` binary) are here. When
/// one is missing: under `CI=true` a panic naming it, else false after printing why the test is
/// skipped.
pub fn services_or_skip(own_nats: bool) -> bool {
    let missing = if TcpStream::connect(POSTGRES).is_err() {
        Some(format!(
            "PostgreSQL is not accepting connections at {POSTGRES}"
        ))
    } else if !own_nats && TcpStream::connect(MACHINE_NATS).is_err() {
        Some(format!(
            "NATS is not accepting connections at {MACHINE_NATS}"
        ))
    } else if own_nats && !std::path::Path::new(NATS_SERVER).exists() {
        Some(format!("{NATS_SERVER} is not installed"))
    } else {
        None
    };
    match missing {
        None => true,
        Some(why) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("cluster test needs its services: {why}")
        }
        Some(why) => {
            eprintln!("skipped: {why}");
            false
        }
    }
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `nats-server` of this test's own, on a free port.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
}

impl NatsServer {
    pub async fn start() -> NatsServer {
        let mut nats = NatsServer {
            child: None,
            port: free_port(),
        };
        nats.restart().await;
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// (Re)starts it on its port and waits until it accepts connections.
    pub async fn restart(&mut self) {
        let child = Command::new(NATS_SERVER)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        for _ in 0..200 {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("nats-server did not listen on {} within 5 s", self.port);
    }

    /// SIGKILL.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().unwrap();
            let _ = child.wait().await;
        }
    }
}

/// N nodes on one fresh database and one NATS server.
pub struct Cluster {
    pub nodes: Vec<TestServer>,
    /// The database's owner (dropped last: drops the database).
    db: TempDir,
    node_dirs: Vec<TempDir>,
}

impl Cluster {
    /// `n` nodes `node0..` on the machine's NATS under a random subject prefix.
    pub async fn start(n: usize, extra: &[&str]) -> Cluster {
        Self::start_on(&format!("nats://{MACHINE_NATS}"), n, extra).await
    }

    /// `n` nodes on the NATS server at `nats`, under a random subject prefix.
    pub async fn start_on(nats: &str, n: usize, extra: &[&str]) -> Cluster {
        let db = TempDir::new("cluster-db");
        new_postgres_database(&db.0);
        let prefix = format!("orgpulse-test-{:016x}", rand::random::<u64>());
        let mut cluster = Cluster {
            nodes: vec![],
            db,
            node_dirs: vec![],
        };
        for i in 0..n {
            let dir = TempDir::new("cluster-node");
            share_database(&cluster.db.0, &dir.0);
            // In pg_stat_activity as `orgpulse-node0`, ...: a test can see what a node holds.
            name_connections(&dir.0, &format!("orgpulse-node{i}"));
            let mut args: Vec<String> = [
                "--nats",
                nats,
                "--nats-subject-prefix",
                &prefix,
                "--node-id",
                &format!("node{i}"),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            args.extend(extra.iter().map(|s| s.to_string()));
            let node = TestServer::start_with(ServerOpts {
                extra_args: args,
                dir: Some(dir.0.clone()),
                ..Default::default()
            })
            .await;
            cluster.nodes.push(node);
            cluster.node_dirs.push(dir);
        }
        cluster
    }

    /// The shared database's data directory (for `log_of`).
    pub fn db_dir(&self) -> &std::path::Path {
        &self.db.0
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The nodes end before their database is dropped.
        for node in &mut self.nodes {
            let _ = node.child.start_kill();
        }
    }
}
