//! Process-wide counters and gauges, rendered as Prometheus text at `GET /metrics`.
use std::{
    fmt::Write,
    sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed},
};

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

#[derive(Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn inc(&self) {
        self.0.fetch_add(1, Relaxed);
    }
    pub fn dec(&self) {
        self.0.fetch_sub(1, Relaxed);
    }
    pub fn set(&self, v: i64) {
        self.0.store(v, Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }
    /// Counts one more until the returned guard is dropped.
    pub fn hold(&'static self) -> GaugeHold {
        self.inc();
        GaugeHold(self)
    }
}

/// One unit of a gauge (an open stream, a waiting Poll), given back when dropped.
pub struct GaugeHold(&'static Gauge);

impl Drop for GaugeHold {
    fn drop(&mut self) {
        self.0.dec();
    }
}

pub struct Metrics {
    pub open_streams: Gauge,
    pub waiting_polls: Gauge,
    pub events_committed: Counter,
    /// Write transactions the store committed (a group commit carries many writes).
    pub store_commits: Counter,
    pub events_delivered: Counter,
    pub slow_disconnects: Counter,
    pub polls: Counter,
    pub outbox_rows: Counter,
    pub outbox_rejected: Counter,
    /// Gaps in a room's seqs (the bus lost or reordered) filled from the Store.
    pub gap_repairs: Counter,
    /// Rooms behind their org's log head at a tail check, filled from the Store.
    pub tail_repairs: Counter,
    /// Store reads made for `Subscribe` replays (each shared by the subscribers replaying the
    /// same part of an org's log).
    pub replay_reads: Counter,
    /// Bus messages dropped on this node (outbox full, publish failed, slow consumer).
    pub bus_dropped: Counter,
    /// The door (docs/api.md "Limits before authentication"): connections open, the most the
    /// server holds, and those closed at the door for each reason.
    pub open_connections: Gauge,
    pub max_connections: Gauge,
    pub connections_evicted: Counter,
    pub connections_refused: Counter,
    pub connections_head_timeouts: Counter,
    pub accept_errors: Counter,
    /// Requests of new connections waiting at the admission gate now, and in all (`admission`).
    pub admission_waiting: Gauge,
    pub admission_delayed: Counter,
    /// The runtime's lag as the admission gate last measured it, in microseconds.
    pub runtime_lag_us: Gauge,
    /// Calls refused before their body was read, and bodies refused while being received.
    pub unauthenticated_refusals: Counter,
    pub request_buffer_refusals: Counter,
    pub body_timeouts: Counter,
    /// Calls whose request tonic could not decode (bad gRPC or grpc-web framing, bad protobuf).
    pub malformed_requests: Counter,
}

pub static METRICS: Metrics = Metrics {
    open_streams: Gauge(AtomicI64::new(0)),
    waiting_polls: Gauge(AtomicI64::new(0)),
    events_committed: Counter(AtomicU64::new(0)),
    store_commits: Counter(AtomicU64::new(0)),
    events_delivered: Counter(AtomicU64::new(0)),
    slow_disconnects: Counter(AtomicU64::new(0)),
    polls: Counter(AtomicU64::new(0)),
    outbox_rows: Counter(AtomicU64::new(0)),
    outbox_rejected: Counter(AtomicU64::new(0)),
    gap_repairs: Counter(AtomicU64::new(0)),
    tail_repairs: Counter(AtomicU64::new(0)),
    replay_reads: Counter(AtomicU64::new(0)),
    bus_dropped: Counter(AtomicU64::new(0)),
    open_connections: Gauge(AtomicI64::new(0)),
    max_connections: Gauge(AtomicI64::new(0)),
    connections_evicted: Counter(AtomicU64::new(0)),
    connections_refused: Counter(AtomicU64::new(0)),
    connections_head_timeouts: Counter(AtomicU64::new(0)),
    accept_errors: Counter(AtomicU64::new(0)),
    admission_waiting: Gauge(AtomicI64::new(0)),
    admission_delayed: Counter(AtomicU64::new(0)),
    runtime_lag_us: Gauge(AtomicI64::new(0)),
    unauthenticated_refusals: Counter(AtomicU64::new(0)),
    request_buffer_refusals: Counter(AtomicU64::new(0)),
    body_timeouts: Counter(AtomicU64::new(0)),
    malformed_requests: Counter(AtomicU64::new(0)),
};

/// (CPU seconds user+system, resident bytes) of this process, from /proc.
pub fn process_usage() -> (f64, u64) {
    let ticks = 100.0; // USER_HZ on Linux
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) / ticks)
        })
        .unwrap_or(0.0);
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * 4096)
        .unwrap_or(0);
    (cpu, rss)
}

/// A store's connection pool now.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PoolStats {
    /// Most connections it opens.
    pub max_size: usize,
    /// Connections open.
    pub size: usize,
    /// Open connections idle in the pool.
    pub available: usize,
    /// Callers waiting for a connection.
    pub waiting: usize,
}

/// This node as `/metrics` shows it: its id and whether its bus is connected.
pub struct NodeState<'a> {
    pub id: &'a str,
    pub bus_connected: bool,
}

/// The metrics, with the store's connection pool when it has one.
pub fn render(pool: Option<PoolStats>, node: NodeState<'_>) -> String {
    let m = &METRICS;
    let (cpu, rss) = process_usage();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        );
    };
    metric(
        "orgpulse_open_streams",
        "gauge",
        "Open Subscribe streams.",
        m.open_streams.get().to_string(),
    );
    metric(
        "orgpulse_runtime_global_queue_depth",
        "gauge",
        "Tasks waiting in the runtime's global queue: those woken from outside its worker threads (an event's subscribers, woken by the store's writer) and those the workers' own queues could not hold. High while the node is behind.",
        tokio::runtime::Handle::try_current()
            .map_or(0, |h| h.metrics().global_queue_depth())
            .to_string(),
    );
    metric(
        "orgpulse_waiting_polls",
        "gauge",
        "Poll calls in progress (most of them waiting for an event).",
        m.waiting_polls.get().to_string(),
    );
    metric(
        "orgpulse_events_committed_total",
        "counter",
        "Durable events committed by this node.",
        m.events_committed.get().to_string(),
    );
    metric(
        "orgpulse_store_commits_total",
        "counter",
        "Write transactions the store committed on this node (each carries one or more writes).",
        m.store_commits.get().to_string(),
    );
    metric(
        "orgpulse_events_delivered_total",
        "counter",
        "Durable events sent to subscribers (one per subscriber).",
        m.events_delivered.get().to_string(),
    );
    metric(
        "orgpulse_slow_subscriber_disconnects_total",
        "counter",
        "Streams ended because their queue was full.",
        m.slow_disconnects.get().to_string(),
    );
    metric(
        "orgpulse_polls_total",
        "counter",
        "Poll calls answered.",
        m.polls.get().to_string(),
    );
    metric(
        "orgpulse_outbox_rows_total",
        "counter",
        "Outbox rows consumed (turned into an event or rejected, then deleted) by this node.",
        m.outbox_rows.get().to_string(),
    );
    metric(
        "orgpulse_outbox_rejected_total",
        "counter",
        "Outbox rows moved to <table>_rejected by this node.",
        m.outbox_rejected.get().to_string(),
    );
    metric(
        "orgpulse_gap_repairs_total",
        "counter",
        "Gaps in a room's events (lost or reordered on the bus) filled from the store.",
        m.gap_repairs.get().to_string(),
    );
    metric(
        "orgpulse_tail_repairs_total",
        "counter",
        "Rooms found behind their org's log head by a tail check, filled from the store.",
        m.tail_repairs.get().to_string(),
    );
    metric(
        "orgpulse_replay_store_reads_total",
        "counter",
        "Store reads made for Subscribe replays, each shared by the subscribers replaying the same part of an org's log.",
        m.replay_reads.get().to_string(),
    );
    metric(
        "orgpulse_bus_dropped_total",
        "counter",
        "Bus messages dropped on this node (found in the store instead).",
        m.bus_dropped.get().to_string(),
    );
    for (name, kind, help, value) in [
        (
            "orgpulse_open_connections",
            "gauge",
            "Client connections open.",
            m.open_connections.get(),
        ),
        (
            "orgpulse_max_connections",
            "gauge",
            "Most client connections held (--max-connections, lowered to what the open-file limit allows).",
            m.max_connections.get(),
        ),
        (
            "orgpulse_connections_evicted_total",
            "counter",
            "Connections without a complete request head closed at capacity to admit a new one.",
            m.connections_evicted.get() as i64,
        ),
        (
            "orgpulse_connections_refused_total",
            "counter",
            "New connections closed at accept: at capacity, none without a request head to evict.",
            m.connections_refused.get() as i64,
        ),
        (
            "orgpulse_connections_head_timeouts_total",
            "counter",
            "Connections closed for sending no complete request head or HTTP/2 preface within 10 s.",
            m.connections_head_timeouts.get() as i64,
        ),
        (
            "orgpulse_accept_errors_total",
            "counter",
            "Failed accepts (out of descriptors and the like).",
            m.accept_errors.get() as i64,
        ),
        (
            "orgpulse_admission_waiting",
            "gauge",
            "Requests (HTTP/2 streams, HTTP/1.1 requests) of new connections waiting at the admission gate for the node to keep up (a reconnect storm).",
            m.admission_waiting.get(),
        ),
        (
            "orgpulse_admission_delayed_total",
            "counter",
            "Requests of new connections that waited at the admission gate before being served.",
            m.admission_delayed.get() as i64,
        ),
        (
            "orgpulse_runtime_lag_microseconds",
            "gauge",
            "How long a woken task last waited for its turn on the runtime (the admission gate's measure).",
            m.runtime_lag_us.get(),
        ),
        (
            "orgpulse_unauthenticated_refusals_total",
            "counter",
            "Calls refused UNAUTHENTICATED on their head, their body unread.",
            m.unauthenticated_refusals.get() as i64,
        ),
        (
            "orgpulse_request_buffer_refusals_total",
            "counter",
            "Calls refused RESOURCE_EXHAUSTED: request bodies being received held --max-request-buffer.",
            m.request_buffer_refusals.get() as i64,
        ),
        (
            "orgpulse_request_body_timeouts_total",
            "counter",
            "Request bodies refused for not being complete within 30 s.",
            m.body_timeouts.get() as i64,
        ),
        (
            "orgpulse_malformed_requests_total",
            "counter",
            "Calls whose request could not be decoded (gRPC or grpc-web framing, protobuf).",
            m.malformed_requests.get() as i64,
        ),
    ] {
        metric(name, kind, help, value.to_string());
    }
    metric(
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time of the server process.",
        format!("{cpu:.2}"),
    );
    metric(
        "process_resident_memory_bytes",
        "gauge",
        "Resident set size.",
        rss.to_string(),
    );
    if let Some(pool) = pool {
        for (name, help, value) in [
            (
                "max_connections",
                "Most connections the store's pool opens.",
                pool.max_size,
            ),
            (
                "connections",
                "Connections the store's pool holds open.",
                pool.size,
            ),
            (
                "available",
                "Open connections idle in the store's pool.",
                pool.available,
            ),
            (
                "waiting",
                "Calls waiting for a connection from the store's pool.",
                pool.waiting,
            ),
        ] {
            metric(
                &format!("orgpulse_store_pool_{name}"),
                "gauge",
                help,
                value.to_string(),
            );
        }
    }
    let connected = node.bus_connected;
    metric(
        "orgpulse_bus_connected",
        "gauge",
        "Whether events from other nodes arrive over the bus (1) or only from the store (0, degraded).",
        u8::from(connected).to_string(),
    );
    let state = if connected { "connected" } else { "degraded" };
    let _ = write!(
        out,
        "# HELP orgpulse_node_info This node's id and bus state.\n# TYPE orgpulse_node_info gauge\n\
         orgpulse_node_info{{node_id=\"{}\",bus_state=\"{state}\"}} 1\n",
        label_value(node.id)
    );
    out
}

/// `v` escaped for a Prometheus label value.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
