//! EventService: `Subscribe` (replay after a cursor, `caught_up`, then live, each durable event
//! exactly once and in seq order), `Poll` (the long-poll fallback), `ListOnline`, `Publish` (in
//! `publish`) and `SetPresence` / `ListPresence` / `Broadcast` (in `activity`).
//!
//! The service is written out by hand rather than generated so that `Subscribe` can send the
//! Hub's pre-encoded event bytes as they are (through `stream_body`): an event is encoded once,
//! not once per subscriber.
use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll as TaskPoll},
    time::Duration,
};

use bytes::Bytes;
use futures::{Stream, StreamExt, future::BoxFuture};
use orgpulse::proto::{
    CaughtUp, Event, Heartbeat, ListOnlineRequest, ListOnlineResponse, OrgFilter, PollRequest,
    PollResponse, Resync, event::Payload,
};
use prost::Message;
use tokio::time::Instant;
use tonic::{
    Request, Response, Status,
    codec::Codec,
    server::{Grpc, NamedService},
};
use tonic_prost::ProstCodec;

use super::{
    Ctx, activity,
    stream_body::{EventStream, server_streaming},
};
use crate::{
    audience::Topics,
    auth::{self, Need},
    cursor::Cursor,
    hub::{Cut, EntityTypes, Filter, Kinds, Replay},
    metrics::METRICS,
    presence::{PresenceGuard, Via},
    store::{LogRead, timestamp},
    user_slots::UserSlot,
    validate::{DEFAULT_POLL_EVENTS, MAX_POLL_EVENTS, MAX_POLL_WAIT_MS, MAX_REQUEST},
};

/// Events read from the Store per page by a Poll.
const REPLAY_PAGE: usize = 1000;

/// The tower service for `orgpulse.v1.EventService`.
#[derive(Clone)]
pub struct EventServer(pub Arc<Ctx>);

impl NamedService for EventServer {
    const NAME: &'static str = "orgpulse.v1.EventService";
}

impl<B> tower::Service<http::Request<B>> for EventServer
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> TaskPoll<Result<(), Infallible>> {
        TaskPoll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let ctx = self.0.clone();
        match req.uri().path() {
            "/orgpulse.v1.EventService/Subscribe" => Box::pin(async move {
                Ok(server_streaming(req, MAX_REQUEST, |r| subscribe(ctx, r)).await)
            }),
            "/orgpulse.v1.EventService/Poll" => unary(ctx, req, poll),
            "/orgpulse.v1.EventService/Publish" => unary(ctx, req, super::publish::publish),
            "/orgpulse.v1.EventService/ListOnline" => unary(ctx, req, list_online),
            "/orgpulse.v1.EventService/SetPresence" => unary(ctx, req, activity::set_presence),
            "/orgpulse.v1.EventService/ListPresence" => unary(ctx, req, activity::list_presence),
            "/orgpulse.v1.EventService/Broadcast" => unary(ctx, req, activity::broadcast),
            _ => Box::pin(async { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}

/// A unary method: `f` answers the decoded request, within the request size limit.
fn unary<B, Req, Resp, F, Fut>(
    ctx: Arc<Ctx>,
    req: http::Request<B>,
    f: F,
) -> BoxFuture<'static, Result<http::Response<tonic::body::Body>, Infallible>>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
    Req: Message + Default + Send + 'static,
    Resp: Message + Send + 'static,
    F: Fn(Arc<Ctx>, Request<Req>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<Resp>, Status>> + Send + 'static,
{
    Box::pin(async move {
        let svc = tower::service_fn(move |r| f(ctx.clone(), r));
        Ok(limits(Grpc::new(ProstCodec::<Resp, Req>::default()))
            .unary(svc, req)
            .await)
    })
}

fn limits<C: Codec>(g: Grpc<C>) -> Grpc<C> {
    g.apply_max_message_size_config(Some(MAX_REQUEST), None)
}

fn parse_cursor(s: &str) -> Result<Option<Cursor>, Status> {
    if s.is_empty() {
        return Ok(None);
    }
    Cursor::decode(s).map(Some).ok_or_else(|| {
        Status::invalid_argument("after_cursor is malformed (not a cursor this server issued)")
    })
}

/// An ephemeral control event (heartbeat, caught_up, resync) carrying the position to resume from.
fn control(org: &str, epoch: u64, pos: u64, payload: Payload) -> Bytes {
    Event {
        cursor: Cursor { epoch, seq: pos }.encode(),
        seq: 0,
        org_id: org.to_string(),
        time: Some(timestamp(std::time::SystemTime::now())),
        actor: String::new(),
        topics: vec![],
        payload: Some(payload),
    }
    .encode_to_vec()
    .into()
}

async fn subscribe(
    ctx: Arc<Ctx>,
    req: Request<OrgFilter>,
) -> Result<Response<EventStream>, Status> {
    let (claims, org) = ctx.authorize(&req, &req.get_ref().org_id, Need::Read)?;
    let filter = req.into_inner();
    let kinds = Kinds::from_request(&filter.kinds)?;
    let entity_types = EntityTypes::from_request(&filter.entity_types)?;
    let from = parse_cursor(&filter.after_cursor)?;
    let filter = Filter {
        viewer: Arc::new(claims.viewer()),
        kinds,
        entity_types,
        topics: Topics::from_request(&filter.topics)?,
    };
    let slot = ctx.streams.acquire(&org, &claims.user)?;
    let reg = ctx.hub.register(&org, filter.clone()).await?;
    let presence = ctx
        .presence
        .clone()
        .connect(&org, &claims.user, Via::Stream);
    let expires = Instant::now() + claims.time_left();
    tracing::info!(org, user = claims.user, "stream opened");
    let held = Held {
        _slot: slot,
        _presence: presence,
    };
    let stream = subscription(ctx, org, filter, from, reg, expires, held);
    Ok(Response::new(Box::pin(stream)))
}

/// What an open stream holds until it ends, however it ends: its slot in the per-user stream
/// limit and its user's presence.
struct Held {
    _slot: UserSlot,
    _presence: PresenceGuard,
}

/// What woke a live stream.
enum Wake {
    Item(Option<crate::hub::Item>),
    Heartbeat,
    Expired,
}

fn subscription(
    ctx: Arc<Ctx>,
    org: String,
    filter: Filter,
    from: Option<Cursor>,
    mut reg: crate::hub::Registration,
    expires: Instant,
    held: Held,
) -> impl Stream<Item = Result<Bytes, Status>> + Send + 'static {
    async_stream::try_stream! {
        let _gauge = METRICS.open_streams.hold();
        let _held = held;
        let mut log = StreamLog { org: org.clone(), user: filter.viewer.user.clone(), sent: 0, end: "client went away" };
        let store = ctx.store.log.clone();
        let epoch = store.org_epoch(&org);
        // Position: the last seq this subscriber has seen or skipped.
        // Without a cursor: live from the room's position (every later event is queued). A
        // cursor past the room's position is checked against the log's head (one the log never
        // reached is a resync).
        let (mut pos, mut resync) = match from {
            Some(c) if c.epoch == epoch && c.seq <= reg.joined => (c.seq, false),
            Some(c) if c.epoch == epoch => match store.bounds(&org).await?.head {
                head if c.seq <= head => (c.seq, false),
                head => (head, true),
            },
            Some(_) => (store.bounds(&org).await?.head, true),
            None => (reg.joined, false),
        };
        if from.is_some() && !resync {
            // The replay is a boxed stream of its own, freed when it ends: its pages and
            // iterators would otherwise be part of every live stream's state.
            let mut replay = Box::pin(replay(&ctx, &org, &filter, &mut reg, &mut pos, &mut resync, &mut log));
            while let Some(bytes) = replay.next().await {
                yield bytes?;
            }
        }
        if resync {
            let reason = "cursor is older than the retained log or from another log; reload and continue from this cursor";
            yield control(&org, epoch, pos, Payload::Resync(Resync { reason: reason.into() }));
        }
        yield control(&org, epoch, pos, Payload::CaughtUp(CaughtUp {}));
        // The wake-up futures live as long as the stream: building them per event (a timer
        // entry) cost more than the delivery itself. One timer serves both the token's expiry
        // and the idle heartbeat (a timer is ~110 bytes of every idle stream): it is set to the
        // earlier of the two and only moved when it fires, so a send is a clock read, not a
        // timer-wheel update. Shutdown needs no waiter: the hub ends the queue (Cut::Shutdown).
        let timer = tokio::time::sleep_until(expires.min(Instant::now() + ctx.heartbeat));
        tokio::pin!(timer);
        let mut last_sent = Instant::now();
        loop {
            // An event already queued is taken without a select (polling the timer costs more
            // than the delivery); a fired timer (expiry first) still comes first.
            let queued = if timer.is_elapsed() {
                None
            } else {
                reg.rx.try_recv()
            };
            let wake = match queued {
                Some(item) => Wake::Item(Some(item)),
                None => tokio::select! {
                    biased;
                    _ = &mut timer => {
                        let now = Instant::now();
                        let due = last_sent + ctx.heartbeat;
                        if now >= expires {
                            Wake::Expired
                        } else if now < due {
                            timer.as_mut().reset(due.min(expires));
                            continue;
                        } else {
                            Wake::Heartbeat
                        }
                    }
                    item = reg.rx.recv() => Wake::Item(item),
                },
            };
            match wake {
                Wake::Item(Some(item)) if item.seq == 0 => yield item.bytes,
                Wake::Item(Some(item)) => {
                    if item.seq <= pos {
                        continue;
                    }
                    pos = item.seq;
                    METRICS.events_delivered.inc();
                    log.sent += 1;
                    yield item.bytes;
                }
                Wake::Item(None) => {
                    let message = match reg.cut() {
                        Some(Cut::Behind) => {
                            log.end = "behind the retained log";
                            "this stream fell behind the retained log; resume from your cursor"
                        }
                        Some(Cut::Shutdown) => {
                            log.end = "server shutting down";
                            "server shutting down; reconnect with your cursor"
                        }
                        _ => {
                            log.end = "too slow";
                            "subscriber too slow; resume from your cursor"
                        }
                    };
                    Err(Status::unavailable(message))?;
                }
                Wake::Heartbeat => yield control(&org, epoch, pos, Payload::Heartbeat(Heartbeat {})),
                Wake::Expired => {
                    log.end = "token expired";
                    Err(auth::token_expired())?;
                }
            }
            last_sent = Instant::now();
            if timer.is_elapsed() {
                timer.as_mut().reset((last_sent + ctx.heartbeat).min(expires));
            }
        }
    }
}

/// Replays the log after `pos` up to where the stream joined its room (later events are
/// queued), advancing `pos`; sets `resync` when the log no longer reaches back to it. The pages
/// come from the Hub, shared with the other subscribers replaying the same part of the log. A
/// stream cut off while replaying (live events piled up) joins its room again and replays the
/// rest.
fn replay<'a>(
    ctx: &'a Ctx,
    org: &'a str,
    filter: &'a Filter,
    reg: &'a mut crate::hub::Registration,
    pos: &'a mut u64,
    resync: &'a mut bool,
    log: &'a mut StreamLog,
) -> impl Stream<Item = Result<Bytes, Status>> + Send + 'a {
    async_stream::try_stream! {
        loop {
            while *pos < reg.joined {
                let page = match ctx.hub.replay_after(org, *pos).await? {
                    Replay::Events(page) => page,
                    // Trimmed past `pos` (before or during the replay): what was sent is
                    // seamless; the rest is a resync to the head, then live from there.
                    Replay::Unreachable(bounds) => {
                        *pos = bounds.head;
                        *resync = true;
                        return;
                    }
                };
                if page.events().is_empty() {
                    break;
                }
                for ev in page.events() {
                    *pos = ev.seq;
                    if filter.sees(ev) {
                        METRICS.events_delivered.inc();
                        log.sent += 1;
                        yield ev.bytes.clone();
                    }
                }
            }
            // Cut off while replaying (live events piled up): join again, replay the rest.
            if !reg.was_cut() {
                break;
            }
            *reg = ctx.hub.register(org, filter.clone()).await?;
        }
    }
}

/// Logs a stream's close with its reason and the events it sent.
struct StreamLog {
    org: String,
    user: Arc<str>,
    sent: u64,
    end: &'static str,
}

impl Drop for StreamLog {
    fn drop(&mut self) {
        tracing::info!(org = self.org, user = %self.user, events_sent = self.sent, reason = self.end, "stream closed");
    }
}

async fn poll(ctx: Arc<Ctx>, req: Request<PollRequest>) -> Result<Response<PollResponse>, Status> {
    let (claims, org) = ctx.authorize(&req, &req.get_ref().org_id, Need::Read)?;
    let r = req.into_inner();
    let kinds = Kinds::from_request(&r.kinds)?;
    let entity_types = EntityTypes::from_request(&r.entity_types)?;
    let from = parse_cursor(&r.after_cursor)?;
    let max = match r.max_events {
        0 => DEFAULT_POLL_EVENTS,
        n => n.min(MAX_POLL_EVENTS),
    } as usize;
    let deadline = Instant::now() + Duration::from_millis(r.wait_ms.min(MAX_POLL_WAIT_MS).into());
    METRICS.polls.inc();
    // Held until the Poll answers or its caller goes away: the per-user Poll limit and presence.
    let _slot = ctx.polls.acquire(&org, &claims.user)?;
    let _presence = ctx.presence.clone().connect(&org, &claims.user, Via::Poll);
    let _gauge = METRICS.waiting_polls.hold();
    let filter = Filter {
        viewer: Arc::new(claims.viewer()),
        kinds,
        entity_types,
        topics: Topics::from_request(&r.topics)?,
    };
    // Join the room before reading, so an event committed after the read wakes us.
    let mut reg = ctx.hub.register(&org, filter.clone()).await?;
    let store = &ctx.store.log;
    let epoch = store.org_epoch(&org);
    let resync_at = |head| {
        Response::new(PollResponse {
            events: vec![],
            cursor: Cursor { epoch, seq: head }.encode(),
            resync: true,
        })
    };
    let mut pos = match from {
        None => store.bounds(&org).await?.head,
        Some(c) if c.epoch == epoch => c.seq,
        Some(_) => return Ok(resync_at(store.bounds(&org).await?.head)),
    };
    let mut events = Vec::new();
    loop {
        let page = match store.read_after(&org, pos, REPLAY_PAGE).await? {
            LogRead::Events(page) => page,
            // Trimmed past `pos` after some events were taken: those are seamless, and the
            // next Poll (after them) is told resync.
            LogRead::Unreachable(_) if !events.is_empty() => break,
            LogRead::Unreachable(bounds) => return Ok(resync_at(bounds.head)),
        };
        let full = page.len() == REPLAY_PAGE;
        for ev in page {
            if events.len() == max {
                break;
            }
            pos = ev.seq;
            if filter.sees(&ev) {
                events.push(decode(ev.bytes)?);
            }
        }
        if !full || events.len() == max {
            break;
        }
    }
    // Nothing yet: wait for the room's next events. They come in seq order after `pos`, like a
    // stream's live part, so a woken Poll answers from them without reading the Store (thousands
    // of Polls woken by one event are no burst of reads). A queue cut off ends the wait empty.
    while events.is_empty() {
        let mut next = tokio::select! {
            _ = ctx.shutdown.cancelled() => None,
            _ = tokio::time::sleep_until(deadline) => None,
            item = reg.rx.recv() => item,
        };
        if next.is_none() {
            break;
        }
        while let Some(item) = next {
            // seq 0: presence and other ephemeral events, which Poll does not return.
            if item.seq > pos {
                pos = item.seq;
                events.push(decode(item.bytes)?);
                if events.len() == max {
                    break;
                }
            }
            next = reg.rx.try_recv();
        }
    }
    let cursor = Cursor { epoch, seq: pos }.encode();
    Ok(Response::new(PollResponse {
        events,
        cursor,
        resync: false,
    }))
}

/// An encoded event (from the Store or the Hub) as a message of a Poll's answer.
fn decode(bytes: Bytes) -> Result<Event, Status> {
    Event::decode(bytes).map_err(|e| Status::internal(e.to_string()))
}

async fn list_online(
    ctx: Arc<Ctx>,
    req: Request<ListOnlineRequest>,
) -> Result<Response<ListOnlineResponse>, Status> {
    let (_, org) = ctx.authorize(&req, &req.get_ref().org_id, Need::Read)?;
    Ok(Response::new(ListOnlineResponse {
        members: ctx.presence.members(&org),
    }))
}
