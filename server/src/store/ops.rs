//! The write operations, written once above the engines: create / update / delete a job, send a
//! notification, mark notifications read, append entity changes. Each is a sequence of steps on
//! the engine's open write transaction ([`WriteTx`]: lock an org's log, read a job for update,
//! save rows, claim or remember a request id, append an event); an engine implements those steps,
//! its group-commit writer (which runs a [`Write`] in a batch, perhaps more than once), its schema
//! and its reads ([`Engine`]), nothing more. [`Entities`] is what the services and the outbox call.
use std::{sync::Arc, time::SystemTime};

use async_trait::async_trait;
use futures::future::BoxFuture;
use orgpulse::proto::{Job, Notification, event::Payload};
use parking_lot::Mutex;
use prost::Message;
use tokio::sync::oneshot;

use super::{
    JobPage, JobPatch, JobPick, JobQuery, Log, NewEntityChange, NewJob, NewNotification,
    NotificationPage, NotificationQuery, Result, Status, StoreError, apply_patch, job_deleted,
    model::{self, RequestKind},
    remembered_seq, remembered_seq_data,
};
use crate::audience::{self, Audience, Viewer};

/// The engine's open write transaction, as the operations see it. Every write of a batch runs in
/// the same transaction; the engine commits (or rolls back) around them.
#[async_trait]
pub trait WriteTx: Send {
    /// The transaction's clock: every row and event it writes carries this time.
    fn now(&self) -> SystemTime;
    /// Locks `org`'s log for the rest of the transaction (before any job row of the org: every
    /// writer takes the locks in this order).
    async fn lock_org(&mut self, org: &str) -> Result<()>;
    /// The stored job row ([`model::job_row`]), locked for update; `None` when the org has no
    /// such job.
    async fn job_for_update(&mut self, org: &str, id: &str) -> Result<Option<Vec<u8>>>;
    /// Inserts a new job (`data` is its row, [`model::job_row`]).
    async fn insert_job(&mut self, job: &Job, data: Vec<u8>) -> Result<()>;
    /// Replaces a job read with [`WriteTx::job_for_update`].
    async fn update_job(&mut self, job: &Job, data: Vec<u8>) -> Result<()>;
    /// Deletes a job; false when the org has no such job.
    async fn delete_job(&mut self, org: &str, id: &str) -> Result<bool>;
    /// Inserts a new notification (`data` is the encoded `n`).
    async fn insert_notification(&mut self, n: &Notification, data: Vec<u8>) -> Result<()>;
    /// Whether `user` may see notification `id` (addressed to them or to the whole org).
    async fn notification_visible(&mut self, org: &str, id: &str, user: &str) -> Result<bool>;
    /// Marks notification `id` read for `user` (again is harmless).
    async fn mark_read(&mut self, org: &str, user: &str, id: &str) -> Result<()>;
    /// The notifications `user` may see and has not read.
    async fn unread_count(&mut self, org: &str, user: &str) -> Result<u32>;
    /// Claims a (non-empty) request id for this transaction: `None` when it is new (or its last
    /// use is past the idempotency window), else what [`WriteTx::remember`] stored for it.
    async fn claim_request(&mut self, key: RequestKey<'_>) -> Result<Option<Vec<u8>>>;
    /// Stores what a claimed request id answers with from now on.
    async fn remember(&mut self, key: RequestKey<'_>, data: Vec<u8>) -> Result<()>;
    /// Appends a durable event to its org's log with the org's next seq; the seq.
    async fn append(&mut self, ev: NewEvent<'_>) -> Result<u64>;
}

/// A durable event to append: what `actor` did in `org`, who may see it and its topics.
pub struct NewEvent<'a> {
    pub org: &'a str,
    pub actor: &'a str,
    /// `None` = everyone in the org.
    pub audience: Option<&'a Audience>,
    pub topics: &'a [String],
    pub payload: Payload,
}

impl<'a> NewEvent<'a> {
    /// An event everyone in the org may see, without topics.
    pub fn to_all(org: &'a str, actor: &'a str, payload: Payload) -> NewEvent<'a> {
        NewEvent {
            org,
            actor,
            audience: None,
            topics: &[],
            payload,
        }
    }

    /// An event about `job`, which has the job's audience and topics.
    fn of_job(
        org: &'a str,
        actor: &'a str,
        job: &'a Job,
        audience: Option<&'a Audience>,
        payload: Payload,
    ) -> NewEvent<'a> {
        NewEvent {
            org,
            actor,
            audience,
            topics: &job.topics,
            payload,
        }
    }
}

/// A request id as the `requests` table keys it: the org, what it creates, the id.
#[derive(Clone, Copy)]
pub struct RequestKey<'a> {
    pub org: &'a str,
    pub kind: RequestKind,
    pub id: &'a str,
}

impl<'a> RequestKey<'a> {
    pub fn new(org: &'a str, kind: RequestKind, id: &'a str) -> RequestKey<'a> {
        RequestKey { org, kind, id }
    }
}

/// A job row: (org, job id).
pub type JobKey = (String, String);

/// One run of a write in an open transaction of type `T`; true when it succeeded.
pub type RunWrite<T> = Box<dyn for<'a> FnMut(&'a mut T) -> BoxFuture<'a, bool> + Send>;

/// A write queued for an engine's group-commit writer. `run` may be called more than once (the
/// batch it was in rolled back): each run keeps its own result. [`Write::answer`] hands the
/// caller the commit's outcome, or else the last run's result; a write dropped unanswered answers
/// UNAVAILABLE.
pub struct Write<T: ?Sized> {
    pub run: RunWrite<T>,
    /// The job row this write reads for update first, if any: an engine may read the rows of a
    /// batch's writes ahead, in one round trip.
    pub job: Option<JobKey>,
    answer: oneshot::Sender<Result<()>>,
}

impl<T: ?Sized + Send + 'static> Write<T> {
    /// A write of `f`, and its caller's answer (`f` must not consume what it captured: it may
    /// run again).
    pub fn new<R, F>(
        job: Option<JobKey>,
        f: F,
    ) -> (Write<T>, impl Future<Output = Result<R>> + Send + 'static)
    where
        R: Send + 'static,
        F: for<'a> Fn(&'a mut T) -> BoxFuture<'a, Result<R>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let result = Arc::new(Mutex::new(None::<Result<R>>));
        let kept = result.clone();
        let write = Write {
            run: Box::new(move |t| {
                let run = f(t);
                let result = result.clone();
                Box::pin(async move {
                    let r = run.await;
                    let ok = r.is_ok();
                    *result.lock() = Some(r);
                    ok
                })
            }),
            job,
            answer: tx,
        };
        let answer = async move {
            let committed = rx.await.unwrap_or_else(|_| Err(dropped_write()));
            committed?;
            kept.lock().take().unwrap_or_else(|| Err(dropped_write()))
        };
        (write, answer)
    }
}

impl<T: ?Sized + 'static> Write<T> {
    /// The same write, run on an engine's transaction `E`, which is a `T`.
    pub fn on<E: ?Sized + 'static>(self, as_t: for<'a> fn(&'a mut E) -> &'a mut T) -> Write<E> {
        let mut run = self.run;
        Write {
            run: Box::new(move |e| run(as_t(e))),
            job: self.job,
            answer: self.answer,
        }
    }

    /// Tells the caller how the transaction that carried this write ended.
    pub fn answer(self, commit: Result<()>) {
        let _ = self.answer.send(commit);
    }
}

/// The answer of a write that was never attempted (its writer is gone or dropped it).
pub fn dropped_write() -> StoreError {
    StoreError::Unavailable("database unavailable: the write was not attempted".into())
}

/// What an engine offers above it: its log, its state, its group-commit writer and its reads of
/// jobs and notifications.
#[async_trait]
pub trait Engine: Log + Status {
    /// Queues `w` for the next group commit (fails when the writer cannot take it).
    async fn enqueue(&self, w: Write<dyn WriteTx>) -> Result<()>;
    /// A job's stored row ([`model::job_row`]); `None` when the org has no such job.
    async fn job_row(&self, org: &str, job_id: &str) -> Result<Option<Vec<u8>>>;
    /// Newest first; `statuses` empty = all; continues before `after` when given; only the jobs
    /// `q.pick` keeps ([`model::JobPager`]).
    async fn list_jobs(&self, q: JobQuery) -> Result<JobPage>;
    /// The notifications `user` may see (addressed to them or to the whole org), newest first.
    async fn list_notifications(&self, q: NotificationQuery) -> Result<NotificationPage>;
}

/// Jobs, notifications and the product's entity changes: what the services and the outbox read
/// and write. Every write is ONE transaction of the engine: the entity change plus its event.
pub struct Entities {
    engine: Arc<dyn Engine>,
}

impl Entities {
    pub fn new(engine: Arc<dyn Engine>) -> Entities {
        Entities { engine }
    }

    /// Runs `f` as one write of the engine's next group commit.
    async fn write<R, F>(&self, job: Option<JobKey>, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: for<'a> Fn(&'a mut (dyn WriteTx + 'static)) -> BoxFuture<'a, Result<R>> + Send + 'static,
    {
        let (write, answer) = Write::new(job, f);
        self.engine.enqueue(write).await?;
        answer.await
    }

    pub async fn create_job(&self, org: &str, actor: &str, new: NewJob) -> Result<Job> {
        let (org, actor) = (org.to_string(), actor.to_string());
        self.write(None, move |tx| {
            let (org, actor, new) = (org.clone(), actor.clone(), new.clone());
            Box::pin(async move {
                let request_id = new.request_id.clone();
                let key = RequestKey::new(&org, RequestKind::Job, &request_id);
                if let Some(d) = claim(tx, key).await? {
                    return decode(&d);
                }
                let audience = new.audience.clone();
                let job = model::new_job(&org, &actor, new, tx.now());
                remember(tx, key, &job.encode_to_vec()).await?;
                tx.insert_job(&job, model::job_row(&job, audience.as_ref()))
                    .await?;
                let payload = Payload::JobCreated(job.clone());
                tx.append(NewEvent::of_job(
                    &org,
                    &actor,
                    &job,
                    audience.as_ref(),
                    payload,
                ))
                .await?;
                Ok(job)
            })
        })
        .await
    }

    /// The job, when `by` may see it (else NOT_FOUND, like a job that does not exist).
    pub async fn get_job(&self, org: &str, job_id: &str, by: &Viewer) -> Result<Job> {
        let row = self.engine.job_row(org, job_id).await?;
        Ok(visible_job(row.as_deref(), job_id, by)?.0)
    }

    /// The jobs `pick` keeps, newest first; `statuses` empty = all; continues before `after`
    /// when given.
    pub async fn list_jobs(
        &self,
        org: &str,
        statuses: Vec<i32>,
        limit: usize,
        after: Option<String>,
        pick: JobPick,
    ) -> Result<JobPage> {
        let q = JobQuery {
            org: org.to_string(),
            statuses,
            limit,
            after,
            pick: Arc::new(pick),
        };
        self.engine.list_jobs(q).await
    }

    /// Updates a job `by` may see (else NOT_FOUND); its event has the job's audience and topics.
    pub async fn update_job(&self, org: &str, by: &Viewer, patch: JobPatch) -> Result<Job> {
        let (org, by) = (org.to_string(), by.clone());
        let row = Some((org.clone(), patch.job_id.clone()));
        self.write(row, move |tx| {
            let (org, by, patch) = (org.clone(), by.clone(), patch.clone());
            Box::pin(async move {
                let (mut job, audience) = job_to_change(tx, &org, &patch.job_id, &by).await?;
                apply_patch(&mut job, &patch, &by.user, tx.now())?;
                tx.update_job(&job, model::job_row(&job, audience.as_ref()))
                    .await?;
                let payload = Payload::JobUpdated(job.clone());
                let event = NewEvent::of_job(&org, &by.user, &job, audience.as_ref(), payload);
                tx.append(event).await?;
                Ok(job)
            })
        })
        .await
    }

    /// Deletes a job `by` may see (else NOT_FOUND); its event has the job's audience and topics.
    pub async fn delete_job(&self, org: &str, by: &Viewer, job_id: &str) -> Result<()> {
        let (org, by, id) = (org.to_string(), by.clone(), job_id.to_string());
        let row = Some((org.clone(), id.clone()));
        self.write(row, move |tx| {
            let (org, by, id) = (org.clone(), by.clone(), id.clone());
            Box::pin(async move {
                let (job, audience) = job_to_change(tx, &org, &id, &by).await?;
                tx.delete_job(&org, &id).await?;
                let event =
                    NewEvent::of_job(&org, &by.user, &job, audience.as_ref(), job_deleted(&id));
                tx.append(event).await?;
                Ok(())
            })
        })
        .await
    }

    pub async fn send_notification(
        &self,
        org: &str,
        actor: &str,
        new: NewNotification,
    ) -> Result<Notification> {
        let (org, actor) = (org.to_string(), actor.to_string());
        self.write(None, move |tx| {
            let (org, actor, new) = (org.clone(), actor.clone(), new.clone());
            Box::pin(async move {
                let request_id = new.request_id.clone();
                let key = RequestKey::new(&org, RequestKind::Notification, &request_id);
                if let Some(d) = claim(tx, key).await? {
                    return decode(&d);
                }
                let n = model::new_notification(&org, &actor, new, tx.now());
                let data = n.encode_to_vec();
                remember(tx, key, &data).await?;
                tx.insert_notification(&n, data).await?;
                tx.append(NewEvent {
                    org: &org,
                    actor: &actor,
                    audience: model::audience(&n).as_ref(),
                    topics: &[],
                    payload: Payload::NotificationNew(n.clone()),
                })
                .await?;
                Ok(n)
            })
        })
        .await
    }

    /// The notifications `user` may see (addressed to them or to the whole org), newest first.
    pub async fn list_notifications(
        &self,
        org: &str,
        user: &str,
        unread_only: bool,
        limit: usize,
        after: Option<String>,
    ) -> Result<NotificationPage> {
        let q = NotificationQuery {
            org: org.to_string(),
            user: user.to_string(),
            unread_only,
            limit,
            after,
        };
        self.engine.list_notifications(q).await
    }

    /// Marks read for `user`; returns their unread count.
    pub async fn mark_read(&self, org: &str, user: &str, ids: Vec<String>) -> Result<u32> {
        let (org, user) = (org.to_string(), user.to_string());
        self.write(None, move |tx| {
            let (org, user, ids) = (org.clone(), user.clone(), ids.clone());
            Box::pin(async move {
                for id in &ids {
                    if !tx.notification_visible(&org, id, &user).await? {
                        return Err(StoreError::NotFound(format!("notification {id} not found")));
                    }
                    tx.mark_read(&org, &user, id).await?;
                }
                tx.unread_count(&org, &user).await
            })
        })
        .await
    }

    /// Appends one `entity_changed` event per change, in order, in one transaction (the event is
    /// the record: there is no entity table). A change whose `request_id` was used within the
    /// idempotency window adds nothing and yields the seq it got then. Returns each change's seq.
    pub async fn append_entity_changes(&self, changes: Vec<NewEntityChange>) -> Result<Vec<u64>> {
        self.write(None, move |tx| {
            Box::pin(append_entity_changes(tx, changes.clone()))
        })
        .await
    }
}

/// The entity changes of [`Entities::append_entity_changes`], in the open transaction `tx`: each
/// change's seq. Its events are published when the transaction commits, with the others'.
pub async fn append_entity_changes(
    tx: &mut dyn WriteTx,
    changes: Vec<NewEntityChange>,
) -> Result<Vec<u64>> {
    let mut seqs = Vec::with_capacity(changes.len());
    for c in changes {
        let key = RequestKey::new(&c.org, c.request_kind, &c.request_id);
        if let Some(d) = claim(tx, key).await? {
            seqs.push(remembered_seq(&d)?);
            continue;
        }
        let seq = tx
            .append(NewEvent {
                org: &c.org,
                actor: &c.actor,
                audience: c.audience.as_ref(),
                topics: &c.topics,
                payload: Payload::EntityChanged(c.change),
            })
            .await?;
        remember(tx, key, &remembered_seq_data(seq)).await?;
        seqs.push(seq);
    }
    Ok(seqs)
}

/// [`WriteTx::claim_request`] for a request id that makes the create idempotent (an empty one
/// never does).
async fn claim(tx: &mut dyn WriteTx, key: RequestKey<'_>) -> Result<Option<Vec<u8>>> {
    if !model::is_idempotent(key.id) {
        return Ok(None);
    }
    tx.claim_request(key).await
}

/// [`WriteTx::remember`] for a request id that makes the create idempotent.
async fn remember(tx: &mut dyn WriteTx, key: RequestKey<'_>, data: &[u8]) -> Result<()> {
    if !model::is_idempotent(key.id) {
        return Ok(());
    }
    tx.remember(key, data.to_vec()).await
}

/// Locks `org`'s log, then reads job `id` for update: the job and its audience, when `by` may
/// see it (else NOT_FOUND).
async fn job_to_change(
    tx: &mut dyn WriteTx,
    org: &str,
    id: &str,
    by: &Viewer,
) -> Result<(Job, Option<Audience>)> {
    tx.lock_org(org).await?;
    let row = tx.job_for_update(org, id).await?;
    visible_job(row.as_deref(), id, by)
}

/// The job of a stored row and its audience, when `by` may see it; NOT_FOUND when there is no
/// row or `by` may not (existence is not leaked).
fn visible_job(row: Option<&[u8]>, id: &str, by: &Viewer) -> Result<(Job, Option<Audience>)> {
    let found = row.map(model::job_of_row).transpose()?;
    match found {
        Some((job, audience)) if audience::admits(audience.as_ref(), by) => Ok((job, audience)),
        _ => Err(model::job_not_found(id)),
    }
}

/// A stored row's message.
pub fn decode<M: Message + Default>(data: &[u8]) -> Result<M> {
    M::decode(data).map_err(|e| StoreError::Internal(format!("corrupt row: {e}")))
}

#[cfg(test)]
pub mod testing {
    //! What the engines' writer tests share.
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A write that appends one event to `org`, counting its runs in `runs`; it fails after
    /// appending when `fail` says so (then it wrote: its batch must not keep it).
    pub fn appending<T: WriteTx + 'static>(
        org: &'static str,
        fail: bool,
        runs: Arc<AtomicUsize>,
    ) -> (Write<T>, impl Future<Output = Result<u64>> + Send + 'static) {
        Write::new(None, move |tx: &mut T| -> BoxFuture<'_, Result<u64>> {
            let runs = runs.clone();
            Box::pin(async move {
                runs.fetch_add(1, Ordering::Relaxed);
                let seq = tx
                    .append(NewEvent::to_all(org, "u", job_deleted("x")))
                    .await?;
                if fail {
                    return Err(StoreError::Aborted("this write fails".into()));
                }
                Ok(seq)
            })
        })
    }
}
