//! `orgpulse bench`: fan-out measured the way the socket.io peer harness measures it. Starts (or
//! targets) a server, opens S subscribers each on its own HTTP/2 connection, waits until all are
//! caught up, publishes E job updates through the public API, and prints one JSON line: deliveries
//! expected/received, throughput, commit→receipt latency, server CPU per delivery and RSS per
//! connection. Any loss, reordering or broken stream makes the exit code non-zero. The `orgs`
//! scenario (orgs.rs) instead measures what many idle orgs cost the server; the `outbox` scenario
//! (outbox.rs) publishes by committing outbox rows in PostgreSQL instead of calling the API.
mod histogram;
mod orgs;
mod outbox;
mod server;
mod subscriber;
mod writer;

use std::{path::PathBuf, sync::atomic::Ordering::Relaxed, time::Duration};

use clap::{Args, ValueEnum};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::{error::CliError, mint::mint};
use server::{Target, Usage, fail};
use subscriber::{Counted, Dial, Subscriber, Tally};
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
    /// 8 concurrent writers, 100 subscribers: committed writes/s.
    Ingest,
    /// One subscriber resuming 100,000 events behind: events/s until caught_up.
    Catchup,
    /// 20,000 subscribers on several source addresses, all receiving a broadcast.
    Scale,
    /// 5,000 orgs (--orgs) with one idle subscriber each, over shared HTTP/2 connections: server
    /// CPU while nothing is published (--seconds).
    Orgs,
    /// 100 subscribers, 1,000 outbox rows committed at 200/s (one per transaction) in a PostgreSQL
    /// database of its own (--pg-admin-url): COMMIT→receipt latency through NOTIFY.
    Outbox,
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
            Scenario::E => (1_000, 500, 50.0, 1, 1000),
            Scenario::Ingest => (100, 20_000, 0.0, 8, 1000),
            Scenario::Catchup => (1, 100_000, 0.0, 8, 0),
            Scenario::Scale => (20_000, 10, 0.0, 1, 3000),
            Scenario::Orgs => (5_000, 0, 0.0, 1, 3000),
            Scenario::Outbox => (100, 1_000, 200.0, 1, 1000),
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
    /// orgs: how many orgs, one subscriber each (default 5,000).
    #[arg(long)]
    pub orgs: Option<usize>,
    /// orgs: how long the idle server's CPU is measured.
    #[arg(long, default_value = "20s", value_parser = duration)]
    pub seconds: Duration,
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
    /// outbox: the PostgreSQL server (any existing database on it) where the scenario creates and
    /// finally drops a database of its own.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/test")]
    pub pg_admin_url: String,
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// Runs one scenario against `url` (used only with --secret-file) and prints its JSON line.
pub async fn run(args: BenchArgs, url: &str) -> Result<(), CliError> {
    let mut shape = args.scenario.shape();
    shape.subscribers = args.orgs.or(args.subscribers).unwrap_or(shape.subscribers);
    shape.events = args.events.unwrap_or(shape.events);
    shape.rate = args.rate.unwrap_or(shape.rate);
    shape.writers = args.writers.unwrap_or(shape.writers).max(1);
    shape.settle = args.settle.unwrap_or(shape.settle);
    // One socket per subscriber (orgs: per shared connection) here and in a started server (which
    // inherits the limit), plus a few dozen for writers, the database and stdio.
    let sockets = match args.scenario {
        Scenario::Orgs => shape.subscribers.div_ceil(orgs::STREAMS_PER_CONNECTION),
        _ => shape.subscribers,
    };
    server::raise_nofile(sockets as u64 + 64)?;
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    server::pin_self(&args.client_cpus)?;
    let outbox_db = match args.scenario {
        Scenario::Outbox if args.secret_file.is_some() => {
            return Err(CliError::usage(
                "--scenario outbox starts its own server (with --outbox): drop --secret-file",
            ));
        }
        Scenario::Outbox => Some(outbox::Database::create(&args.pg_admin_url).await?),
        _ => None,
    };
    let result = start_and_measure(&args, &shape, url, outbox_db.as_ref()).await;
    let (outbox_database, dropped) = match outbox_db {
        Some(db) => (Some(db.name.clone()), db.drop().await),
        None => (None, Ok(())),
    };
    let mut out = result?;
    dropped?;
    if let Some(name) = outbox_database {
        out["outboxDatabase"] = name.into();
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

/// Attaches to or starts the server (consuming `outbox` when given), measures, stops it.
async fn start_and_measure(
    args: &BenchArgs,
    shape: &Shape,
    url: &str,
    outbox: Option<&outbox::Database>,
) -> Result<Value, CliError> {
    let target = match &args.secret_file {
        Some(secret) => Target::attach(url, secret)?,
        None => {
            let mut extra = outbox.map(|db| db.server_args()).unwrap_or_default();
            extra.extend(args.server_args.iter().cloned());
            Target::start(&server_bin(args), &args.server_cpus, &extra).await?
        }
    };
    let result = match args.scenario {
        Scenario::Orgs => orgs::measure(args, shape, &target).await,
        _ => measure(args, shape, &target, outbox).await,
    };
    target.stop().await;
    result
}

/// What makes the events: job updates through the API, or outbox rows committed in PostgreSQL.
enum Publisher {
    Jobs(Vec<Writer>),
    Outbox(outbox::Inserter),
}

impl Publisher {
    fn counted(&self) -> Counted {
        match self {
            Publisher::Jobs(_) => Counted::Jobs,
            Publisher::Outbox(inserter) => Counted::OutboxRows(inserter.commits()),
        }
    }

    async fn publish(&mut self, total: u64, rate: f64) -> Result<Published, CliError> {
        match self {
            Publisher::Jobs(writers) => writer::publish(writers, total, rate).await,
            Publisher::Outbox(inserter) => inserter.publish(total, rate).await,
        }
    }
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
    target: &Target,
    outbox: Option<&outbox::Database>,
) -> Result<Value, CliError> {
    let url = target.url();
    let token = |user: &str, role: &str| {
        mint(
            &target.secret_file,
            Some(&args.org),
            user,
            vec![role.into()],
            Duration::from_secs(3600),
        )
    };
    let mut publisher = match outbox {
        Some(db) => {
            Publisher::Outbox(outbox::Inserter::connect(db, &args.org, shape.events).await?)
        }
        None => {
            let mut writers = Vec::new();
            for n in 0..shape.writers {
                let writer_token = token(&format!("writer{n}"), "member")?;
                writers.push(Writer::new(&url, &writer_token, &args.org, n).await?);
            }
            Publisher::Jobs(writers)
        }
    };
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
    let before = target.usage().await?;
    let client_cpu0 = server::self_cpu_s();
    let t_connect = std::time::Instant::now();
    let sources = args
        .source_addrs
        .unwrap_or(shape.subscribers.div_ceil(8_000))
        .max(1);
    let tokens: Vec<String> = (0..shape.subscribers)
        .map(|i| token(&format!("sub{i}"), "viewer"))
        .collect::<Result<_, _>>()?;
    let counted = publisher.counted();
    let opened: Vec<Result<Subscriber, String>> = timed(args, async {
        Ok(futures::stream::iter(tokens.iter().enumerate())
            .map(|(i, tok)| {
                let dial = Dial {
                    server: target.addr,
                    token: tok,
                    org: &args.org,
                    after_cursor: after_cursor.clone(),
                    counted: counted.clone(),
                };
                let tally = &tally;
                async move {
                    let conn =
                        subscriber::connect(target.addr, subscriber::source(i, sources)).await?;
                    Subscriber::open(conn, dial, tally).await
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
    for sub in opened {
        match sub {
            Ok(s) => {
                connected += 1;
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
    let after_connect = target.usage().await?;

    let (expected, received, last) = if args.scenario == Scenario::Catchup {
        // The subscriber's open() read the whole backlog up to caught_up.
        out["catchupEventsPerSec"] = per_sec(replayed, connect_elapsed).into();
        let cpu = after_connect.cpu_s - before.cpu_s;
        out["serverCpuS"] = round2(cpu).into();
        out["serverCpuUsPerEvent"] = us_per(cpu, replayed);
        (shape.events * connected, replayed, after_connect)
    } else if shape.events > 0 {
        let expected = shape.events * connected;
        let t0 = subscriber::now_us();
        let published = timed(args, publisher.publish(shape.events, shape.rate)).await?;
        subscriber::wait_for(&tally, expected, args.stall, args.phase_timeout).await;
        let after = target.usage().await?;
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
    out["wallMs"] = (wall.as_millis() as u64).into();
    out["deliveriesPerSec"] = per_sec(received, wall).into();
    out["latencyMs"] = tally.latency.lock().unwrap().summary_ms();
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
