//! The resilient orgpulse client: typed calls for every RPC over one or more endpoints, a
//! rotating token source, retries of idempotent calls, and [`Client::watch`], an event stream that
//! reconnects by itself and never loses or repeats a durable event.
//!
//! ```no_run
//! # async fn demo() -> Result<(), orgpulse::client::Error> {
//! use futures::StreamExt;
//! use orgpulse::client::{Client, ClientConfig, TokenSource, WatchFilter, WatchItem};
//!
//! let client = Client::new(ClientConfig {
//!     endpoints: vec!["http://127.0.0.1:8080".into()],
//!     token: TokenSource::File("/run/orgpulse/token".into()),
//!     ..Default::default()
//! })?;
//! let mut events = client.watch(WatchFilter::default(), None);
//! while let Some(item) = events.next().await {
//!     match item? {
//!         WatchItem::Event(ev) => println!("{} {:?}", ev.seq, ev.payload),
//!         WatchItem::State(state) => eprintln!("{state}"),
//!     }
//! }
//! # Ok(()) }
//! ```
mod backoff;
mod error;
mod token;
mod watch;

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tonic::{
    Request, Response, Status,
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

pub use backoff::BackoffConfig;
pub use error::{Error, ErrorClass, is_token_expired};
pub use token::TokenSource;
pub use watch::{ConnState, Watch, WatchFilter, WatchItem};

use crate::proto::{
    BroadcastRequest, BroadcastResponse, CreateJobRequest, DeleteJobRequest, DeleteJobResponse,
    Event, GetJobRequest, Job, ListJobsRequest, ListJobsResponse, ListNotificationsRequest,
    ListNotificationsResponse, ListOnlineRequest, ListOnlineResponse, ListPresenceRequest,
    ListPresenceResponse, MarkReadRequest, MarkReadResponse, Notification, OrgFilter, PollRequest,
    PollResponse, PublishRequest, PublishResponse, SendNotificationRequest, SetPresenceRequest,
    SetPresenceResponse, UpdateJobRequest, event_service_client::EventServiceClient,
    job_service_client::JobServiceClient, notification_service_client::NotificationServiceClient,
};
use backoff::Backoff;
use error::{is_retryable_call, never_sent};
use token::Tokens;

/// How a [`Client`] connects, authenticates and retries.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Server URLs (`http://host:port`, or `https://` for a server with TLS), tried in order; the
    /// client moves to the next one when the current one fails or hangs (see [`HUNG_AFTER`]).
    pub endpoints: Vec<String>,
    /// Where the bearer token comes from.
    pub token: TokenSource,
    /// Delays between reconnects of a watch and between retries of a call.
    pub backoff: BackoffConfig,
    /// Attempts of an idempotent call (reads, creates with a `request_id`, marking read, setting
    /// presence) before its transient failure is returned. `UpdateJob`, `DeleteJob` and
    /// `Broadcast` are only retried when the previous attempt never reached a server (connection
    /// refused).
    pub call_attempts: u32,
    /// Deadline of one unary call (a `Poll` gets its `wait_ms` on top).
    pub call_timeout: Duration,
    /// TCP connect timeout per endpoint.
    pub connect_timeout: Duration,
    /// A watch counts its server as hung, and moves to the next endpoint, when its stream has been
    /// silent (not even a heartbeat) for this long, or opening a stream went unanswered this long.
    pub idle_timeout: Duration,
    /// PEM certificate(s) trusted for `https://` endpoints, besides the system's roots.
    pub ca_certificate: Option<Vec<u8>>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            endpoints: vec!["http://127.0.0.1:8080".into()],
            token: TokenSource::None,
            backoff: BackoffConfig::default(),
            call_attempts: 4,
            call_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(45),
            ca_certificate: None,
        }
    }
}

/// A cheap-to-clone handle on the orgpulse API.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    config: ClientConfig,
    channels: Vec<Channel>,
    current: AtomicUsize,
    tokens: Tokens,
}

/// How long a connection may go without a frame from its server before the client sends an
/// HTTP/2 PING, and then without its answer, before the connection counts as dead: every call and
/// stream on a hung server (SIGSTOPped, or cut off without a reset) fails after at most twice this
/// long, so idempotent calls and watches move to the next endpoint instead of waiting for their
/// deadline. A running server answers a PING at once, however busy its handlers are.
pub const HUNG_AFTER: Duration = Duration::from_secs(5);

/// A fresh idempotency key for `CreateJob` / `SendNotification` / `Publish`.
pub fn new_request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

impl Client {
    /// A client for `config`. Connections are opened lazily, on the first call; must be called
    /// inside a tokio runtime.
    pub fn new(config: ClientConfig) -> Result<Self, Error> {
        if config.endpoints.is_empty() {
            return Err(Error::Config("no server endpoint given".into()));
        }
        let channels = config
            .endpoints
            .iter()
            .map(|url| {
                let mut ep = Endpoint::from_shared(url.clone())
                    .map_err(|e| Error::Config(format!("bad server URL {url:?}: {e}")))?;
                if url.starts_with("https://") {
                    let mut tls = ClientTlsConfig::new().with_native_roots();
                    if let Some(pem) = &config.ca_certificate {
                        tls = tls.ca_certificate(Certificate::from_pem(pem));
                    }
                    ep = ep
                        .tls_config(tls)
                        .map_err(|e| Error::Config(format!("TLS for {url:?}: {e}")))?;
                }
                Ok(ep
                    .connect_timeout(config.connect_timeout)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(HUNG_AFTER)
                    .keep_alive_timeout(HUNG_AFTER)
                    .keep_alive_while_idle(true)
                    .connect_lazy())
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Client {
            inner: Arc::new(Inner {
                tokens: Tokens::new(config.token.clone()),
                config,
                channels,
                current: AtomicUsize::new(0),
            }),
        })
    }

    /// The endpoint in use: its index and channel.
    fn channel(&self) -> (usize, Channel) {
        let i = self.inner.current.load(Ordering::Relaxed) % self.inner.channels.len();
        (i, self.inner.channels[i].clone())
    }

    /// Moves to the endpoint after `failed`, unless another caller already moved on.
    fn rotate(&self, failed: usize) {
        let next = (failed + 1) % self.inner.channels.len();
        let _ =
            self.inner
                .current
                .compare_exchange(failed, next, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// `msg` with the bearer token and a deadline.
    fn request<T>(
        msg: T,
        token: &Option<String>,
        timeout: Option<Duration>,
    ) -> Result<Request<T>, Error> {
        let mut req = Request::new(msg);
        if let Some(t) = token {
            let v: MetadataValue<_> = format!("Bearer {t}").parse().map_err(|_| {
                Error::Token("the token holds characters not allowed in a header".into())
            })?;
            req.metadata_mut().insert("authorization", v);
        }
        if let Some(t) = timeout {
            req.set_timeout(t);
        }
        Ok(req)
    }

    /// Sends a unary call, refreshing an expired token once and retrying with backoff on the next
    /// endpoint when no server got it or, for an `idempotent` call, on any transient failure.
    async fn call<Req, Resp, F, Fut>(
        &self,
        idempotent: bool,
        timeout: Duration,
        msg: Req,
        send: F,
    ) -> Result<Resp, Error>
    where
        Req: Clone,
        F: Fn(Channel, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let cfg = &self.inner.config;
        let mut backoff = Backoff::new(cfg.backoff);
        let mut token = self.inner.tokens.get().await?;
        let mut refreshed = false;
        loop {
            let (idx, channel) = self.channel();
            let req = Self::request(msg.clone(), &token, Some(timeout))?;
            match send(channel, req).await {
                Ok(resp) => return Ok(resp.into_inner()),
                Err(s) if is_token_expired(&s) && !refreshed => {
                    refreshed = true;
                    token = self.inner.tokens.refresh(&token).await?;
                }
                Err(s)
                    if (never_sent(&s) || idempotent && is_retryable_call(&s))
                        && backoff.attempts() + 1 < cfg.call_attempts =>
                {
                    self.rotate(idx);
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(s) => return Err(s.into()),
            }
        }
    }

    fn timeout(&self) -> Duration {
        self.inner.config.call_timeout
    }

    /// `CreateJob`; a `request_id` is generated when empty, so retries never duplicate the job.
    pub async fn create_job(&self, mut req: CreateJobRequest) -> Result<Job, Error> {
        if req.request_id.is_empty() {
            req.request_id = new_request_id();
        }
        self.call(true, self.timeout(), req, |ch, r| async move {
            JobServiceClient::new(ch).create_job(r).await
        })
        .await
    }

    /// `GetJob`.
    pub async fn get_job(&self, req: GetJobRequest) -> Result<Job, Error> {
        self.call(true, self.timeout(), req, |ch, r| async move {
            JobServiceClient::new(ch).get_job(r).await
        })
        .await
    }

    /// `ListJobs` (one page).
    pub async fn list_jobs(&self, req: ListJobsRequest) -> Result<ListJobsResponse, Error> {
        self.call(true, self.timeout(), req, |ch, r| async move {
            JobServiceClient::new(ch).list_jobs(r).await
        })
        .await
    }

    /// `UpdateJob`; retried only when no server got it (a blind retry could apply it twice).
    pub async fn update_job(&self, req: UpdateJobRequest) -> Result<Job, Error> {
        self.call(false, self.timeout(), req, |ch, r| async move {
            JobServiceClient::new(ch).update_job(r).await
        })
        .await
    }

    /// `DeleteJob`; retried only when no server got it.
    pub async fn delete_job(&self, req: DeleteJobRequest) -> Result<DeleteJobResponse, Error> {
        self.call(false, self.timeout(), req, |ch, r| async move {
            JobServiceClient::new(ch).delete_job(r).await
        })
        .await
    }

    /// `SendNotification`; a `request_id` is generated when empty, so retries never duplicate.
    pub async fn send_notification(
        &self,
        mut req: SendNotificationRequest,
    ) -> Result<Notification, Error> {
        if req.request_id.is_empty() {
            req.request_id = new_request_id();
        }
        self.call(true, self.timeout(), req, |ch, r| async move {
            NotificationServiceClient::new(ch)
                .send_notification(r)
                .await
        })
        .await
    }

    /// `ListNotifications` (one page).
    pub async fn list_notifications(
        &self,
        req: ListNotificationsRequest,
    ) -> Result<ListNotificationsResponse, Error> {
        self.call(true, self.timeout(), req, |ch, r| async move {
            NotificationServiceClient::new(ch)
                .list_notifications(r)
                .await
        })
        .await
    }

    /// `MarkRead` (idempotent: marking twice changes nothing).
    pub async fn mark_read(&self, req: MarkReadRequest) -> Result<MarkReadResponse, Error> {
        self.call(true, self.timeout(), req, |ch, r| async move {
            NotificationServiceClient::new(ch).mark_read(r).await
        })
        .await
    }

    /// `Poll`: the deadline is the call timeout plus `wait_ms`.
    pub async fn poll(&self, req: PollRequest) -> Result<PollResponse, Error> {
        let timeout = self.timeout() + Duration::from_millis(req.wait_ms.into());
        self.call(true, timeout, req, |ch, r| async move {
            EventServiceClient::new(ch).poll(r).await
        })
        .await
    }

    /// `Publish` (an entity change); a `request_id` is generated when empty, so retries never
    /// append the change twice.
    pub async fn publish(&self, mut req: PublishRequest) -> Result<PublishResponse, Error> {
        if req.request_id.is_empty() {
            req.request_id = new_request_id();
        }
        self.call(true, self.timeout(), req, |ch, r| async move {
            EventServiceClient::new(ch).publish(r).await
        })
        .await
    }

    /// `ListOnline`.
    pub async fn list_online(&self, req: ListOnlineRequest) -> Result<ListOnlineResponse, Error> {
        self.call(true, self.timeout(), req, |ch, r| async move {
            EventServiceClient::new(ch).list_online(r).await
        })
        .await
    }

    /// `SetPresence` (an empty `state` removes the entry); retried like a read, since setting
    /// the same state twice is the same as once (last write wins).
    pub async fn set_presence(
        &self,
        req: SetPresenceRequest,
    ) -> Result<SetPresenceResponse, Error> {
        self.call(true, self.timeout(), req, |ch, r| async move {
            EventServiceClient::new(ch).set_presence(r).await
        })
        .await
    }

    /// `ListPresence` (a snapshot: subscribe first, then list, to miss nothing).
    pub async fn list_presence(
        &self,
        req: ListPresenceRequest,
    ) -> Result<ListPresenceResponse, Error> {
        self.call(true, self.timeout(), req, |ch, r| async move {
            EventServiceClient::new(ch).list_presence(r).await
        })
        .await
    }

    /// `Broadcast`: at most once, so retried only when no server got it (a server that did may
    /// have delivered it before the reply was lost, and a broadcast carries no idempotency key).
    pub async fn broadcast(&self, req: BroadcastRequest) -> Result<BroadcastResponse, Error> {
        self.call(false, self.timeout(), req, |ch, r| async move {
            EventServiceClient::new(ch).broadcast(r).await
        })
        .await
    }

    /// One raw `Subscribe` stream on the current endpoint, with the current token: no reconnect,
    /// no dedup. Most callers want [`Client::watch`].
    pub async fn subscribe(&self, filter: OrgFilter) -> Result<tonic::Streaming<Event>, Error> {
        let token = self.inner.tokens.get().await?;
        let (_, result) = self.open_stream(filter, &token).await?;
        Ok(result?)
    }

    /// Opens a `Subscribe` stream on the current endpoint; returns the endpoint's index with the
    /// outcome so a failure can rotate away from it. A server answers an open at once (events
    /// follow on the stream), so one silent for the idle timeout is hung: the kernel completes
    /// TCP handshakes for a stopped process, and the call deadline alone would wait it out.
    async fn open_stream(
        &self,
        filter: OrgFilter,
        token: &Option<String>,
    ) -> Result<(usize, Result<tonic::Streaming<Event>, Status>), Error> {
        let (idx, channel) = self.channel();
        let req = Self::request(filter, token, None)?;
        let cfg = &self.inner.config;
        let wait = cfg.call_timeout.min(cfg.idle_timeout);
        let opened = tokio::time::timeout(wait, EventServiceClient::new(channel).subscribe(req))
            .await
            .unwrap_or_else(|_| {
                Err(Status::deadline_exceeded(format!(
                    "Subscribe was not answered in {wait:?}"
                )))
            });
        Ok((idx, opened.map(Response::into_inner)))
    }

    /// The URL of endpoint `idx`.
    fn endpoint(&self, idx: usize) -> &str {
        &self.inner.config.endpoints[idx]
    }
}
