//! The `hundredk` scenario: 100,000 subscribers of one org on one node, more than one process may
//! hold descriptors for. The first `--own-connections` (19,000) each on an HTTP/2 connection of
//! their own, the rest multiplexed [`STREAMS_PER_CONNECTION`] Subscribe streams per connection (as
//! an HTTP/2 load balancer in front would carry them), all spread over loopback source addresses.
//! Measured in phases: the server's RSS after the single-stream connections (per connection),
//! then after the multiplexed ones (per extra stream: what their connections' first streams do
//! not explain), its CPU while all are idle for `--seconds` with the default heartbeat (per stream
//! per second), then `--events` (1) job updates to all (commit→receipt per delivery), and from
//! these figures what one 16-vCPU node would hold.
use std::{ops::Range, sync::Arc, sync::atomic::Ordering::Relaxed, time::Duration};

use futures::StreamExt;
use serde_json::{Value, json};

use super::{BenchArgs, Shape, mb, round2, subscriber_user, timed, us_per};
use crate::{
    bench::{
        orgs::STREAMS_PER_CONNECTION,
        server::{self, Target},
        subscriber::{self, Counted, Dial, Placement, Subscriber, Tally, Via},
        writer::{self, Writer},
    },
    error::CliError,
    mint::{Signer, mint},
};

/// Subscribers on connections of their own unless `--own-connections` says otherwise.
pub const OWN_CONNECTIONS: usize = 19_000;
/// Connections one source address carries unless `--source-addrs` says otherwise.
const CONNECTIONS_PER_SOURCE: usize = 8_000;
/// The node the paper figures are for: vCPUs and memory.
const PAPER_VCPUS: f64 = 16.0;
const PAPER_MEMORY_GIB: f64 = 64.0;
/// One event to all must arrive within this (the goal), on paper too.
const BROADCAST_WITHIN_S: f64 = 2.0;

/// How subscribers 0..n are laid over connections: the first `own` each on a connection of its
/// own, the rest `per_connection` to a shared one. Connection c (own ones first) comes from source
/// address c of [`Split::sources`] (the storm scenario lays its subscribers out the same way).
pub struct Split {
    own: usize,
    multiplexed: usize,
    per_connection: usize,
}

impl Split {
    /// `own` of `subscribers` on connections of their own, the rest `per_connection` to one.
    pub fn new(own: usize, subscribers: usize, per_connection: usize) -> Split {
        let own = own.min(subscribers);
        Split {
            own,
            multiplexed: subscribers - own,
            per_connection: per_connection.max(1),
        }
    }

    /// This scenario's: `--own-connections` (default [`OWN_CONNECTIONS`]) on their own, the rest
    /// [`STREAMS_PER_CONNECTION`] to a connection.
    pub fn of(args: &BenchArgs, subscribers: usize) -> Split {
        let own = args.own_connections.unwrap_or(OWN_CONNECTIONS);
        Split::new(own, subscribers, STREAMS_PER_CONNECTION)
    }

    pub fn own(&self) -> usize {
        self.own
    }

    pub fn per_connection(&self) -> usize {
        self.per_connection
    }

    pub fn shared_connections(&self) -> usize {
        self.multiplexed.div_ceil(self.per_connection)
    }

    /// The TCP connections the subscribers hold.
    pub fn connections(&self) -> usize {
        self.own + self.shared_connections()
    }

    /// The connection subscriber `i` is on.
    pub fn connection(&self, i: usize) -> usize {
        match i.checked_sub(self.own) {
            None => i,
            Some(m) => self.own + m / self.per_connection,
        }
    }

    /// The subscribers on connection `c`.
    pub fn streams(&self, c: usize) -> Range<usize> {
        match c.checked_sub(self.own) {
            None => c..c + 1,
            Some(s) => {
                let first = self.own + s * self.per_connection;
                first..(first + self.per_connection).min(self.own + self.multiplexed)
            }
        }
    }

    /// How many source addresses the connections come from: `--source-addrs`, else one per
    /// [`CONNECTIONS_PER_SOURCE`].
    pub fn sources(&self, args: &BenchArgs) -> usize {
        args.source_addrs
            .unwrap_or(self.connections().div_ceil(CONNECTIONS_PER_SOURCE))
            .max(1)
    }
}

/// Connects, idles, publishes; one JSON object.
pub async fn measure(args: &BenchArgs, shape: &Shape, target: &Target) -> Result<Value, CliError> {
    let split = Split::of(args, shape.subscribers);
    let token = |user: &str, role: &str| {
        mint(
            Signer::Secret(&target.secret_file),
            Some(&args.org),
            user,
            vec![role.into()],
            vec![],
            Duration::from_secs(3600),
        )
    };
    let writers = vec![
        Writer::new(
            &target.url(),
            &token("writer0", "member")?,
            &args.org,
            0,
            None,
        )
        .await?,
    ];
    let tokens: Vec<String> = (0..shape.subscribers)
        .map(|i| token(&subscriber_user(i), "viewer"))
        .collect::<Result<_, _>>()?;
    let sources = split.sources(args);
    let opening = Opening {
        args,
        target,
        tokens: &tokens,
        tally: Tally::new(),
    };
    let client_cpu0 = server::self_cpu_s();
    let before = target.usage().await?;

    // Phase 1: one stream per connection.
    let t_connect = std::time::Instant::now();
    let mut tasks = opening
        .open(0..split.own, |i| Via::Own(subscriber::source(i, sources)))
        .await?;
    let own_connected = tasks.len();
    tokio::time::sleep(shape.settle).await;
    let after_own = target.usage().await?;

    // Phase 2: the rest multiplexed over shared connections.
    let mut shared = Vec::with_capacity(split.shared_connections());
    for c in split.own..split.connections() {
        let source = subscriber::source(c, sources);
        shared.push(
            subscriber::connect(target.addr, source)
                .await
                .map_err(server::fail)?,
        );
    }
    let multiplexed = opening
        .open(split.own..shape.subscribers, |i| {
            Via::Shared(shared[split.connection(i) - split.own].clone())
        })
        .await?;
    let multiplexed_connected = multiplexed.len();
    tasks.extend(multiplexed);
    let connect_elapsed = t_connect.elapsed();
    tokio::time::sleep(shape.settle).await;
    let after_all = target.usage().await?;

    // Phase 3: idle, the heartbeats only.
    let t_idle = std::time::Instant::now();
    tokio::time::sleep(args.idle_window()).await;
    let after_idle = target.usage().await?;
    let idle_window = t_idle.elapsed().as_secs_f64();

    // Phase 4: events to all.
    let tally = &opening.tally;
    let connected = tasks.len() as u64;
    let expected = shape.events * connected;
    let published = timed(args, writer::publish(&writers, shape.events, shape.rate)).await?;
    subscriber::wait_for(tally, expected, args.stall, args.phase_timeout).await;
    let after_events = target.usage().await?;
    let received = tally.received.load(Relaxed);

    let per_conn_kb = kb_per(after_own.rss, before.rss, own_connected);
    // The shared connections' first streams cost what a single-stream connection does; what is
    // left is the extra streams'.
    let first_streams = multiplexed_connected.min(shared.len());
    let per_extra_stream_kb = per_conn_kb.and_then(|conn_kb| {
        let left =
            (after_all.rss as f64 - after_own.rss as f64) / 1024.0 - conn_kb * first_streams as f64;
        let extra = multiplexed_connected - first_streams;
        (extra > 0).then(|| left / extra as f64)
    });
    let idle_cpu = after_idle.cpu_s - after_all.cpu_s;
    let idle_us_per_stream_s = (connected > 0)
        .then(|| idle_cpu * 1e6 / connected as f64 / idle_window)
        .filter(|us| *us > 0.0);
    let broadcast_cpu = after_events.cpu_s - after_idle.cpu_s;
    let latency = tally.latency.lock().unwrap().summary_ms();
    let mut out = json!({
        "label": "hundredk",
        "server": if args.secret_file.is_some() { target.url() } else { "started".into() },
        "subscribers": shape.subscribers,
        "ownConnections": split.own,
        "sharedConnections": shared.len(),
        "streamsPerSharedConnection": split.per_connection,
        "sourceAddrs": sources,
        "connected": connected,
        "connectFailures": shape.subscribers as u64 - connected,
        "connectWallMs": connect_elapsed.as_millis() as u64,
        "streamsHeld": after_all.open_streams,
        "serverRssMB": {
            "beforeConnect": mb(before.rss),
            "afterOwnConnections": mb(after_own.rss),
            "afterAll": mb(after_all.rss),
            "afterIdle": mb(after_idle.rss),
            "afterEvents": mb(after_events.rss),
        },
        "rssPerConnKB": per_conn_kb.map(round2),
        "rssPerExtraStreamKB": per_extra_stream_kb.map(round2),
        "idleSeconds": round2(idle_window),
        "idleServerCpuS": round2(idle_cpu),
        "idleCpuUsPerStreamPerSec": idle_us_per_stream_s.map(|us| (us * 1000.0).round() / 1000.0),
        "events": shape.events,
        "publishMs": published.elapsed.as_millis() as u64,
        "deliveriesExpected": expected,
        "deliveriesReceived": received,
        "lost": expected.saturating_sub(received),
        "outOfOrder": tally.out_of_order.load(Relaxed),
        "brokenStreams": tally.broken.load(Relaxed),
        "latencyMs": latency,
        "serverCpuS": round2(broadcast_cpu),
        "serverCpuUsPerDelivery": us_per(broadcast_cpu, received),
        "clientCpuS": round2(server::self_cpu_s() - client_cpu0),
    });
    out["onPaper16vCpu"] = on_paper(
        per_conn_kb,
        per_extra_stream_kb,
        idle_us_per_stream_s,
        (received > 0).then(|| broadcast_cpu * 1e6 / received as f64),
    );
    if let Some(e) = tally.first_error.lock().unwrap().take() {
        out["firstError"] = e.into();
    }
    for t in tasks {
        t.abort();
    }
    Ok(out)
}

/// KB of RSS per item between two snapshots.
fn kb_per(after: u64, before: u64, n: usize) -> Option<f64> {
    (n > 0).then(|| (after as f64 - before as f64) / 1024.0 / n as f64)
}

/// What one node of [`PAPER_VCPUS`] and [`PAPER_MEMORY_GIB`] would hold, each bound on its own
/// (the smallest one holds): memory (all streams multiplexed, or each on its connection), idle
/// CPU (all cores on heartbeats) and one event to all within [`BROADCAST_WITHIN_S`] (the fan-out
/// spread over all cores).
fn on_paper(
    per_conn_kb: Option<f64>,
    per_extra_stream_kb: Option<f64>,
    idle_us_per_stream_s: Option<f64>,
    cpu_us_per_delivery: Option<f64>,
) -> Value {
    let memory_kb = PAPER_MEMORY_GIB * 1024.0 * 1024.0;
    let streams = |x: Option<f64>| x.filter(|x| *x > 0.0).map(|x| x.round() as u64);
    json!({
        "vcpus": PAPER_VCPUS,
        "memoryGiB": PAPER_MEMORY_GIB,
        "byMemoryOwnConnections": streams(per_conn_kb.map(|kb| memory_kb / kb)),
        "byMemoryMultiplexed": streams(per_extra_stream_kb.map(|kb| memory_kb / kb)),
        "byIdleCpu": streams(idle_us_per_stream_s.map(|us| PAPER_VCPUS * 1e6 / us)),
        "byOneEventToAllWithin2s": streams(
            cpu_us_per_delivery.map(|us| PAPER_VCPUS * BROADCAST_WITHIN_S * 1e6 / us)
        ),
    })
}

/// Opens subscribers and starts their readers.
struct Opening<'a> {
    args: &'a BenchArgs,
    target: &'a Target,
    tokens: &'a [String],
    tally: Arc<Tally>,
}

impl Opening<'_> {
    /// Opens subscribers `range`, subscriber i on the connection `via(i)` says, at most
    /// --connect-concurrency at a time; starts the reader of each one that reached `caught_up`
    /// (a failure is the tally's first error).
    async fn open(
        &self,
        range: Range<usize>,
        via: impl Fn(usize) -> Via,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>, CliError> {
        let tally = &self.tally;
        let opened: Vec<Result<Subscriber, String>> = timed(self.args, async {
            Ok(futures::stream::iter(range)
                .map(|i| {
                    let dial = Dial {
                        server: self.target.addr,
                        token: &self.tokens[i],
                        org: &self.args.org,
                        after_cursor: String::new(),
                        counted: Counted::Jobs,
                        placement: Placement::default(),
                    };
                    Subscriber::open(via(i), dial, tally)
                })
                .buffer_unordered(self.args.connect_concurrency.max(1))
                .collect()
                .await)
        })
        .await?;
        let mut tasks = Vec::with_capacity(opened.len());
        for sub in opened {
            match sub {
                Ok(s) => tasks.push(tokio::spawn(s.run(tally.clone()))),
                Err(e) => tally.error(e),
            }
        }
        Ok(tasks)
    }
}
