//! The publishing side, through the public API with the client library, each writer on its own
//! connection at a fixed total rate or as fast as it goes: job updates (each writer updating its
//! own job), or broadcasts on one topic (each writer a user sending stamped data: its sequence
//! number and send time, read back by the subscribers for order and latency).
use std::{sync::Mutex, time::Duration};

use orgpulse::{
    client::{Client, ClientConfig, TokenSource},
    proto::{Audience, BroadcastRequest, CreateJobRequest, ListJobsRequest, UpdateJobRequest},
};
use prost_types::{Struct, Value, value::Kind};
use tokio::time::Instant;

use super::{histogram::Histogram, subscriber::now_us};
use crate::error::CliError;

/// The topic of the presence scenario's broadcasts.
pub const BROADCAST_TOPIC: &str = "bench:presence";

/// The server's limit of broadcasts per second per user and node (API.md).
pub const BROADCASTS_PER_USER: f64 = 20.0;

/// The shortest gap between two broadcasts of one writer, even one catching up on its schedule:
/// 10 % above the rate limit's 1/20 s, so a late writer never bursts past the limit.
const MIN_BROADCAST_GAP: Duration = Duration::from_micros((1e6 / BROADCASTS_PER_USER * 1.1) as u64);

/// A writer's connection and what it sends.
pub struct Writer {
    client: Client,
    org: String,
    sends: Sends,
}

enum Sends {
    /// Updates of this job.
    Updates { job_id: String },
    /// Broadcasts on [`BROADCAST_TOPIC`] as this user.
    Broadcasts { user: String },
}

/// How a publishing run went.
pub struct Published {
    pub writes: u64,
    pub elapsed: Duration,
    /// How long each call took to return (empty when the events were not made by calls).
    pub calls: Histogram,
}

/// A client of its own (own connection) for `url` with `token`.
pub fn client(url: &str, token: &str) -> Result<Client, CliError> {
    Ok(Client::new(ClientConfig {
        endpoints: vec![url.to_string()],
        token: TokenSource::Static(token.to_string()),
        ..ClientConfig::default()
    })?)
}

impl Writer {
    /// Connects and creates the job this writer will update (seen by `audience`, when given).
    pub async fn new(
        url: &str,
        token: &str,
        org: &str,
        n: usize,
        audience: Option<Audience>,
    ) -> Result<Writer, CliError> {
        let client = client(url, token)?;
        let job = client
            .create_job(CreateJobRequest {
                org_id: org.to_string(),
                title: format!("bench writer {n}"),
                audience,
                ..Default::default()
            })
            .await?;
        Ok(Writer {
            client,
            org: org.to_string(),
            sends: Sends::Updates { job_id: job.id },
        })
    }

    /// A writer broadcasting on [`BROADCAST_TOPIC`] as `user` (whose `token` this is).
    pub fn broadcaster(url: &str, token: &str, org: &str, user: &str) -> Result<Writer, CliError> {
        Ok(Writer {
            client: client(url, token)?,
            org: org.to_string(),
            sends: Sends::Broadcasts { user: user.into() },
        })
    }

    /// What the subscribers know this writer's events by: its job's id, or its user id.
    pub fn key(&self) -> &str {
        match &self.sends {
            Sends::Updates { job_id } => job_id,
            Sends::Broadcasts { user } => user,
        }
    }

    /// The org's log position now (ListJobs' snapshot cursor).
    pub async fn cursor(&self) -> Result<String, CliError> {
        Ok(self
            .client
            .list_jobs(ListJobsRequest {
                org_id: self.org.clone(),
                page_size: 1,
                ..Default::default()
            })
            .await?
            .cursor)
    }

    /// `count` updates or broadcasts, one at a time, the i-th not before `start + i / rate`
    /// (rate 0: at once), and a broadcast not before [`MIN_BROADCAST_GAP`] after the previous one;
    /// each call's duration goes to `calls`.
    async fn run(
        &self,
        count: u64,
        rate: f64,
        start: Instant,
        calls: &Mutex<Histogram>,
    ) -> Result<(), CliError> {
        let mut last = None;
        for i in 0..count {
            if rate > 0.0 {
                tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
            }
            let call = Instant::now();
            match &self.sends {
                Sends::Updates { job_id } => {
                    self.client
                        .update_job(UpdateJobRequest {
                            org_id: self.org.clone(),
                            job_id: job_id.clone(),
                            progress: Some((i % 101) as u32),
                            message: Some(format!("bench update {i}")),
                            ..Default::default()
                        })
                        .await?;
                }
                Sends::Broadcasts { .. } => {
                    if let Some(last) = last {
                        tokio::time::sleep_until(last + MIN_BROADCAST_GAP).await;
                    }
                    last = Some(Instant::now());
                    self.client
                        .broadcast(BroadcastRequest {
                            org_id: self.org.clone(),
                            topic: BROADCAST_TOPIC.into(),
                            data: Some(stamp(i, now_us())),
                            audience: None,
                        })
                        .await?;
                }
            }
            let took = call.elapsed().as_micros() as u64;
            calls.lock().unwrap().record(took);
        }
        Ok(())
    }
}

/// `total` updates split over `writers` running concurrently at `rate` per second in all (0 =
/// each as fast as it goes); returns when every one is committed.
pub async fn publish(writers: &[Writer], total: u64, rate: f64) -> Result<Published, CliError> {
    let n = writers.len();
    let start = Instant::now();
    let calls = Mutex::new(Histogram::new());
    // Writer i starts i/rate after the first, so together they write evenly at `rate` rather
    // than all at once every n/rate.
    let offset = |i: usize| match rate > 0.0 {
        true => Duration::from_secs_f64(i as f64 / rate),
        false => Duration::ZERO,
    };
    let runs = writers.iter().enumerate().map(|(i, w)| {
        w.run(
            share(total, n, i),
            rate / n as f64,
            start + offset(i),
            &calls,
        )
    });
    futures::future::try_join_all(runs).await?;
    Ok(Published {
        writes: total,
        elapsed: start.elapsed(),
        calls: calls.into_inner().unwrap(),
    })
}

/// How many of `total` updates writer `i` of `writers` makes.
pub fn share(total: u64, writers: usize, i: usize) -> u64 {
    let n = writers as u64;
    total / n + u64::from((i as u64) < total % n)
}

/// A broadcast's data: `{"n": i, "sentUs": µs since the epoch, "x": .., "y": ..}` (a cursor's
/// worth of payload besides the stamp).
fn stamp(n: u64, sent_us: u64) -> Struct {
    let number = |v: u64| Value {
        kind: Some(Kind::NumberValue(v as f64)),
    };
    Struct {
        fields: [
            ("n", number(n)),
            ("sentUs", number(sent_us)),
            ("x", number(n * 7 % 1920)),
            ("y", number(n * 13 % 1080)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    }
}

/// The (n, sentUs) stamp of a broadcast's data, if it has one.
pub fn read_stamp(data: &Struct) -> Option<(u64, u64)> {
    let number = |k: &str| match data.fields.get(k)?.kind {
        Some(Kind::NumberValue(v)) => Some(v as u64),
        _ => None,
    };
    Some((number("n")?, number("sentUs")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_read_back() {
        let sent = now_us();
        assert_eq!(read_stamp(&stamp(41, sent)), Some((41, sent)));
        assert_eq!(read_stamp(&Struct::default()), None);
    }
}
