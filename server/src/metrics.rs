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
    pub fn get(&self) -> i64 {
        self.0.load(Relaxed)
    }
}

#[derive(Default)]
pub struct Metrics {
    pub open_streams: Gauge,
    pub events_committed: Counter,
    pub events_delivered: Counter,
    pub slow_disconnects: Counter,
    pub polls: Counter,
}

pub static METRICS: Metrics = Metrics {
    open_streams: Gauge(AtomicI64::new(0)),
    events_committed: Counter(AtomicU64::new(0)),
    events_delivered: Counter(AtomicU64::new(0)),
    slow_disconnects: Counter(AtomicU64::new(0)),
    polls: Counter(AtomicU64::new(0)),
};

/// Increments the open-streams gauge while alive.
pub struct StreamGauge;

impl StreamGauge {
    pub fn open() -> Self {
        METRICS.open_streams.inc();
        StreamGauge
    }
}

impl Drop for StreamGauge {
    fn drop(&mut self) {
        METRICS.open_streams.dec();
    }
}

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

pub fn render() -> String {
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
        "orgpulse_events_committed_total",
        "counter",
        "Durable events committed by this node.",
        m.events_committed.get().to_string(),
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
    out
}
