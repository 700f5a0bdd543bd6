//! The `jobs` commands (JobService).
use orgpulse::{
    client::Client,
    proto::{CreateJobRequest, DeleteJobRequest, GetJobRequest, ListJobsRequest, UpdateJobRequest},
};

use crate::{
    cli::JobsCommand,
    cursor,
    error::CliError,
    output::{Printer, note},
};

pub async fn run(client: &Client, cmd: JobsCommand, out: &Printer) -> Result<(), CliError> {
    match cmd {
        JobsCommand::Create {
            org,
            title,
            labels,
            audience,
            topics,
            request_id,
        } => {
            let job = client
                .create_job(CreateJobRequest {
                    org_id: org.org,
                    title,
                    labels: labels.into_iter().collect(),
                    request_id: request_id.unwrap_or_default(),
                    audience: audience.proto(),
                    topics,
                })
                .await?;
            out.job(&job)
        }
        JobsCommand::Get { org, id } => out.job(
            &client
                .get_job(GetJobRequest {
                    org_id: org.org,
                    job_id: id,
                })
                .await?,
        ),
        JobsCommand::List {
            org,
            status,
            topics,
            page_size,
            cursor_file,
        } => {
            let mut req = ListJobsRequest {
                org_id: org.org,
                statuses: status.iter().map(|s| s.proto() as i32).collect(),
                page_size,
                page_token: String::new(),
                topics,
            };
            let mut first = true;
            loop {
                let page = client.list_jobs(req.clone()).await?;
                // The first page's position: events after it cover every later change.
                if let Some(f) = cursor_file.as_deref().filter(|_| first) {
                    cursor::save(f, &page.cursor)?;
                }
                first = false;
                for job in &page.jobs {
                    out.job(job)?;
                }
                if page.next_page_token.is_empty() {
                    return Ok(());
                }
                req.page_token = page.next_page_token;
            }
        }
        JobsCommand::Update {
            org,
            id,
            status,
            progress,
            title,
            message,
            expected_version,
        } => {
            if status.is_none() && progress.is_none() && title.is_none() && message.is_none() {
                return Err(CliError::usage(
                    "nothing to change: give --status, --progress, --title or --message",
                ));
            }
            let job = client
                .update_job(UpdateJobRequest {
                    org_id: org.org,
                    job_id: id,
                    status: status.map(|s| s.proto() as i32),
                    progress,
                    title,
                    message,
                    expected_version,
                })
                .await?;
            out.job(&job)
        }
        JobsCommand::Delete { org, id } => {
            client
                .delete_job(DeleteJobRequest {
                    org_id: org.org,
                    job_id: id.clone(),
                })
                .await?;
            note(&format!("deleted job {id}"));
            Ok(())
        }
    }
}
