//! The `storm` scenario: a node dies and every client it held comes back at once on the other.
//! Two nodes on PostgreSQL + NATS. `--subscribers` (default 20,000) subscribe on node A across
//! `--orgs` (default 200) orgs; up to [`ALL_SHARED_UP_TO`] subscribers without
//! `--own-connections`, [`STREAMS_PER_CONNECTION`] streams per HTTP/2 connection, else laid out as
//! the hundredk scenario lays out its 100,000 ([`Split`]): `--own-connections` (default 19,000
//! less one per org, the writers' connections to B) on connections of their own, the rest 100
//! streams per connection, over several source addresses. One writer per org on node B updates
//! its job at `--rate` in all (default 100/s) for `--events` writes. A quarter of the way into
//! the writes A is SIGKILLed, and every stream resumes on B (its connection dialled again from
//! the same source address) with the cursor of the last event it received.
//!
//! One subscriber per org on B, there from before the kill, and the writers stand for B's
//! existing clients: the storm must not cut them off nor hold them up (their latency and call
//! times are reported, and their deliveries checked like the others').
//!
//! Reported: the time from the kill until every stream had its `caught_up` on B (p50 / p99 /
//! max); PostgreSQL transactions in that window per org, from `pg_stat_database` of the store
//! database (`pg_stat_statements` is not loaded on this server; each read is one implicit
//! transaction), beside B's store commits (the writes) and B's own count of replay store reads
//! (`/metrics`, when the server has one); B's peak RSS and CPU over the storm, and the bench's own
//! CPU. Once the writes are done, every stream must have received every event of its org's log
//! after its start, each seq exactly the one after the previous (the log is gapless): lost 0 and
//! out-of-order 0, or the run fails. The subscribers ask for the durable kinds only (see
//! [`Counted::Log`]).
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use futures::{StreamExt, TryStreamExt};
use h2::client::SendRequest;
use serde_json::{Value, json};

use super::{BenchArgs, Shape, database, histogram::Histogram, mb, round2, subscriber_user, timed};
use crate::{
    bench::{
        database::Database,
        hundredk::{OWN_CONNECTIONS, Split},
        orgs,
        server::{self, Target, fail},
        subscriber::{self, Counted, Dial, Placement, Subscriber, Tally, Via},
        writer::{self, Published, Writer},
    },
    error::CliError,
    mint::{Signer, mint},
};

/// Streams opened on one HTTP/2 connection, up to [`ALL_SHARED_UP_TO`] subscribers.
const STREAMS_PER_CONNECTION: usize = 50;
/// Up to this many subscribers (the default run) all share connections unless
/// `--own-connections` is given; beyond, they are laid out as the hundredk scenario's.
const ALL_SHARED_UP_TO: usize = 20_000;
/// Orgs the subscribers are spread over unless `--orgs` says otherwise.
pub const DEFAULT_ORGS: usize = 200;
/// How often B's usage is sampled during the storm (for its peak RSS).
const SAMPLE: Duration = Duration::from_millis(100);
/// pg_stat_database is updated by each backend at most once a second.
const STATS_FLUSH: Duration = Duration::from_millis(1100);

/// What the resuming streams add up.
struct Resumes {
    /// When A was killed.
    killed: Mutex<Option<Instant>>,
    /// Streams caught up on B, and how long after the kill each one was.
    caught_up: AtomicU64,
    after_kill: Mutex<Histogram>,
    failures: AtomicU64,
}

/// The org of subscriber `i` (and of writer `i`).
fn org_name(prefix: &str, i: usize, orgs: usize) -> String {
    format!("{prefix}-storm-{}", i % orgs)
}

/// How `subscribers` are laid over connections (to A, then to B) for these `args`.
pub fn split(args: &BenchArgs, subscribers: usize) -> Split {
    let orgs = args.orgs.unwrap_or(DEFAULT_ORGS).max(1);
    match args.own_connections {
        None if subscribers <= ALL_SHARED_UP_TO => {
            Split::new(0, subscribers, STREAMS_PER_CONNECTION)
        }
        own => Split::new(
            own.unwrap_or(OWN_CONNECTIONS.saturating_sub(orgs)),
            subscribers,
            orgs::STREAMS_PER_CONNECTION,
        ),
    }
}

/// Transactions committed or rolled back in database `name` so far.
async fn xacts(admin: &tokio_postgres::Client, name: &str) -> Result<u64, CliError> {
    let row = admin
        .query_one(
            "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database WHERE datname = $1",
            &[&name],
        )
        .await
        .map_err(database::sql_error("reading pg_stat_database"))?;
    Ok(row.get::<_, i64>(0) as u64)
}

/// Runs the scenario on `nodes` (A = 0, B = 1) storing in `store`.
pub async fn measure(
    args: &BenchArgs,
    shape: &Shape,
    nodes: &mut [Target],
    store: &Database,
) -> Result<Value, CliError> {
    let orgs = args.orgs.unwrap_or(DEFAULT_ORGS).max(1);
    let secret = nodes[0].secret_file.clone();
    let token = |org: &str, user: &str, role: &str| {
        mint(
            Signer::Secret(&secret),
            Some(org),
            user,
            vec![role.into()],
            vec![],
            Duration::from_secs(3600),
        )
    };
    let (a, b) = (nodes[0].addr, nodes[1].addr);
    let url_b = nodes[1].url();
    // One writer per org on B, each with its job (seq 1 of its org's log).
    let writers: Vec<Writer> = futures::stream::iter(0..orgs)
        .map(|n| {
            let org = org_name(&args.org, n, orgs);
            let t = token(&org, &format!("writer{n}"), "member");
            let url = url_b.clone();
            async move { Writer::new(&url, &t?, &org, n, None).await }
        })
        .buffered(32)
        .try_collect()
        .await?;
    let cursors: Vec<String> = futures::stream::iter(&writers)
        .map(|w| w.cursor())
        .buffered(32)
        .try_collect()
        .await?;

    // The subscribers on A, one connection at a time per stream it carries up to
    // --connect-concurrency: the connections of their own first, then the shared ones.
    let tally = Tally::new();
    let split = split(args, shape.subscribers);
    let sources = split.sources(args);
    let subscribers = shape.subscribers;
    let t_connect = Instant::now();
    let mut groups: Vec<Result<Vec<(usize, Subscriber)>, String>> = Vec::new();
    for phase in [0..split.own(), split.own()..split.connections()] {
        let per_connection = phase.clone().next().map_or(1, |c| split.streams(c).len());
        groups.extend(
            timed(args, async {
                Ok(futures::stream::iter(phase)
                    .map(|c| {
                        let streams = split.streams(c);
                        let source = subscriber::source(c, sources);
                        open_group(args, a, source, streams, &token, &cursors, &tally)
                    })
                    .buffer_unordered(args.connect_concurrency.div_ceil(per_connection).max(1))
                    .collect::<Vec<_>>()
                    .await)
            })
            .await?,
        );
    }
    let connect_elapsed = t_connect.elapsed();
    let mut opened = Vec::new();
    for group in groups {
        match group {
            Ok(g) => opened.push(g),
            Err(e) => tally.error(e),
        }
    }
    let connected: Vec<usize> = opened.iter().flatten().map(|(i, _)| *i).collect();

    // B's own clients through the storm: one subscriber per org, there from before the kill.
    let residents = Tally::new();
    let resident_ids = subscribers..subscribers + orgs;
    let mut resident_streams = Vec::new();
    for c in 0..orgs.div_ceil(STREAMS_PER_CONNECTION) {
        let from = resident_ids.start + c * STREAMS_PER_CONNECTION;
        let streams = from..(from + STREAMS_PER_CONNECTION).min(resident_ids.end);
        let source = subscriber::source(c, sources);
        let group = open_group(args, b, source, streams, &token, &cursors, &residents).await;
        resident_streams.extend(group.map_err(fail)?);
    }
    let residents_live: Vec<_> = resident_streams
        .into_iter()
        .map(|(_, s)| tokio::spawn(s.run(residents.clone())))
        .collect();

    // Writes go on through B; a quarter of the way in, A dies and every stream resumes on B.
    let resumes = Arc::new(Resumes {
        killed: Mutex::new(None),
        caught_up: AtomicU64::new(0),
        after_kill: Mutex::new(Histogram::new()),
        failures: AtomicU64::new(0),
    });
    let mut live = Vec::new();
    for group in opened {
        let source = subscriber::source(split.connection(group[0].0), sources);
        let (tally, resumes) = (tally.clone(), resumes.clone());
        let (org, token) = (args.org.clone(), &token);
        let tokens: Vec<(usize, String)> = group
            .iter()
            .map(|(i, _)| {
                let org = org_name(&org, *i, orgs);
                Ok((*i, token(&org, &subscriber_user(*i), "viewer")?))
            })
            .collect::<Result<_, CliError>>()?;
        live.push(tokio::spawn(resume_group(
            b, source, org, orgs, group, tokens, tally, resumes,
        )));
    }
    let (events, rate) = (shape.events, shape.rate);
    let publishing = tokio::spawn(async move { writer::publish(&writers, events, rate).await });
    tokio::time::sleep(Duration::from_secs_f64(events as f64 / rate.max(1.0) / 4.0)).await;
    let admin = database::connect(&args.pg_admin_url).await?;
    let xacts0 = xacts(&admin, &store.name).await?;
    let usage0 = nodes[1].usage().await?;
    let reads0 = replay_reads(&nodes[1]).await;
    let client_cpu0 = server::self_cpu_s();
    let killed = Instant::now();
    *resumes.killed.lock().unwrap() = Some(killed);
    nodes[0].kill().await;
    let mut peak_rss = usage0.rss;
    let deadline = killed + args.phase_timeout;
    while resumes.caught_up.load(Relaxed) + resumes.failures.load(Relaxed) < connected.len() as u64
        && Instant::now() < deadline
    {
        tokio::time::sleep(SAMPLE).await;
        peak_rss = peak_rss.max(nodes[1].usage().await?.rss);
    }
    let storm = killed.elapsed();
    let client_cpu = server::self_cpu_s() - client_cpu0;
    let usage1 = nodes[1].usage().await?;
    let reads1 = replay_reads(&nodes[1]).await;
    tokio::time::sleep(STATS_FLUSH).await;
    let xacts1 = xacts(&admin, &store.name).await?;
    let commits1 = nodes[1].usage().await?.commits;

    // Every stream against the log, once the writes are done.
    let published = publishing
        .await
        .map_err(|e| fail(format!("writers: {e}")))??;
    let heads = heads(store, &args.org, orgs).await?;
    let expected: u64 = connected
        .iter()
        .map(|i| heads[i % orgs].saturating_sub(1))
        .sum();
    subscriber::wait_for(&tally, expected, args.stall, args.phase_timeout).await;
    let received = tally.received.load(Relaxed);
    let residents_expected: u64 = resident_ids
        .map(|i| heads[i % orgs].saturating_sub(1))
        .sum();
    subscriber::wait_for(&residents, residents_expected, args.stall, args.stall).await;
    let residents_received = residents.received.load(Relaxed);
    let residents_lost = residents_expected.saturating_sub(residents_received);
    let cpu = usage1.cpu_s - usage0.cpu_s;
    let xacts_storm = xacts1.saturating_sub(xacts0);
    let commits = commits1.saturating_sub(usage0.commits);
    let mut out = json!({
        "label": "storm",
        "server": "started",
        "subscribers": subscribers,
        "orgs": orgs,
        "ownConnections": split.own(),
        "sharedConnections": split.shared_connections(),
        "streamsPerSharedConnection": split.per_connection(),
        "connections": split.connections(),
        "sourceAddrs": sources,
        "events": events,
        "rate": rate,
        "writesPerSec": super::per_sec(published.writes, published.elapsed),
        "connected": connected.len(),
        "connectFailures": subscribers - connected.len(),
        "connectWallMs": connect_elapsed.as_millis() as u64,
        "resumeFailures": resumes.failures.load(Relaxed),
        "caughtUpOnB": resumes.caught_up.load(Relaxed),
        "allCaughtUpMs": storm.as_millis() as u64,
        "caughtUpAfterKillMs": resumes.after_kill.lock().unwrap().summary_ms(),
        "pgQueriesSource": "pg_stat_database xact_commit+xact_rollback of the store database, \
            from the kill to all caught up (+1.1 s for the statistics to be flushed)",
        "pgXactsDuringStorm": xacts_storm,
        "storeCommitsDuringStorm": commits,
        "pgXactsPerOrg": round2(xacts_storm as f64 / orgs as f64),
        "pgReadXactsPerOrg": round2(xacts_storm.saturating_sub(commits) as f64 / orgs as f64),
        "replayStoreReadsPerOrg": match (reads0, reads1) {
            (Some(r0), Some(r1)) => json!(round2((r1 - r0) as f64 / orgs as f64)),
            _ => Value::Null,
        },
        "serverB": {
            "peakRssMB": mb(peak_rss),
            "rssBeforeKillMB": mb(usage0.rss),
            "cpuS": round2(cpu),
            "cpuPctOfCore": round2(cpu / storm.as_secs_f64().max(1e-9) * 100.0),
        },
        // The bench's own CPU over the storm (a core of its own): near 100 %, the client is
        // what the caught-up times measure.
        "clientCpuPctOfCore": round2(client_cpu / storm.as_secs_f64().max(1e-9) * 100.0),
        // B's existing clients while the storm came in: the writers' calls (each a unary
        // round trip through B, before, during and after the storm) and one subscriber per org
        // on B from before the kill (commit to receipt).
        "writerCallsMs": published.calls.summary_ms(),
        // The calls begun from the kill until all were caught up: the storm's share.
        "writerCallsDuringStormMs": during(&published, killed, killed + storm).summary_ms(),
        "residentsOnB": {
            "streams": orgs,
            "latencyMs": residents.latency.lock().unwrap().summary_ms(),
            "lost": residents_lost,
            "outOfOrder": residents.out_of_order.load(Relaxed),
            "broken": residents.broken.load(Relaxed),
        },
        "deliveriesExpected": expected + residents_expected,
        "deliveriesReceived": received + residents_received,
        "lost": expected.saturating_sub(received) + residents_lost,
        "outOfOrder": tally.out_of_order.load(Relaxed) + residents.out_of_order.load(Relaxed),
        "brokenStreams": tally.broken.load(Relaxed)
            + resumes.failures.load(Relaxed)
            + residents.broken.load(Relaxed),
    });
    if let Some(e) = tally.first_error.lock().unwrap().take() {
        out["firstError"] = e.into();
    }
    for t in live.into_iter().chain(residents_live) {
        t.abort();
    }
    Ok(out)
}

/// Opens subscribers `streams` on one connection to `server` from `source`, each from its org's
/// start cursor; up to their `caught_up`.
async fn open_group(
    args: &BenchArgs,
    server: std::net::SocketAddr,
    source: std::net::IpAddr,
    streams: std::ops::Range<usize>,
    token: &impl Fn(&str, &str, &str) -> Result<String, CliError>,
    cursors: &[String],
    tally: &Tally,
) -> Result<Vec<(usize, Subscriber)>, String> {
    let orgs = cursors.len();
    let conn = subscriber::connect(server, source).await?;
    futures::future::try_join_all(streams.map(|i| {
        let org = org_name(&args.org, i, orgs);
        let conn = conn.clone();
        async move {
            let t = token(&org, &subscriber_user(i), "viewer").map_err(|e| e.message)?;
            let dial = Dial {
                server,
                token: &t,
                org: &org,
                after_cursor: cursors[i % orgs].clone(),
                counted: Counted::Log { after: 1 },
                placement: Placement::default(),
            };
            Ok((i, Subscriber::open(Via::Shared(conn), dial, tally).await?))
        }
    }))
    .await
}

/// Reads a group's streams until A dies under them, then dials B from `source` and resumes each
/// from its last cursor, recording when it is caught up; then reads them live until aborted.
#[allow(clippy::too_many_arguments)]
async fn resume_group(
    b: std::net::SocketAddr,
    source: std::net::IpAddr,
    prefix: String,
    orgs: usize,
    mut group: Vec<(usize, Subscriber)>,
    tokens: Vec<(usize, String)>,
    tally: Arc<Tally>,
    resumes: Arc<Resumes>,
) {
    futures::future::join_all(group.iter_mut().map(|(_, s)| s.until_end(&tally))).await;
    let tokens: HashMap<usize, String> = tokens.into_iter().collect();
    let conn: Result<SendRequest<bytes::Bytes>, String> = subscriber::connect(b, source).await;
    let resumed = futures::future::join_all(group.into_iter().map(|(i, old)| {
        let (conn, tally, resumes) = (conn.clone(), &tally, &resumes);
        let org = org_name(&prefix, i, orgs);
        let token = &tokens[&i];
        async move {
            let dial = Dial {
                server: b,
                token,
                org: &org,
                after_cursor: old.cursor.clone(),
                counted: Counted::Log {
                    after: old.last_seq,
                },
                placement: Placement::default(),
            };
            let opened = match conn {
                Ok(conn) => Subscriber::open(Via::Shared(conn), dial, tally).await,
                Err(e) => Err(e),
            };
            match opened {
                Ok(s) => {
                    let killed = resumes.killed.lock().unwrap().unwrap_or_else(Instant::now);
                    let us = killed.elapsed().as_micros() as u64;
                    resumes.after_kill.lock().unwrap().record(us);
                    resumes.caught_up.fetch_add(1, Relaxed);
                    Some(s)
                }
                Err(e) => {
                    resumes.failures.fetch_add(1, Relaxed);
                    tally.error(format!("resuming on B: {e}"));
                    None
                }
            }
        }
    }))
    .await;
    futures::future::join_all(resumed.into_iter().flatten().map(|s| s.run(tally.clone()))).await;
}

/// B's count of replay store reads, when its /metrics has one.
async fn replay_reads(node: &Target) -> Option<u64> {
    node.metric("orgpulse_replay_store_reads_total")
        .await
        .map(|v| v as u64)
}

/// The head of each storm org's log, by org index.
async fn heads(store: &Database, prefix: &str, orgs: usize) -> Result<Vec<u64>, CliError> {
    let client = database::connect(&store.url).await?;
    let rows = client
        .query("SELECT org_id, last_seq FROM org_log", &[])
        .await
        .map_err(database::sql_error("reading the log heads"))?;
    let by_org: HashMap<String, u64> = rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64))
        .collect();
    (0..orgs)
        .map(|n| {
            let org = org_name(prefix, n, orgs);
            by_org
                .get(&org)
                .copied()
                .ok_or_else(|| server::fail(format!("org {org} has no log")))
        })
        .collect()
}

/// The durations of the calls of `published` begun from `from` until `to`.
fn during(published: &Published, from: Instant, to: Instant) -> Histogram {
    let mut calls = Histogram::new();
    for (began, took) in &published.timeline {
        if (from..to).contains(began) {
            calls.record(*took);
        }
    }
    calls
}
