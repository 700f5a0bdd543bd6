//! First-run helpers: `--dev` (a development HS256 secret kept in the data directory, and
//! ready-to-paste tokens) and `--demo` (a background workload in org `demo`, so a newcomer sees a
//! live system at once).
use std::{
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use orgpulse::proto::{JobStatus, Severity};
use tokio_util::sync::CancellationToken;

use crate::{
    audience::{Topics, Viewer},
    store::{Entities, JobPatch, JobPick, NewJob, NewNotification},
};

pub const DEMO_ORG: &str = "demo";

/// The development secret in `dir`, created (random, owner-only) when missing.
pub fn dev_secret(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let path = dir.join("dev-jwt-secret");
    if let Ok(s) = std::fs::read_to_string(&path) {
        return Ok(s.trim().as_bytes().to_vec());
    }
    std::fs::create_dir_all(dir)?;
    let secret: String = (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    std::fs::write(&path, &secret)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(secret.into_bytes())
}

/// Prints 24 h tokens for org `demo` (admin, member, viewer) and the dashboard URL.
pub fn print_dev_tokens(secret: &[u8], addr: SocketAddr) -> anyhow::Result<()> {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 24 * 3600;
    let key = jsonwebtoken::EncodingKey::from_secret(secret);
    let mut tokens = Vec::new();
    for (user, role) in [("alice", "admin"), ("bob", "member"), ("carol", "viewer")] {
        let claims = serde_json::json!({"sub": user, "org": DEMO_ORG, "roles": [role], "exp": exp});
        let t = jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key)?;
        tokens.push((user, role, t));
    }
    println!("\ndevelopment mode: tokens for org {DEMO_ORG:?}, valid 24 h");
    for (user, role, t) in &tokens {
        println!("  {role:<7} ({user}): {t}");
    }
    let admin = &tokens[0].2;
    println!("\ndashboard: http://{addr}/#token={admin}");
    println!("\nCLI, in another terminal (as alice):");
    println!("  export ORGPULSE_SERVER=http://{addr}");
    println!("  export ORGPULSE_TOKEN={admin}");
    println!("  cargo run -p orgpulse-cli -- watch     # or `orgpulse watch` once it is installed");
    println!(
        "\ngrpcurl:   grpcurl -plaintext -H \"authorization: Bearer $ORGPULSE_TOKEN\" {addr} orgpulse.v1.JobService/ListJobs"
    );
    println!(
        "buf curl:  npx buf curl --protocol grpc --http2-prior-knowledge -H \"authorization: Bearer $ORGPULSE_TOKEN\" http://{addr}/orgpulse.v1.JobService/ListJobs\n           (in the repository after npm ci, where grpcurl is not installed)\n"
    );
    Ok(())
}

/// The actor of the demo's writes.
const BOT: &str = "demo-bot";

/// The demo bot as audiences see it: it sees every job.
fn bot() -> Viewer {
    Viewer::service(BOT)
}

/// Every job of the demo org.
fn all_jobs() -> JobPick {
    JobPick {
        viewer: bot(),
        topics: Topics::default(),
    }
}

/// Jobs created, progressing and finishing, and now and then a notification, in org `demo`. When
/// `stop` fires its unfinished jobs are cancelled (and so are those a killed demo left behind, at
/// the start), so none stays RUNNING forever.
pub async fn demo_workload(store: Arc<Entities>, stop: CancellationToken) {
    cancel_unfinished(&store).await;
    const TITLES: &[&str] = &[
        "Build release artifacts",
        "Nightly database backup",
        "Resize product images",
        "Send weekly digest",
        "Re-index search",
        "Import customer CSV",
    ];
    let mut tick: u64 = 0;
    let mut tick_timer = tokio::time::interval(Duration::from_millis(1500));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick_timer.tick() => {}
        }
        tick += 1;
        let step = async {
            let page = store
                .list_jobs(DEMO_ORG, vec![], 50, None, all_jobs())
                .await?;
            let active = page
                .jobs
                .iter()
                .filter(|j| j.status() == JobStatus::Queued || j.status() == JobStatus::Running)
                .count();
            if active < 4 {
                let title = TITLES[(tick as usize) % TITLES.len()].to_string();
                let labels = [(
                    "team".to_string(),
                    ["web", "data", "ops"][(tick % 3) as usize].to_string(),
                )]
                .into();
                store
                    .create_job(
                        DEMO_ORG,
                        BOT,
                        NewJob {
                            title,
                            labels,
                            request_id: String::new(),
                            audience: None,
                            topics: vec![],
                        },
                    )
                    .await?;
            }
            for job in &page.jobs {
                let (status, progress, message) = match job.status() {
                    JobStatus::Queued => (
                        Some(JobStatus::Running),
                        Some(0),
                        Some("started".to_string()),
                    ),
                    JobStatus::Running if job.progress >= 100 => {
                        let failed = tick.is_multiple_of(7);
                        let end = if failed {
                            JobStatus::Failed
                        } else {
                            JobStatus::Succeeded
                        };
                        (
                            Some(end),
                            None,
                            Some(if failed { "exit code 1" } else { "done" }.to_string()),
                        )
                    }
                    JobStatus::Running => (
                        None,
                        Some((job.progress + 7 + (tick % 13) as u32).min(100)),
                        None,
                    ),
                    _ => continue,
                };
                let patch = JobPatch {
                    job_id: job.id.clone(),
                    status,
                    progress,
                    title: None,
                    message,
                    expected_version: job.version,
                };
                if let Some(s) =
                    status.filter(|s| matches!(s, JobStatus::Succeeded | JobStatus::Failed))
                {
                    let n = NewNotification {
                        user_id: String::new(),
                        title: format!(
                            "{} {}",
                            job.title,
                            if s == JobStatus::Failed {
                                "failed"
                            } else {
                                "finished"
                            }
                        ),
                        body: String::new(),
                        severity: if s == JobStatus::Failed {
                            Severity::Error
                        } else {
                            Severity::Success
                        } as i32,
                        request_id: String::new(),
                    };
                    store.update_job(DEMO_ORG, &bot(), patch).await?;
                    store.send_notification(DEMO_ORG, BOT, n).await?;
                } else {
                    store.update_job(DEMO_ORG, &bot(), patch).await?;
                }
            }
            // Keep the table short: forget the oldest finished jobs.
            for job in page
                .jobs
                .iter()
                .skip(12)
                .filter(|j| j.status() != JobStatus::Queued && j.status() != JobStatus::Running)
            {
                store.delete_job(DEMO_ORG, &bot(), &job.id).await?;
            }
            Ok::<_, crate::store::StoreError>(())
        };
        if let Err(e) = step.await {
            tracing::debug!(error = %e, "demo step skipped");
        }
    }
    cancel_unfinished(&store).await;
}

/// Cancels the demo's queued and running jobs.
async fn cancel_unfinished(store: &Entities) {
    let active = vec![JobStatus::Queued as i32, JobStatus::Running as i32];
    let cancel = async {
        for job in store
            .list_jobs(DEMO_ORG, active, 500, None, all_jobs())
            .await?
            .jobs
        {
            let patch = JobPatch {
                job_id: job.id,
                status: Some(JobStatus::Cancelled),
                progress: None,
                title: None,
                message: Some("demo stopped".into()),
                expected_version: job.version,
            };
            store.update_job(DEMO_ORG, &bot(), patch).await?;
        }
        Ok::<_, crate::store::StoreError>(())
    };
    if let Err(e) = cancel.await {
        tracing::warn!(error = %e, "could not cancel the demo's unfinished jobs");
    }
}
