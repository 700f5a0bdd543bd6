//! The engine-independent rules of the Store, written once above the engines: how a new Job and
//! Notification are built, who may see a notification, the idempotency policy, paging, the
//! search for the retention boundary, and how a writer's health is kept. An engine file holds SQL
//! and connection handling only.
use std::{sync::Arc, time::SystemTime};

use orgpulse::proto::{EventKind, Job, JobStatus, Notification, event::Payload};
use prost::Message;

use crate::audience::Audience;

use parking_lot::Mutex;

use super::{
    IDEMPOTENCY_WINDOW, JobPage, JobPick, JobQuery, LogBounds, NewJob, NewNotification, Result,
    StoreError, millis, payload_kind, timestamp,
};

/// A new job as `actor` creates it in `org` at `now`: queued, version 1.
pub fn new_job(org: &str, actor: &str, new: NewJob, now: SystemTime) -> Job {
    let mut job = Job {
        id: ulid::Ulid::new().to_string(),
        org_id: org.to_string(),
        title: new.title,
        progress: 0,
        labels: new.labels,
        topics: new.topics,
        created_by: actor.to_string(),
        updated_by: actor.to_string(),
        created_at: Some(timestamp(now)),
        updated_at: Some(timestamp(now)),
        version: 1,
        ..Default::default()
    };
    job.set_status(JobStatus::Queued);
    job
}

/// A new notification as `actor` sends it in `org` at `now`, unread.
pub fn new_notification(
    org: &str,
    actor: &str,
    new: NewNotification,
    now: SystemTime,
) -> Notification {
    Notification {
        id: ulid::Ulid::new().to_string(),
        org_id: org.to_string(),
        user_id: new.user_id,
        title: new.title,
        body: new.body,
        severity: new.severity,
        created_by: actor.to_string(),
        created_at: Some(timestamp(now)),
        read: false,
    }
}

/// Who may see a notification's event: the one user it is addressed to; `None` = everyone in
/// the org.
pub fn audience(n: &Notification) -> Option<Audience> {
    (!n.user_id.is_empty()).then(|| Audience::one_user(&n.user_id))
}

/// The audience part of a stored job row (see [`job_row`]).
#[derive(Clone, PartialEq, prost::Message)]
struct JobRowAudience {
    #[prost(string, optional, tag = "1000")]
    audience: Option<String>,
}

/// A job's stored row: the `Job`'s encoding followed by its audience's stored text as field 1000,
/// which decoding a `Job` skips, so the audience is never handed out with the job.
pub fn job_row(job: &Job, audience: Option<&Audience>) -> Vec<u8> {
    let mut row = job.encode_to_vec();
    if let Some(a) = audience {
        let field = JobRowAudience {
            audience: Some(crate::audience::stored(a)),
        };
        field.encode(&mut row).expect("a Vec grows as needed");
    }
    row
}

/// A job and its audience from its stored row.
pub fn job_of_row(row: &[u8]) -> Result<(Job, Option<Audience>)> {
    let corrupt = |e: String| StoreError::Internal(format!("corrupt job row: {e}"));
    let job = Job::decode(row).map_err(|e| corrupt(e.to_string()))?;
    let audience = JobRowAudience::decode(row)
        .map_err(|e| corrupt(e.to_string()))?
        .audience
        .map(|t| crate::audience::from_stored(&t))
        .transpose()
        .map_err(corrupt)?;
    Ok((job, audience))
}

/// The kind of an event appended to a log; an ephemeral payload never is.
pub fn durable_kind(payload: &Payload) -> Result<EventKind> {
    payload_kind(payload)
        .ok_or_else(|| StoreError::Internal("an ephemeral event cannot be appended".into()))
}

/// What a `request_id` makes idempotent: the object a create stored under (org, kind, id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Job,
    Notification,
    /// `EventService.Publish`'s request ids.
    Publish,
    /// Outbox row keys.
    Outbox,
}

impl RequestKind {
    /// The key column's value.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Job => "job",
            RequestKind::Notification => "notification",
            RequestKind::Publish => "publish",
            RequestKind::Outbox => "outbox",
        }
    }
}

/// Whether a create with `request_id` is idempotent at all (an empty id never is).
pub fn is_idempotent(request_id: &str) -> bool {
    !request_id.is_empty()
}

/// Stored requests committed at or after this instant (epoch ms) still answer a repeated create.
pub fn requests_valid_since(now: SystemTime) -> i64 {
    millis(now - IDEMPOTENCY_WINDOW)
}

/// Where a newest-first page starts: after the token's id, or above every id (ids are ULIDs,
/// compared bytewise, and `~` sorts after each of their characters).
pub fn page_start(after: Option<String>) -> String {
    after.unwrap_or_else(|| "~".into())
}

/// Cuts `rows` (read with `limit + 1`) to one page; the token of the next page when there is one.
pub fn into_page<T>(
    mut rows: Vec<T>,
    limit: usize,
    id: impl Fn(&T) -> &str,
) -> (Vec<T>, Option<String>) {
    let next = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|r| id(r).to_string())
    } else {
        None
    };
    (rows, next)
}

/// Most job rows one `ListJobs` reads: a caller who may see few of an org's jobs gets a short
/// page (with a token to go on) rather than a scan of the whole org.
pub const JOB_SCAN: usize = 2000;
/// Fewest rows one read of a `ListJobs` scan asks for.
const JOB_READ_MIN: usize = 100;

/// Fills one newest-first page of the jobs a caller may have from job rows read newest first:
/// the engine reads `want()` rows after `after()` while it asks, feeds each row, and says when a
/// read came back short ([`JobPager::end`]).
pub struct JobPager {
    pick: Arc<JobPick>,
    limit: usize,
    jobs: Vec<Job>,
    scanned: usize,
    after: String,
    next: Option<String>,
    done: bool,
}

impl JobPager {
    pub fn new(q: &JobQuery) -> JobPager {
        JobPager {
            pick: q.pick.clone(),
            limit: q.limit,
            jobs: Vec::with_capacity(q.limit + 1),
            scanned: 0,
            after: page_start(q.after.clone()),
            next: None,
            done: false,
        }
    }

    /// How many rows to read next; 0 = the page is complete.
    pub fn want(&self) -> usize {
        if self.done {
            return 0;
        }
        (self.limit + 1 - self.jobs.len())
            .max(JOB_READ_MIN)
            .min(JOB_SCAN - self.scanned)
    }

    /// The id the next read continues below (exclusive).
    pub fn after(&self) -> &str {
        &self.after
    }

    /// One row of the read, in order (rows after the page is complete are ignored).
    pub fn feed(&mut self, id: &str, row: &[u8]) -> Result<()> {
        if self.done {
            return Ok(());
        }
        self.scanned += 1;
        if let Some(job) = self.pick.pick(row)? {
            if self.jobs.len() == self.limit {
                self.next = self.jobs.last().map(|j| j.id.clone());
                self.done = true;
                return Ok(());
            }
            self.jobs.push(job);
        }
        self.after = id.to_string();
        if self.scanned == JOB_SCAN {
            self.next = Some(self.after.clone());
            self.done = true;
        }
        Ok(())
    }

    /// The last read returned fewer rows than asked: the org has no more.
    pub fn end(&mut self) {
        self.done = true;
    }

    pub fn page(self, head: u64) -> JobPage {
        JobPage {
            jobs: self.jobs,
            next: self.next,
            head,
        }
    }
}

/// The search for the last seq of a retained log committed before a cutoff: a binary search
/// over seq (commit time grows with seq), driven by an engine that looks up the commit time of
/// the seq [`RetentionSearch::probe`] names and reports it to [`RetentionSearch::observe`].
#[derive(Debug, Clone, Copy)]
pub struct RetentionSearch {
    lo: u64,
    hi: u64,
    cutoff: i64,
    first_checked: bool,
}

impl RetentionSearch {
    /// Searches `b.floor+1 ..= b.head` for events committed before `cutoff` (epoch ms).
    pub fn new(b: LogBounds, cutoff: i64) -> Self {
        RetentionSearch {
            lo: b.floor,
            hi: b.head,
            cutoff,
            first_checked: false,
        }
    }

    /// The seq whose commit time is needed next; `None` when the search is over.
    pub fn probe(&self) -> Option<u64> {
        if !self.first_checked {
            // Most orgs have nothing to trim: one lookup of the oldest retained event says so.
            return (self.lo < self.hi).then_some(self.lo + 1);
        }
        (self.lo < self.hi).then(|| self.lo + (self.hi - self.lo).div_ceil(2))
    }

    /// The commit time (epoch ms) of the probed seq; `None` when that event is gone.
    pub fn observe(&mut self, created_ms: Option<i64>) {
        let Some(seq) = self.probe() else { return };
        let older = created_ms.is_some_and(|t| t < self.cutoff);
        if !self.first_checked {
            self.first_checked = true;
            if older {
                self.lo = seq;
            } else {
                self.hi = self.lo;
            }
            return;
        }
        if older {
            self.lo = seq;
        } else {
            self.hi = seq - 1;
        }
    }

    /// The last seq committed before the cutoff, or the floor when there is none.
    pub fn result(&self) -> u64 {
        self.lo
    }
}

/// Why the writer cannot write, from its last transaction; `None` = it can.
#[derive(Default)]
pub struct WriterHealth(Mutex<Option<String>>);

impl WriterHealth {
    pub fn record(&self, outcome: &Result<()>) {
        let failure = outcome.as_ref().err().map(ToString::to_string);
        let mut last = self.0.lock();
        if *last != failure {
            match &failure {
                Some(why) => tracing::error!(reason = why, "store cannot write"),
                None => tracing::info!("store can write again"),
            }
            *last = failure;
        }
    }

    /// `Status::health`: whether the last transaction (or probe) could write.
    pub fn state(&self) -> std::result::Result<(), String> {
        match &*self.0.lock() {
            None => Ok(()),
            Some(why) => Err(why.clone()),
        }
    }
}

/// Marks the store unwritable when the writer ends, however it ends (panics included).
pub struct WriterGone(Arc<WriterHealth>);

impl WriterGone {
    pub fn new(health: Arc<WriterHealth>) -> Self {
        WriterGone(health)
    }

    pub fn health(&self) -> &WriterHealth {
        &self.0
    }
}

impl Drop for WriterGone {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.record(&Err(writer_stopped()));
        } else {
            // The store was dropped (shutdown): the same state, without an error in the log.
            tracing::debug!("store writer stopped");
            *self.0.0.lock() = Some(writer_stopped().to_string());
        }
    }
}

pub fn writer_stopped() -> StoreError {
    StoreError::Unavailable("store writer stopped".into())
}

/// The error for a job that is not in the org (API.md: existence is not leaked across orgs).
pub fn job_not_found(id: &str) -> StoreError {
    StoreError::NotFound(format!("job {id} not found"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the search over a log whose seq `s` was committed at `s * 10` ms.
    fn search(b: LogBounds, cutoff: i64) -> (u64, usize) {
        let mut s = RetentionSearch::new(b, cutoff);
        let mut lookups = 0;
        while let Some(seq) = s.probe() {
            lookups += 1;
            let present = seq > b.floor && seq <= b.head;
            s.observe(present.then_some(seq as i64 * 10));
        }
        (s.result(), lookups)
    }

    #[test]
    fn retention_boundary_is_found_by_seq() {
        let b = LogBounds { floor: 3, head: 13 };
        for (cutoff, want) in [
            (0, 3),
            (40, 3),
            (41, 4),
            (85, 8),
            (130, 12),
            (131, 13),
            (1000, 13),
        ] {
            assert_eq!(search(b, cutoff).0, want, "cutoff {cutoff}");
        }
        assert_eq!(search(b, 40), (3, 1), "nothing to trim costs one lookup");
        let empty = LogBounds {
            floor: 13,
            head: 13,
        };
        assert_eq!(search(empty, 1000), (13, 0));
    }

    #[test]
    fn pages_cut_at_the_limit() {
        let ids = vec!["c", "b", "a"];
        assert_eq!(
            into_page(ids.clone(), 2, |s| s),
            (vec!["c", "b"], Some("b".into()))
        );
        assert_eq!(into_page(ids, 3, |s| s), (vec!["c", "b", "a"], None));
        assert_eq!(page_start(None), "~");
        assert!("~" > "01J0ZZZZZZZZZZZZZZZZZZZZZZ");
    }
}
