//! `orgpulse bench`: fan-out measured the way the socket.io peer harness measures it. Starts (or
//! targets) a server, opens S subscribers each on its own HTTP/2 connection, waits until all are
//! caught up, publishes E job updates through the public API, and prints one JSON line: deliveries
//! expected/received, throughput, commit→receipt latency, server CPU per delivery and RSS per
//! connection. Any loss, reordering or broken stream makes the exit code non-zero. The `orgs`
//! scenario (orgs.rs) instead measures what many idle orgs cost the server; the `outbox` scenario
//! (outbox.rs) publishes by committing outbox rows in PostgreSQL instead of calling the API; the
//! `presence` scenario has writers broadcast on one topic instead (ephemeral, never stored) from
//! a thread and runtime of their own, their latency being send→receipt. The `hundredk` scenario
//! (hundredk.rs) holds 100,000 subscribers on one node, most of them multiplexed over shared
//! connections.
//! The `floor` scenario (floor.rs) runs no server: it writes e's bytes to e's connections at e's
//! rate from a thread of its own, the yardstick for e's server CPU per delivery.
//! `--nodes N` starts a cluster instead (N nodes on a PostgreSQL database of the bench's own and
//! one NATS server): subscribers and writers alternate over the nodes, and the deliveries written
//! through another node than the subscriber's get a latency histogram of their own. The `storm`
//! scenario (storm.rs) kills one of two nodes under its subscribers and measures them resuming on
//! the other.
mod database;
mod floor;
mod histogram;
mod hundredk;
mod orgs;
mod outbox;
mod own_connection;
mod server;
mod storm;
mod subscriber;
mod writer;

use std::{
    collections::HashMap, path::PathBuf, sync::Arc, sync::atomic::Ordering::Relaxed, time::Duration,
};

use clap::{Args, ValueEnum};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::{
    error::CliError,
    mint::{Signer, mint},
};
use database::Database;
use server::{Target, Usage, fail};
use subscriber::{Counted, Dial, Placement, Subscriber, Tally, Via};
use writer::{Published, Writer};

/// A named benchmark shape (sizes match the socket.io peer's run.sh where it has one).
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum Scenario {
    /// 1,000 subscribers x 1,000 events, max rate.
    A,
    /// 100 subscribers x 20,000 events, max rate.
    B,
    /// 10,000 idle subscribers (memory per connection).
    C,
    /// 1,000 subscribers, 50 events/s for 10 s.
    E,
    /// e's deliveries without a server: e's framed event bytes written to e's 1,000 loopback
    /// connections at e's rate by a thread pinned like the server (the floor of e's CPU).
    Floor,
    /// 8 concurrent writers, 100 subscribers: committed writes/s.
    Ingest,
    /// One subscriber resuming 100,000 events behind: events/s until caught_up.
    Catchup,
    /// 20,000 subscribers on several source addresses, all receiving a broadcast.
    Scale,
    /// 5,000 orgs (--orgs) with one idle subscriber each, over shared HTTP/2 connections: server
    /// CPU while nothing is published (--seconds).
    Orgs,
    /// 1,000 orgs (--orgs) on a PostgreSQL database of the bench's own, each with one job written
    /// and one idle subscriber: the transactions/s the idle node runs there (pg_stat_database over
    /// --seconds, default 120 s: one retention pass at least).
    IdlePg,
    /// 100 subscribers, 1,000 outbox rows committed at 200/s (one per transaction) in a PostgreSQL
    /// database of its own (--pg-admin-url): COMMIT→receipt latency through NOTIFY.
    Outbox,
    /// 10,000 subscribers of one org, each in 1 of --audience-groups groups (1 % admins), 50
    /// events/s for 10 s, each addressed to one group and the admins: authorized fan-out.
    Audience,
    /// 1,000 subscribers of one topic, 100 of them also broadcasting on it at 10/s each for 10 s
    /// (typing, cursors): ephemeral fan-out, never stored, send→receipt latency.
    Presence,
    /// 2 nodes; 20,000 subscribers on node A over 200 orgs (--orgs), 50 streams per HTTP/2
    /// connection; 1,000 writes at 100/s through node B; A is SIGKILLed a quarter of the way in
    /// and every stream resumes on B with its cursor: time until all are caught up, PostgreSQL
    /// transactions per org, B's peak RSS and CPU, every event exactly once in order.
    Storm,
    /// 100,000 subscribers on one node: 19,000 (--own-connections) on connections of their own,
    /// the rest 100 streams per HTTP/2 connection: RSS per connection and per extra stream, idle
    /// CPU per stream (--seconds), one event to all.
    Hundredk,
}

struct Shape {
    subscribers: usize,
    events: u64,
    rate: f64,
    writers: usize,
    settle: Duration,
}

impl Scenario {
    fn shape(self) -> Shape {
        let (subscribers, events, rate, writers, settle_ms) = match self {
            Scenario::A => (1_000, 1_000, 0.0, 1, 1000),
            Scenario::B => (100, 20_000, 0.0, 1, 1000),
            Scenario::C => (10_000, 0, 0.0, 1, 3000),
            Scenario::E | Scenario::Floor => (1_000, 500, 50.0, 1, 1000),
            Scenario::Ingest => (100, 20_000, 0.0, 8, 1000),
            Scenario::Catchup => (1, 100_000, 0.0, 8, 0),
            Scenario::Scale => (20_000, 10, 0.0, 1, 3000),
            Scenario::Orgs => (5_000, 0, 0.0, 1, 3000),
            // PostgreSQL reports a backend's counts up to 10 s late: the settle pause keeps the
            // writes and subscriptions out of the idle window.
            Scenario::IdlePg => (1_000, 0, 0.0, 1, 11_000),
            Scenario::Outbox => (100, 1_000, 200.0, 1, 1000),
            Scenario::Audience => (10_000, 500, 50.0, 100, 3000),
            Scenario::Presence => (1_000, 10_000, 1_000.0, 100, 1000),
            Scenario::Storm => (20_000, 1_000, 100.0, 1, 0),
            Scenario::Hundredk => (100_000, 1, 0.0, 1, 3000),
        };
        Shape {
            subscribers,
            events,
            rate,
            writers,
            settle: Duration::from_millis(settle_ms),
        }
    }
}

/// `bench` flags.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(long, value_enum)]
    pub scenario: Scenario,
    /// Bench the already running server at --server whose HS256 secret is in this file (default:
    /// start a server with a fresh data directory and secret, pinned to --server-cpus).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// The server binary to start (default: `orgpulse-server` beside this binary, else on PATH).
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
    /// Extra flag for the started server; repeatable (e.g. --server-arg=--subscriber-queue=8192).
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    pub server_args: Vec<String>,
    /// CPUs the started server is pinned to (taskset list; empty = not pinned).
    #[arg(long, default_value = "0")]
    pub server_cpus: String,
    /// CPUs this process is pinned to (empty = not pinned).
    #[arg(long, default_value = "1")]
    pub client_cpus: String,
    /// Override the scenario's subscriber count.
    #[arg(long)]
    pub subscribers: Option<usize>,
    /// audience: how many groups the subscribers are split into, one writer's job addressed to
    /// each; 0 = the same run without audiences (every subscriber receives every event).
    #[arg(long, default_value_t = 100)]
    pub audience_groups: usize,
    /// audience: the groups as orgs instead of audiences (the baseline the authorized fan-out is
    /// compared with): each event reaches one group's subscribers, unfiltered, over the same
    /// 10,000 connections, and each subscriber receives the same share of the events.
    #[arg(long)]
    pub rooms: bool,
    /// orgs: how many orgs, one subscriber each (default 5,000); storm: how many orgs the
    /// subscribers are spread over (default 200).
    #[arg(long)]
    pub orgs: Option<usize>,
    /// orgs, idle-pg, hundredk: how long the idle server is measured (default 20 s; idle-pg:
    /// 120 s, so that one whole retention pass, every 60 s plus its own duration, falls in it).
    #[arg(long, value_parser = duration)]
    pub seconds: Option<Duration>,
    /// hundredk: subscribers on connections of their own (default 19,000), the rest multiplexed;
    /// storm: likewise (default: none up to 20,000 subscribers, else 19,000 less one per org).
    #[arg(long)]
    pub own_connections: Option<usize>,
    /// Override the scenario's event count (catchup: the backlog).
    #[arg(long)]
    pub events: Option<u64>,
    /// Override the scenario's publish rate in events/s (0 = as fast as the writers go).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Override the scenario's number of concurrent writers.
    #[arg(long)]
    pub writers: Option<usize>,
    /// Override the pause between "all subscribed" and the RSS snapshot.
    #[arg(long, value_parser = duration)]
    pub settle: Option<Duration>,
    /// Source addresses 127.0.0.1..=127.0.0.N the subscribers connect from (default: one per
    /// 8,000 subscribers).
    #[arg(long)]
    pub source_addrs: Option<usize>,
    /// Subscriptions opened at the same time while connecting.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
    /// Give up when no delivery arrived for this long.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub stall: Duration,
    /// Upper bound of each phase (connect, publish, delivery).
    #[arg(long, default_value = "120s", value_parser = duration)]
    pub phase_timeout: Duration,
    /// Organization to use.
    #[arg(long, default_value = "bench")]
    pub org: String,
    /// The PostgreSQL server (any existing database on it) where the outbox scenario, --postgres
    /// and --nodes create and finally drop a database of their own.
    #[arg(
        long,
        visible_alias = "pg-url",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    pub pg_admin_url: String,
    /// Start this many server nodes (a cluster when more than one: they share a PostgreSQL
    /// database of the bench's own, one NATS server and one secret, all pinned to --server-cpus).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub nodes: u16,
    /// Run the started server on a PostgreSQL database of the bench's own instead of SQLite
    /// (implied by --nodes 2 or more).
    #[arg(long)]
    pub postgres: bool,
    /// The NATS server of the --nodes cluster (each run uses a subject prefix of its own).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats: String,
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

impl BenchArgs {
    /// How long the idle server is measured (`--seconds`, else the scenario's default).
    fn idle_window(&self) -> Duration {
        self.seconds.unwrap_or(match self.scenario {
            Scenario::IdlePg => Duration::from_secs(120),
            _ => Duration::from_secs(20),
        })
    }
}

/// Runs one scenario against `url` (used only with --secret-file) and prints its JSON line.
pub async fn run(mut args: BenchArgs, url: &str) -> Result<(), CliError> {
    if args.scenario == Scenario::Storm {
        // A node to kill and one to resume on.
        args.nodes = args.nodes.max(2);
    }
    let mut shape = args.scenario.shape();
    let subscribers = match args.scenario {
        Scenario::Orgs | Scenario::IdlePg => args.orgs.or(args.subscribers),
        _ => args.subscribers,
    };
    shape.subscribers = subscribers.unwrap_or(shape.subscribers);
    shape.events = args.events.unwrap_or(shape.events);
    shape.rate = args.rate.unwrap_or(shape.rate);
    // A cluster has a writer on each node at least.
    let writers = shape.writers.max(args.nodes.into());
    shape.writers = args.writers.unwrap_or(writers).max(1);
    shape.settle = args.settle.unwrap_or(shape.settle);
    let per_sender = shape.rate / shape.writers as f64;
    if args.scenario == Scenario::Presence
        && !(per_sender > 0.0 && per_sender <= writer::BROADCASTS_PER_USER)
    {
        return Err(CliError::usage(format!(
            "--scenario presence: --rate / --writers must be above 0 and at most {} broadcasts/s \
             per sender (the server's limit per user), not {per_sender}",
            writer::BROADCASTS_PER_USER
        )));
    }
    // One socket per subscriber (orgs: per shared connection) and writer here and in a started
    // server (which inherits the limit), plus a few dozen for the database and stdio.
    let sockets = match args.scenario {
        Scenario::Orgs => shape.subscribers.div_ceil(orgs::STREAMS_PER_CONNECTION),
        Scenario::IdlePg => {
            shape.subscribers.div_ceil(orgs::STREAMS_PER_CONNECTION) + args.connect_concurrency
        }
        // The connections to A, then (each closed by A's death before it is dialled again) to
        // B, and a writer per org.
        Scenario::Storm => {
            storm::split(&args, shape.subscribers).connections()
                + args.orgs.unwrap_or(storm::DEFAULT_ORGS)
        }
        Scenario::Hundredk => {
            hundredk::Split::of(&args, shape.subscribers).connections() + shape.writers
        }
        _ => shape.subscribers + shape.writers,
    };
    server::raise_nofile(sockets as u64 + 64)?;
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    server::pin_self(&args.client_cpus)?;
    let store_on_postgres = args.postgres || args.nodes > 1 || args.scenario == Scenario::IdlePg;
    if args.secret_file.is_some() && (args.scenario == Scenario::Outbox || store_on_postgres) {
        return Err(CliError::usage(
            "--scenario outbox, --postgres and --nodes start their own servers: drop --secret-file",
        ));
    }
    if args.nodes > 1
        && matches!(
            args.scenario,
            Scenario::Orgs | Scenario::IdlePg | Scenario::Outbox | Scenario::Hundredk
        )
    {
        return Err(CliError::usage(
            "--nodes: the orgs, idle-pg, outbox and hundredk scenarios run on one node",
        ));
    }
    let outbox_db = match args.scenario {
        Scenario::Outbox => Some(Database::create(&args.pg_admin_url).await?),
        _ => None,
    };
    let store_db = match store_on_postgres {
        true => Database::create(&args.pg_admin_url).await.map(Some),
        false => Ok(None),
    };
    let result = match &store_db {
        Ok(store) => {
            start_and_measure(&args, &shape, url, outbox_db.as_ref(), store.as_ref()).await
        }
        Err(_) => Ok(Value::Null),
    };
    let mut dropped = Vec::new();
    for (field, db) in [("outboxDatabase", outbox_db), ("storeDatabase", store_db?)] {
        if let Some(db) = db {
            dropped.push((field, db.name.clone(), db.drop().await));
        }
    }
    let mut out = result?;
    for (field, name, result) in dropped {
        result?;
        out[field] = name.into();
    }
    let ok = out["lost"] == 0
        && out["outOfOrder"] == 0
        && out["brokenStreams"] == 0
        && out["connectFailures"] == 0;
    out["ok"] = ok.into();
    out["serverCpus"] = args.server_cpus.clone().into();
    out["clientCpus"] = args.client_cpus.clone().into();
    out["nproc"] = nproc.into();
    println!("{out}");
    if ok {
        Ok(())
    } else {
        Err(fail(format!(
            "bench {:?} failed: lost {}, out of order {}, broken streams {}, connect failures {}{}",
            args.scenario,
            out["lost"],
            out["outOfOrder"],
            out["brokenStreams"],
            out["connectFailures"],
            out["firstError"]
                .as_str()
                .map(|e| format!(" (first error: {e})"))
                .unwrap_or_default()
        )))
    }
}

/// Attaches to or starts the server or nodes (consuming `outbox` when given, storing in `store`
/// when given), measures, stops them.
async fn start_and_measure(
    args: &BenchArgs,
    shape: &Shape,
    url: &str,
    outbox: Option<&Database>,
    store: Option<&Database>,
) -> Result<Value, CliError> {
    if args.scenario == Scenario::Floor {
        return floor::measure(args, shape).await;
    }
    let mut nodes = Vec::new();
    let started = match &args.secret_file {
        Some(secret) => Target::attach(url, secret).map(|t| nodes.push(t)),
        None => start_nodes(args, outbox, store, &mut nodes).await,
    };
    let result = match (started, args.scenario, store) {
        (Err(e), _, _) => Err(e),
        (Ok(()), Scenario::Orgs | Scenario::IdlePg, store) => {
            orgs::measure(args, shape, &nodes[0], store).await
        }
        (Ok(()), Scenario::Storm, Some(store)) => {
            storm::measure(args, shape, &mut nodes, store).await
        }
        (Ok(()), Scenario::Hundredk, _) => hundredk::measure(args, shape, &nodes[0]).await,
        (Ok(()), _, _) => measure(args, shape, &nodes, outbox).await,
    };
    for node in nodes {
        node.stop().await;
    }
    let mut out = result?;
    out["nodes"] = args.nodes.into();
    Ok(out)
}

/// Starts --nodes servers into `nodes`: node 0 with a fresh secret, the others with the same one;
/// more than one node is a cluster on `store` and --nats under a subject prefix of this run's own.
async fn start_nodes(
    args: &BenchArgs,
    outbox: Option<&Database>,
    store: Option<&Database>,
    nodes: &mut Vec<Target>,
) -> Result<(), CliError> {
    let prefix = format!("orgpulse-bench-{:016x}", rand::random::<u64>());
    for i in 0..args.nodes {
        let mut extra = outbox.map(outbox::server_args).unwrap_or_default();
        if let Some(db) = store {
            extra.push(format!("--database={}", db.url));
        }
        if args.nodes > 1 {
            extra.extend([
                format!("--nats={}", args.nats),
                format!("--nats-subject-prefix={prefix}"),
                format!("--node-id=node{i}"),
            ]);
        }
        extra.extend(args.server_args.iter().cloned());
        let secret = nodes.first().map(|n: &Target| n.secret_file.clone());
        let bin = server_bin(args);
        nodes.push(Target::start(&bin, &args.server_cpus, &extra, secret.as_deref()).await?);
    }
    Ok(())
}

/// What makes the events: job updates or broadcasts through the API, or outbox rows committed in
/// PostgreSQL.
enum Publisher {
    Jobs(Vec<Writer>),
    /// The broadcasters, made and run on a thread of their own (see [`Publisher::publish`]).
    Broadcasts(Vec<Broadcaster>),
    Outbox(outbox::Inserter),
}

/// What a broadcaster is made of: its node's URL, its token, org and user.
struct Broadcaster {
    url: String,
    token: String,
    org: String,
    user: String,
}

impl Publisher {
    fn counted(&self) -> Counted {
        match self {
            Publisher::Jobs(_) => Counted::Jobs,
            Publisher::Broadcasts(_) => Counted::Broadcasts,
            Publisher::Outbox(inserter) => Counted::OutboxRows(inserter.commits()),
        }
    }

    async fn publish(&mut self, total: u64, rate: f64) -> Result<Published, CliError> {
        match self {
            Publisher::Jobs(writers) => writer::publish(writers, total, rate).await,
            Publisher::Broadcasts(senders) => {
                // A broadcast's latency starts at its sender's stamp: the senders (100 browsers
                // in the shape) get a thread and a runtime of their own, on the bench's core,
                // rather than waiting behind the 1,000 subscribers' reading for every step of
                // each call. The thread's runtime makes their connections, so they stay on it.
                let senders = std::mem::take(senders);
                let (done, result) = tokio::sync::oneshot::channel();
                std::thread::Builder::new()
                    .name("broadcasters".into())
                    .spawn(move || {
                        let _ = done.send(broadcast_on_own_thread(&senders, total, rate));
                    })
                    .map_err(|e| fail(format!("starting the broadcasters' thread: {e}")))?;
                result
                    .await
                    .map_err(|_| fail("the broadcasters' thread failed"))?
            }
            Publisher::Outbox(inserter) => inserter.publish(total, rate).await,
        }
    }
}

/// Makes the broadcasters and publishes `total` broadcasts through them at `rate`, on a runtime
/// of the calling thread.
fn broadcast_on_own_thread(
    senders: &[Broadcaster],
    total: u64,
    rate: f64,
) -> Result<Published, CliError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(format!("the broadcasters' runtime: {e}")))?;
    runtime.block_on(async {
        let writers = senders
            .iter()
            .map(|b| Writer::broadcaster(&b.url, &b.token, &b.org, &b.user))
            .collect::<Result<Vec<_>, _>>()?;
        writer::publish(&writers, total, rate).await
    })
}

fn server_bin(args: &BenchArgs) -> PathBuf {
    if let Some(p) = &args.server_bin {
        return p.clone();
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("orgpulse-server")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| "orgpulse-server".into())
}

fn mb(bytes: u64) -> f64 {
    (bytes as f64 / 1_048_576.0 * 100.0).round() / 100.0
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

async fn measure(
    args: &BenchArgs,
    shape: &Shape,
    nodes: &[Target],
    outbox: Option<&Database>,
) -> Result<Value, CliError> {
    let url = nodes[0].url();
    let token_in = |org: &str, user: &str, role: &str, groups: Vec<String>| {
        mint(
            Signer::Secret(&nodes[0].secret_file),
            Some(org),
            user,
            vec![role.into()],
            groups,
            Duration::from_secs(3600),
        )
    };
    let token =
        |user: &str, role: &str, groups: Vec<String>| token_in(&args.org, user, role, groups);
    let audiences = Audiences::of(args);
    // Writer n is on node n % nodes, and so is subscriber n.
    let mut writer_nodes = HashMap::new();
    let mut publisher = match outbox {
        Some(db) => {
            Publisher::Outbox(outbox::Inserter::connect(db, &args.org, shape.events).await?)
        }
        None if args.scenario == Scenario::Presence => {
            let mut broadcasters = Vec::new();
            for n in 0..shape.writers {
                let node = n % nodes.len();
                // Broadcaster n is subscriber n's user (a viewer may broadcast).
                let user = subscriber_user(n);
                broadcasters.push(Broadcaster {
                    url: nodes[node].url(),
                    token: token(&user, "viewer", vec![])?,
                    org: args.org.clone(),
                    user: user.clone(),
                });
                writer_nodes.insert(user, node);
            }
            Publisher::Broadcasts(broadcasters)
        }
        None => {
            let mut writers = Vec::new();
            for n in 0..shape.writers {
                let node = n % nodes.len();
                let org = audiences.org_of(n, &args.org);
                let writer_token = token_in(
                    &org,
                    &format!("writer{n}"),
                    "member",
                    audiences.writer_groups(n),
                )?;
                let audience = audiences.writer_audience(n);
                let w = Writer::new(&nodes[node].url(), &writer_token, &org, n, audience).await?;
                writer_nodes.insert(w.key().to_string(), node);
                writers.push(w);
            }
            Publisher::Jobs(writers)
        }
    };
    let writer_nodes = Arc::new(writer_nodes);
    let mut out = json!({
        "label": format!("{:?}", args.scenario).to_lowercase(),
        "server": if args.secret_file.is_some() { url.clone() } else { "started".into() },
        "subscribers": shape.subscribers,
        "events": shape.events,
        "rate": if shape.rate > 0.0 { json!(shape.rate) } else { json!("max") },
        "writers": shape.writers,
    });
    // catchup: write the backlog first, then subscribe from before it.
    let mut after_cursor = String::new();
    if let (Scenario::Catchup, Publisher::Jobs(writers)) = (args.scenario, &publisher) {
        after_cursor = writers[0].cursor().await?;
        let backlog = timed(args, writer::publish(writers, shape.events, shape.rate)).await?;
        out["backlogWritesPerSec"] = per_sec(backlog.writes, backlog.elapsed).into();
    }
    let tally = Tally::new();
    let (before, _) = Target::usage_of(nodes).await?;
    let client_cpu0 = server::self_cpu_s();
    let t_connect = std::time::Instant::now();
    let sources = args
        .source_addrs
        .unwrap_or(shape.subscribers.div_ceil(8_000))
        .max(1);
    let orgs: Vec<String> = (0..shape.subscribers)
        .map(|i| audiences.org_of(i, &args.org))
        .collect();
    let tokens: Vec<String> = (0..shape.subscribers)
        .map(|i| {
            let (role, groups) = audiences.subscriber(i);
            token_in(&orgs[i], &subscriber_user(i), role, groups)
        })
        .collect::<Result<_, _>>()?;
    let counted = publisher.counted();
    let opened: Vec<(usize, Result<Subscriber, String>)> = timed(args, async {
        Ok(futures::stream::iter(tokens.iter().enumerate())
            .map(|(i, tok)| {
                let node = i % nodes.len();
                let dial = Dial {
                    server: nodes[node].addr,
                    token: tok,
                    org: &orgs[i],
                    after_cursor: after_cursor.clone(),
                    counted: counted.clone(),
                    placement: Placement {
                        node,
                        writer_nodes: writer_nodes.clone(),
                    },
                };
                let tally = &tally;
                async move {
                    let source = subscriber::source(i, sources);
                    let opened = async { Subscriber::open(Via::Own(source), dial, tally).await };
                    (i, opened.await)
                }
            })
            .buffer_unordered(args.connect_concurrency.max(1))
            .collect()
            .await)
    })
    .await?;
    let connect_elapsed = t_connect.elapsed();
    let mut connected = 0u64;
    let mut replayed = 0u64;
    let mut tasks = Vec::new();
    let mut recipients = audiences.recipients();
    for (i, sub) in opened {
        match sub {
            Ok(s) => {
                connected += 1;
                recipients.add(i);
                replayed += s.replayed;
                tasks.push(tokio::spawn(s.run(tally.clone())));
            }
            Err(e) => {
                tally.first_error.lock().unwrap().get_or_insert(e);
            }
        }
    }
    out["connected"] = connected.into();
    out["connectFailures"] = (shape.subscribers as u64 - connected).into();
    out["connectWallMs"] = (connect_elapsed.as_millis() as u64).into();
    out["sourceAddrs"] = sources.into();
    tokio::time::sleep(shape.settle).await;
    let (after_connect, streams) = Target::usage_of(nodes).await?;
    out["streamsPerNode"] = streams.into();

    let (expected, received, last) = if args.scenario == Scenario::Catchup {
        // The subscriber's open() read the whole backlog up to caught_up.
        out["catchupEventsPerSec"] = per_sec(replayed, connect_elapsed).into();
        let cpu = after_connect.cpu_s - before.cpu_s;
        out["serverCpuS"] = round2(cpu).into();
        out["serverCpuUsPerEvent"] = us_per(cpu, replayed);
        (shape.events * connected, replayed, after_connect)
    } else if shape.events > 0 {
        let expected = recipients.deliveries(shape.events, shape.writers, connected);
        if audiences.groups > 0 {
            out["audienceGroups"] = audiences.groups.into();
            out["rooms"] = audiences.rooms.into();
            out["recipientsPerEvent"] = round2(expected as f64 / shape.events as f64).into();
        }
        let t0 = subscriber::now_us();
        let published = timed(args, publisher.publish(shape.events, shape.rate)).await?;
        subscriber::wait_for(&tally, expected, args.stall, args.phase_timeout).await;
        let (after, _) = Target::usage_of(nodes).await?;
        let received = tally.received.load(Relaxed);
        if let Publisher::Outbox(inserter) = &publisher {
            inserter.report(&tally, &mut out).await?;
        }
        deliveries(
            &mut out,
            &published,
            t0,
            &tally,
            received,
            after_connect,
            after,
        );
        out["serverCpuUsPerEvent"] = us_per(after.cpu_s - after_connect.cpu_s, published.writes);
        (expected, received, after)
    } else {
        (0, 0, after_connect)
    };
    out["deliveriesExpected"] = expected.into();
    out["deliveriesReceived"] = received.into();
    out["lost"] = expected.saturating_sub(received).into();
    out["outOfOrder"] = tally.out_of_order.load(Relaxed).into();
    out["brokenStreams"] = tally.broken.load(Relaxed).into();
    out["serverRssMB"] = json!({
        "beforeConnect": mb(before.rss),
        "afterConnect": mb(after_connect.rss),
        "afterBroadcast": mb(last.rss),
    });
    out["rssPerConnKB"] = if connected > 0 {
        round2((after_connect.rss as f64 - before.rss as f64) / connected as f64 / 1024.0).into()
    } else {
        Value::Null
    };
    out["clientCpuS"] = round2(server::self_cpu_s() - client_cpu0).into();
    if let Some(e) = tally.first_error.lock().unwrap().take() {
        out["firstError"] = e.into();
    }
    for t in tasks {
        t.abort();
    }
    Ok(out)
}

/// The user id of subscriber `i`.
fn subscriber_user(i: usize) -> String {
    format!("sub{i}")
}

/// The `i` of [`subscriber_user`]`(i)` (below a million), None for any other user id.
fn subscriber_index(user: &[u8]) -> Option<usize> {
    let digits = user.strip_prefix(b"sub")?;
    if digits.is_empty() || digits.len() > 6 || (digits[0] == b'0' && digits.len() > 1) {
        return None;
    }
    digits.iter().try_fold(0, |i, &d| {
        d.is_ascii_digit().then(|| i * 10 + usize::from(d - b'0'))
    })
}

/// Who sees what in the audience scenario: subscriber i is an admin when `i % 100 == 99`, else
/// in group `i % groups`; writer n's job is for group `n % groups` and the admins. Every other
/// scenario (and `--audience-groups 0`) has no audiences. With `--rooms` the groups are orgs
/// instead, with no audience: subscriber i (admins too) watches group `i % groups`'s org, where
/// writer n writes for group `n % groups`.
struct Audiences {
    groups: usize,
    rooms: bool,
}

/// Every 100th subscriber is an admin, who sees every group's events.
const ADMIN_EVERY: usize = 100;

impl Audiences {
    fn of(args: &BenchArgs) -> Audiences {
        let on = args.scenario == Scenario::Audience;
        let groups = if on { args.audience_groups } else { 0 };
        Audiences {
            groups,
            rooms: groups > 0 && args.rooms,
        }
    }

    /// Whether the events have audiences.
    fn audiences(&self) -> bool {
        self.groups > 0 && !self.rooms
    }

    /// The org of subscriber (or writer) `i`: `org`, or with --rooms its group's.
    fn org_of(&self, i: usize, org: &str) -> String {
        match self.rooms {
            true => format!("{org}-{}", Self::group(i % self.groups)),
            false => org.to_string(),
        }
    }

    fn group(g: usize) -> String {
        format!("g{g}")
    }

    fn writer_groups(&self, n: usize) -> Vec<String> {
        match self.audiences() {
            false => vec![],
            true => vec![Self::group(n % self.groups)],
        }
    }

    fn writer_audience(&self, n: usize) -> Option<orgpulse::proto::Audience> {
        self.audiences().then(|| orgpulse::proto::Audience {
            groups: self.writer_groups(n),
            roles: vec!["admin".into()],
            ..Default::default()
        })
    }

    /// Subscriber i's role and groups.
    fn subscriber(&self, i: usize) -> (&'static str, Vec<String>) {
        match self.audiences() {
            false => ("viewer", vec![]),
            true if i % ADMIN_EVERY == ADMIN_EVERY - 1 => ("admin", vec![]),
            true => ("viewer", vec![Self::group(i % self.groups)]),
        }
    }

    fn recipients(&self) -> Recipients {
        Recipients {
            groups: self.groups,
            admins_apart: self.audiences(),
            members: vec![0; self.groups],
            admins: 0,
        }
    }
}

/// The connected subscribers by group, for the deliveries to expect.
struct Recipients {
    groups: usize,
    /// Admins receive every group's events (with audiences), not only their own group's.
    admins_apart: bool,
    members: Vec<u64>,
    admins: u64,
}

impl Recipients {
    fn add(&mut self, i: usize) {
        if self.groups == 0 {
            return;
        }
        match self.admins_apart && i % ADMIN_EVERY == ADMIN_EVERY - 1 {
            true => self.admins += 1,
            false => self.members[i % self.groups] += 1,
        }
    }

    /// The deliveries `events` updates split over `writers` make among `connected` subscribers.
    fn deliveries(&self, events: u64, writers: usize, connected: u64) -> u64 {
        if self.groups == 0 {
            return events * connected;
        }
        (0..writers)
            .map(|n| {
                writer::share(events, writers, n) * (self.members[n % self.groups] + self.admins)
            })
            .sum()
    }
}

/// The delivery fields of a broadcast: rate, latency, server CPU over the publish window.
fn deliveries(
    out: &mut Value,
    published: &Published,
    t0_us: u64,
    tally: &Tally,
    received: u64,
    cpu0: Usage,
    cpu1: Usage,
) {
    let wall = Duration::from_micros(tally.last_us.load(Relaxed).saturating_sub(t0_us));
    let cpu = cpu1.cpu_s - cpu0.cpu_s;
    out["publishMs"] = (published.elapsed.as_millis() as u64).into();
    out["writesPerSec"] = per_sec(published.writes, published.elapsed).into();
    let commits = cpu1.commits.saturating_sub(cpu0.commits);
    out["storeCommits"] = commits.into();
    out["writesPerCommit"] = if commits > 0 {
        round2(published.writes as f64 / commits as f64).into()
    } else {
        Value::Null
    };
    out["wallMs"] = (wall.as_millis() as u64).into();
    out["deliveriesPerSec"] = per_sec(received, wall).into();
    out["latencyMs"] = tally.latency.lock().unwrap().summary_ms();
    out["callLatencyMs"] = published.calls.summary_ms();
    let cross_node = tally.cross_node.lock().unwrap();
    out["crossNodeDeliveries"] = cross_node.count().into();
    out["crossNodeLatencyMs"] = cross_node.summary_ms();
    let fan_out = tally.fan_out.lock().unwrap();
    if fan_out.count() > 0 {
        out["fanOutLatencyMs"] = fan_out.summary_ms();
    }
    out["serverCpuS"] = round2(cpu).into();
    out["serverCpuUsPerDelivery"] = us_per(cpu, received);
}

fn per_sec(n: u64, d: Duration) -> u64 {
    if d.is_zero() {
        0
    } else {
        (n as f64 / d.as_secs_f64()).round() as u64
    }
}

fn us_per(cpu_s: f64, n: u64) -> Value {
    if n == 0 {
        Value::Null
    } else {
        round2(cpu_s * 1e6 / n as f64).into()
    }
}

/// `f` bounded by --phase-timeout.
async fn timed<T>(
    args: &BenchArgs,
    f: impl Future<Output = Result<T, CliError>>,
) -> Result<T, CliError> {
    tokio::time::timeout(args.phase_timeout, f)
        .await
        .map_err(|_| fail(format!("a phase took longer than {:?}", args.phase_timeout)))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subscriber_user_reads_back_as_its_number_and_nothing_else_does() {
        for i in [0, 7, 42, 999_999] {
            assert_eq!(subscriber_index(subscriber_user(i).as_bytes()), Some(i));
        }
        for other in ["", "sub", "sub01", "sub1x", "sub1000000", "writer1", "Sub1"] {
            assert_eq!(subscriber_index(other.as_bytes()), None, "{other}");
        }
    }
}
