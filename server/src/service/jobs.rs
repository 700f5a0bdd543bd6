//! JobService: create, read, list, update and delete an org's jobs.
use std::sync::Arc;

use orgpulse::proto::{
    CreateJobRequest, DeleteJobRequest, DeleteJobResponse, GetJobRequest, Job, JobStatus,
    ListJobsRequest, ListJobsResponse, UpdateJobRequest, job_service_server::JobService,
};
use tonic::{Request, Response, Status};

use super::{Ctx, page_token};
use crate::{
    audience::{self, Audience, Topics},
    auth::Need,
    cursor::Cursor,
    store::{JobPatch, JobPick, NewJob},
    validate::{
        self, MAX_LABEL_KEY, MAX_LABEL_VALUE, MAX_LABELS, MAX_MESSAGE, MAX_PROGRESS, MAX_TITLE,
    },
};

pub struct Jobs(pub Arc<Ctx>);

fn status(field: &str, v: i32) -> Result<JobStatus, Status> {
    match JobStatus::try_from(v) {
        Ok(JobStatus::Unspecified) | Err(_) => Err(Status::invalid_argument(format!(
            "{field} {v} is not a job status"
        ))),
        Ok(s) => Ok(s),
    }
}

/// The distinct statuses of a `ListJobs` filter, each validated (at most the five statuses
/// however many times the request repeats them).
fn status_filter(statuses: &[i32]) -> Result<Vec<i32>, Status> {
    let mut distinct = Vec::new();
    for &s in statuses {
        status("statuses:", s)?;
        if !distinct.contains(&s) {
            distinct.push(s);
        }
    }
    Ok(distinct)
}

#[tonic::async_trait]
impl JobService for Jobs {
    async fn create_job(&self, req: Request<CreateJobRequest>) -> Result<Response<Job>, Status> {
        let (claims, org) = self.0.authorize(&req, &req.get_ref().org_id, Need::Write)?;
        let r = req.into_inner();
        validate::text("title", &r.title, 1, MAX_TITLE)?;
        if r.labels.len() > MAX_LABELS {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_LABELS} labels are allowed"
            )));
        }
        for (k, v) in &r.labels {
            validate::text("label key", k, 1, MAX_LABEL_KEY)?;
            validate::text("label value", v, 0, MAX_LABEL_VALUE)?;
        }
        validate::request_id(&r.request_id)?;
        audience::event_topics("topics", &r.topics)?;
        let new = NewJob {
            title: r.title,
            labels: r.labels,
            request_id: r.request_id,
            audience: Audience::from_request(r.audience.as_ref(), "")?,
            topics: r.topics,
        };
        Ok(Response::new(
            self.0
                .store
                .entities
                .create_job(&org, &claims.user, new)
                .await?,
        ))
    }

    async fn get_job(&self, req: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let (claims, org) = self.0.authorize(&req, &req.get_ref().org_id, Need::Read)?;
        validate::object_id("job_id", &req.get_ref().job_id)?;
        Ok(Response::new(
            self.0
                .store
                .entities
                .get_job(&org, &req.get_ref().job_id, &claims.viewer())
                .await?,
        ))
    }

    async fn list_jobs(
        &self,
        req: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let (claims, org) = self.0.authorize(&req, &req.get_ref().org_id, Need::Read)?;
        let r = req.into_inner();
        let statuses = status_filter(&r.statuses)?;
        let limit = validate::page_size(r.page_size)?;
        let after = page_token(&r.page_token)?;
        let pick = JobPick {
            viewer: claims.viewer(),
            topics: Topics::from_request(&r.topics)?,
        };
        let page = self
            .0
            .store
            .entities
            .list_jobs(&org, statuses, limit, after, pick)
            .await?;
        let cursor = Cursor {
            epoch: self.0.store.log.org_epoch(&org),
            seq: page.head,
        }
        .encode();
        Ok(Response::new(ListJobsResponse {
            jobs: page.jobs,
            next_page_token: page.next.unwrap_or_default(),
            cursor,
        }))
    }

    async fn update_job(&self, req: Request<UpdateJobRequest>) -> Result<Response<Job>, Status> {
        let (claims, org) = self.0.authorize(&req, &req.get_ref().org_id, Need::Write)?;
        let r = req.into_inner();
        validate::object_id("job_id", &r.job_id)?;
        let new_status = r.status.map(|s| status("status", s)).transpose()?;
        if r.progress.is_some_and(|p| p > MAX_PROGRESS) {
            return Err(Status::invalid_argument(format!(
                "progress must be between 0 and {MAX_PROGRESS}"
            )));
        }
        if let Some(t) = &r.title {
            validate::text("title", t, 1, MAX_TITLE)?;
        }
        if let Some(m) = &r.message {
            validate::text("message", m, 0, MAX_MESSAGE)?;
        }
        let patch = JobPatch {
            job_id: r.job_id,
            status: new_status,
            progress: r.progress,
            title: r.title,
            message: r.message,
            expected_version: r.expected_version,
        };
        Ok(Response::new(
            self.0
                .store
                .entities
                .update_job(&org, &claims.viewer(), patch)
                .await?,
        ))
    }

    async fn delete_job(
        &self,
        req: Request<DeleteJobRequest>,
    ) -> Result<Response<DeleteJobResponse>, Status> {
        let (claims, org) = self.0.authorize(&req, &req.get_ref().org_id, Need::Admin)?;
        validate::object_id("job_id", &req.get_ref().job_id)?;
        self.0
            .store
            .entities
            .delete_job(&org, &claims.viewer(), &req.get_ref().job_id)
            .await?;
        Ok(Response::new(DeleteJobResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_filter_keeps_each_status_once() {
        let repeated: Vec<i32> = (0..500_000).map(|i| 1 + i % 5).collect();
        assert_eq!(status_filter(&repeated).unwrap(), [1, 2, 3, 4, 5]);
        assert_eq!(status_filter(&[3, 3, 1]).unwrap(), [3, 1]);
        assert!(status_filter(&[1, 0]).is_err());
    }
}
