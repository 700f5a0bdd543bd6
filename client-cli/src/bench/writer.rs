//! The publishing side: job updates through the public API with the client library, each writer
//! on its own connection updating its own job, at a fixed total rate or as fast as it goes.
use std::time::Duration;

use orgpulse::{
    client::{Client, ClientConfig, TokenSource},
    proto::{Audience, CreateJobRequest, ListJobsRequest, UpdateJobRequest},
};
use tokio::time::Instant;

use crate::error::CliError;

/// A writer's connection and the job it updates.
pub struct Writer {
    client: Client,
    org: String,
    pub job_id: String,
}

/// How a publishing run went.
pub struct Published {
    pub writes: u64,
    pub elapsed: Duration,
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
            job_id: job.id,
        })
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

    /// `count` updates, one at a time, the i-th not before `start + i / rate` (rate 0: at once).
    async fn run(&self, count: u64, rate: f64, start: Instant) -> Result<(), CliError> {
        for i in 0..count {
            if rate > 0.0 {
                tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
            }
            self.client
                .update_job(UpdateJobRequest {
                    org_id: self.org.clone(),
                    job_id: self.job_id.clone(),
                    progress: Some((i % 101) as u32),
                    message: Some(format!("bench update {i}")),
                    ..Default::default()
                })
                .await?;
        }
        Ok(())
    }
}

/// `total` updates split over `writers` running concurrently at `rate` per second in all (0 =
/// each as fast as it goes); returns when every one is committed.
pub async fn publish(writers: &[Writer], total: u64, rate: f64) -> Result<Published, CliError> {
    let n = writers.len();
    let start = Instant::now();
    let runs = writers
        .iter()
        .enumerate()
        .map(|(i, w)| w.run(share(total, n, i), rate / n as f64, start));
    futures::future::try_join_all(runs).await?;
    Ok(Published {
        writes: total,
        elapsed: start.elapsed(),
    })
}

/// How many of `total` updates writer `i` of `writers` makes.
pub fn share(total: u64, writers: usize, i: usize) -> u64 {
    let n = writers as u64;
    total / n + u64::from((i as u64) < total % n)
}
