//! EventService: `Subscribe` (replay after a cursor, `caught_up`, then live, each durable event
//! exactly once and in seq order), `Poll` (the long-poll fallback), `ListOnline`, `Publish` (in
//! `publish`) and `SetPresence` / `ListPresence` / `Broadcast` (in `activity`).
//!
//! The service is written out by hand rather than generated so that `Subscribe` can send the
//! Hub's pre-encoded event bytes as they are (through `stream_body`): an event is encoded once,
//! not once per subscriber.
use std::{
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll as TaskPoll, ready},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use futures::{
    Stream, StreamExt,
    future::BoxFuture,
    stream::{BoxStream, Peekable},
};
use orgpulse::proto::{
    CaughtUp, Event, Heartbeat, ListOnlineRequest, ListOnlineResponse, OrgFilter, PollRequest,
    PollResponse, Resync, event::Payload,
};
use prost::Message;
use tokio::time::{Instant, Sleep};
use tonic::{
    Request, Response, Status,
    codec::Codec,
    server::{Grpc, NamedService},
};
use tonic_prost::ProstCodec;

use super::{
    Ctx, activity,
    stream_body::{EventStream, Messages, Outgoing, put_message, server_streaming},
};
use crate::{
    audience::Topics,
    auth::{self, Need},
    connections::{CarriedStream, Connection},
    cursor::Cursor,
    hub::{Cut, EntityTypes, Filter, Kinds, Replay},
    metrics::{GaugeHold, METRICS},
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
    let connection = req.extensions().get::<Connection>().cloned();
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
    // The org's name as its room keeps it (one copy for the first stream) and the viewer's user
    // name, shared by the limit, presence and the stream's log rather than copied into each.
    let org = ctx.hub.org_name(&org).unwrap_or_else(|| org.into());
    let user = filter.viewer.user.clone();
    let slot = ctx.streams.acquire(&org, &user)?;
    let reg = ctx.hub.register(&org, filter.clone()).await?;
    let presence = ctx.presence.clone().connect(&org, &user, Via::Stream);
    let expires = Instant::now() + claims.time_left();
    let deadlines = Deadlines::new(
        expires,
        ctx.heartbeat,
        connection.as_ref().map_or(0, Connection::id),
    );
    tracing::info!(org = &*org, user = &*user, "stream opened");
    let held = Held {
        _slot: slot,
        _presence: presence,
        _carried: connection.map(|c| c.carry_stream()),
    };
    let stream = subscription(ctx, org, filter, from, reg, deadlines, held);
    Ok(Response::new(Box::new(stream)))
}

/// What an open stream holds until it ends, however it ends: its slot in the per-user stream
/// limit, its user's presence and its count on its connection.
struct Held {
    _slot: UserSlot,
    _presence: PresenceGuard,
    _carried: Option<CarriedStream>,
}

/// What woke a live stream.
enum Wake {
    Item(Option<crate::hub::Item>),
    Heartbeat,
    Expired,
}

/// A step of a stream's head: a message to send, or (its last) the live part to go on with.
enum Step {
    Send(Bytes),
    Live(Box<Live>),
}

/// A `Subscribe` stream: its head (replay, resync, `caught_up`) as a generator, then the live
/// part written out. The head is dropped once it hands over, so an idle stream holds only
/// [`Live`]'s fields: a generator would keep its captured arguments beside the locals they were
/// moved into, and slots for its temporaries (~940 bytes per idle stream, against ~400 here
/// with its timer).
struct Subscription {
    head: Option<Head>,
    live: Option<Live>,
}

/// A stream's head, its next step looked at before it is taken (see
/// [`Subscription::append_waiting`]). Boxed whole: an idle stream holds one pointer for it.
type Head = Pin<Box<Peekable<BoxStream<'static, Result<Step, Status>>>>>;

impl Stream for Subscription {
    type Item = Result<Outgoing, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> TaskPoll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(head) = &mut this.head {
            match ready!(head.poll_next_unpin(cx)) {
                Some(Ok(Step::Send(bytes))) => {
                    return TaskPoll::Ready(Some(Ok(Outgoing::Made(bytes))));
                }
                Some(Ok(Step::Live(live))) => {
                    this.head = None;
                    this.live = Some(*live);
                }
                Some(Err(status)) => {
                    this.head = None;
                    return TaskPoll::Ready(Some(Err(status)));
                }
                None => {
                    this.head = None;
                    return TaskPoll::Ready(None);
                }
            }
        }
        let Some(live) = &mut this.live else {
            return TaskPoll::Ready(None);
        };
        let next = live.poll_next(cx);
        if let TaskPoll::Ready(Some(Err(_))) = next {
            // The stream ends with this error: what it held goes now, and its close is logged.
            this.live = None;
        }
        next
    }
}

impl Messages for Subscription {
    /// The head's messages already made (a replay's page, `caught_up`) go into the frame together,
    /// as the live part's queued events do: a replay of 100,000 events is not 100,000 DATA frames.
    /// The head's other steps (the hand-over to the live part, an error, its end) are left to
    /// `poll_next`.
    fn append_waiting(&mut self, frame: &mut BytesMut, limit: usize, cx: &mut Context<'_>) {
        let Some(head) = &mut self.head else {
            if let Some(live) = &mut self.live {
                live.append_waiting(frame, limit);
            }
            return;
        };
        while frame.len() < limit
            && let TaskPoll::Ready(Some(Ok(Step::Send(_)))) = head.as_mut().poll_peek(cx)
        {
            if let TaskPoll::Ready(Some(Ok(Step::Send(message)))) = head.poll_next_unpin(cx) {
                put_message(frame, &message);
            }
        }
    }
}

fn subscription(
    ctx: Arc<Ctx>,
    org: Arc<str>,
    filter: Filter,
    from: Option<Cursor>,
    reg: crate::hub::Registration,
    deadlines: Deadlines,
    held: Held,
) -> Subscription {
    Subscription {
        head: Some(Box::pin(
            head(ctx, org, filter, from, reg, deadlines, held)
                .boxed()
                .peekable(),
        )),
        live: None,
    }
}

/// The head of a stream: replay after the cursor (or resync), `caught_up`, then the live part.
fn head(
    ctx: Arc<Ctx>,
    org: Arc<str>,
    filter: Filter,
    from: Option<Cursor>,
    mut reg: crate::hub::Registration,
    deadlines: Deadlines,
    held: Held,
) -> impl Stream<Item = Result<Step, Status>> + Send + 'static {
    async_stream::try_stream! {
        let gauge = METRICS.open_streams.hold();
        let mut log = StreamLog { org, user: filter.viewer.user.clone(), sent: 0, end: "client went away" };
        let org: &str = &log.org;
        let store = ctx.store.log.clone();
        let epoch = store.org_epoch(org);
        // Position: the last seq this subscriber has seen or skipped.
        // Without a cursor: live from the room's position (every later event is queued). A
        // cursor past the room's position is checked against the log's head (one the log never
        // reached is a resync).
        let (mut pos, mut resync) = match from {
            Some(c) if c.epoch == epoch && c.seq <= reg.joined => (c.seq, false),
            Some(c) if c.epoch == epoch => match store.bounds(org).await?.head {
                head if c.seq <= head => (c.seq, false),
                head => (head, true),
            },
            Some(_) => (store.bounds(org).await?.head, true),
            None => (reg.joined, false),
        };
        // The replay: the log's events after `pos`, page by page (pages shared with other
        // subscribers resuming nearby), until the room's position at joining. Its state is the
        // head's, freed with it at the hand-over to the live part.
        'replay: while from.is_some() && !resync {
            while pos < reg.joined {
                let page = match ctx.hub.replay_after(org, pos).await? {
                    Replay::Events(page) => page,
                    // Trimmed past `pos` (before or during the replay): what was sent is
                    // seamless; the rest is a resync to the head, then live from there.
                    Replay::Unreachable(bounds) => {
                        pos = bounds.head;
                        resync = true;
                        break 'replay;
                    }
                };
                if page.events().is_empty() {
                    break;
                }
                for ev in page.events() {
                    pos = ev.seq;
                    if filter.sees(ev) {
                        METRICS.events_delivered.inc();
                        log.sent += 1;
                        yield Step::Send(ev.bytes.clone());
                    }
                }
            }
            // Cut off while replaying (live events piled up): join again, replay the rest.
            if !reg.was_cut() {
                break;
            }
            reg = ctx.hub.register(org, filter.clone()).await?;
        }
        if resync {
            let reason = "cursor is older than the retained log or from another log; reload and continue from this cursor";
            yield Step::Send(control(org, epoch, pos, Payload::Resync(Resync { reason: reason.into() })));
        }
        yield Step::Send(control(org, epoch, pos, Payload::CaughtUp(CaughtUp {})));
        // One timer serves both the token's expiry and the idle heartbeat (a timer is ~110
        // bytes of every idle stream): it is set to the earlier of the two and only moved when
        // it fires, so a send is a clock read, not a timer-wheel update. Shutdown needs no
        // waiter: the hub ends the queue (Cut::Shutdown).
        let last_sent = Instant::now();
        let timer = Box::pin(tokio::time::sleep_until(deadlines.next(last_sent)));
        yield Step::Live(Box::new(Live {
            reg,
            timer,
            last_sent,
            deadlines,
            epoch,
            pos,
            log,
            _held: held,
            _gauge: gauge,
        }));
    }
}

/// When a live stream must next wake by itself: its token's expiry, and its heartbeat on a grid
/// of half heartbeat intervals whose phase is its connection's. The heartbeat is due at the
/// latest point of the grid at most one interval after the stream's last message, so no stream
/// is silent for longer than the interval, and the idle streams of one connection (a multiplexed
/// one carries a hundred) send theirs at the same instants, which go out in one write
/// (`connections::Door`) instead of one each at times of their own. The phases are a few
/// ([`PHASES`] per half interval), so the runtime wakes for many connections' heartbeats at once
/// rather than for each connection's.
#[derive(Clone, Copy)]
struct Deadlines {
    expires: Instant,
    every: Duration,
    /// A point of the grid.
    anchor: Instant,
}

/// The heartbeat phases a connection can have (a power of two: the top bits of its hashed id).
const PHASES: u64 = 64;

impl Deadlines {
    fn new(expires: Instant, every: Duration, connection: u64) -> Deadlines {
        static START: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);
        // Fibonacci hashing spreads consecutive connection ids over the phases.
        let phase = connection.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (u64::BITS - PHASES.ilog2());
        Deadlines {
            expires,
            every,
            anchor: *START + every / 2 / PHASES as u32 * phase as u32,
        }
    }

    /// The heartbeat after a message sent at `last`: the latest grid point at most `every`
    /// after it (so later than `last` + `every` / 2).
    fn heartbeat(&self, last: Instant) -> Instant {
        let latest = last + self.every;
        let half = (self.every / 2).as_nanos().max(1);
        let Some(since) = latest.checked_duration_since(self.anchor) else {
            return latest;
        };
        let steps = since.as_nanos() / half;
        self.anchor + Duration::from_nanos(u64::try_from(steps * half).unwrap_or(u64::MAX))
    }

    /// The timer's next deadline: the heartbeat after `last`, or the expiry if earlier.
    fn next(&self, last: Instant) -> Instant {
        self.heartbeat(last).min(self.expires)
    }
}

/// The live part of a stream: the events its room queues, heartbeats while idle, the end when
/// the token expires or the hub cuts the queue.
struct Live {
    reg: crate::hub::Registration,
    timer: Pin<Box<Sleep>>,
    last_sent: Instant,
    deadlines: Deadlines,
    epoch: u64,
    /// The last seq this subscriber has seen or skipped.
    pos: u64,
    log: StreamLog,
    _held: Held,
    _gauge: GaugeHold,
}

impl Live {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> TaskPoll<Option<Result<Outgoing, Status>>> {
        loop {
            // An event already queued is taken without polling the timer (that costs more than
            // the delivery); a fired timer (expiry first) still comes first.
            let queued = if self.timer.is_elapsed() {
                None
            } else {
                self.reg.rx.try_recv()
            };
            let wake = match queued {
                Some(item) => Wake::Item(Some(item)),
                None if self.timer.as_mut().poll(cx).is_ready() => {
                    let now = Instant::now();
                    let due = self.deadlines.heartbeat(self.last_sent);
                    if now >= self.deadlines.expires {
                        Wake::Expired
                    } else if now < due {
                        self.timer.as_mut().reset(due.min(self.deadlines.expires));
                        continue;
                    } else {
                        // Idle for a heartbeat interval: its queue's burst slots go back.
                        self.reg.rx.trim();
                        Wake::Heartbeat
                    }
                }
                None => Wake::Item(ready!(self.reg.rx.poll_recv(cx))),
            };
            let message = match wake {
                Wake::Item(Some(item)) => match goes_out(&mut self.pos, item.seq) {
                    None => continue,
                    Some(durable) => {
                        if durable {
                            METRICS.events_delivered.inc();
                            self.log.sent += 1;
                        }
                        Outgoing::Queued(item)
                    }
                },
                Wake::Item(None) => {
                    let message = match self.reg.cut() {
                        Some(Cut::Behind) => {
                            self.log.end = "behind the retained log";
                            "this stream fell behind the retained log; resume from your cursor"
                        }
                        Some(Cut::Shutdown) => {
                            self.log.end = "server shutting down";
                            "server shutting down; reconnect with your cursor"
                        }
                        _ => {
                            self.log.end = "too slow";
                            "subscriber too slow; resume from your cursor"
                        }
                    };
                    return TaskPoll::Ready(Some(Err(Status::unavailable(message))));
                }
                Wake::Heartbeat => Outgoing::Made(control(
                    &self.log.org,
                    self.epoch,
                    self.pos,
                    Payload::Heartbeat(Heartbeat {}),
                )),
                Wake::Expired => {
                    self.log.end = "token expired";
                    return TaskPoll::Ready(Some(Err(auth::token_expired())));
                }
            };
            self.last_sent = Instant::now();
            if self.timer.is_elapsed() {
                self.timer
                    .as_mut()
                    .reset(self.deadlines.next(self.last_sent));
            }
            return TaskPoll::Ready(Some(Ok(message)));
        }
    }
}

impl Live {
    /// The burst path of `poll_next`: the queued events, taken under one lock of the queue and
    /// framed into `frame` while it holds fewer than `limit` bytes, with one clock read for all
    /// of them. A fired timer and the queue's end are left to `poll_next`.
    fn append_waiting(&mut self, frame: &mut BytesMut, limit: usize) {
        if self.timer.is_elapsed() {
            return;
        }
        let pos = &mut self.pos;
        let (framed, durable) = self.reg.rx.take_waiting(|items| {
            let mut need = 0;
            for item in items.iter() {
                if frame.len() + need >= limit {
                    break;
                }
                need += 5 + item.bytes.len();
            }
            frame.reserve(need);
            let (mut framed, mut durable) = (0u64, 0u64);
            while frame.len() < limit
                && let Some(item) = items.pop_front()
            {
                let Some(is_durable) = goes_out(pos, item.seq) else {
                    continue;
                };
                durable += u64::from(is_durable);
                put_message(frame, &item.bytes);
                framed += 1;
            }
            (framed, durable)
        });
        if framed > 0 {
            self.last_sent = Instant::now();
        }
        if durable > 0 {
            METRICS.events_delivered.add(durable);
            self.log.sent += durable;
        }
    }
}

/// Whether a queued event goes out on a stream at `pos`: an ephemeral one (seq 0) always
/// (`Some(false)`), a durable one only past `pos`, which it advances (`Some(true)`); None for a
/// durable event the stream has already sent or skipped.
fn goes_out(pos: &mut u64, seq: u64) -> Option<bool> {
    if seq == 0 {
        return Some(false);
    }
    if seq <= *pos {
        return None;
    }
    *pos = seq;
    Some(true)
}

/// Logs a stream's close with its reason and the events it sent.
struct StreamLog {
    org: Arc<str>,
    user: Arc<str>,
    sent: u64,
    end: &'static str,
}

impl Drop for StreamLog {
    fn drop(&mut self) {
        tracing::info!(org = %self.org, user = %self.user, events_sent = self.sent, reason = self.end, "stream closed");
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
    let viewer = Arc::new(claims.viewer());
    let org: Arc<str> = org.into();
    let _slot = ctx.polls.acquire(&org, &viewer.user)?;
    let _presence = ctx.presence.clone().connect(&org, &viewer.user, Via::Poll);
    let _gauge = METRICS.waiting_polls.hold();
    let filter = Filter {
        viewer,
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
                events.push(decode(item.bytes.clone())?);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_keep_the_interval_and_share_their_connections_grid() {
        let every = Duration::from_secs(15);
        let far = Instant::now() + Duration::from_secs(3600);
        let a = Deadlines::new(far, every, 7);
        let b = Deadlines::new(far, every, 8);
        let start = Instant::now();
        let mut seen_a = std::collections::BTreeSet::new();
        let mut seen_b = std::collections::BTreeSet::new();
        // Messages at irregular times over two minutes.
        for i in 0..2_000u64 {
            let last = start + Duration::from_millis(i * 61 % 120_000);
            for (d, seen) in [(&a, &mut seen_a), (&b, &mut seen_b)] {
                let due = d.heartbeat(last);
                assert!(due <= last + every, "silent for longer than the interval");
                assert!(
                    due > last + every / 2,
                    "due too soon after the last message"
                );
                assert_eq!(
                    d.heartbeat(due),
                    due + every,
                    "an idle stream beats every interval"
                );
                seen.insert(due);
            }
        }
        // Over two minutes, a connection's streams beat on at most 17 instants (a half
        // interval apart), whatever their messages' times.
        assert!(seen_a.len() <= 17, "{} instants", seen_a.len());
        let half = every / 2;
        let first = *seen_a.first().unwrap();
        assert!(
            seen_a
                .iter()
                .all(|t| (*t - first).as_nanos() % half.as_nanos() == 0)
        );
        // Another connection has another phase.
        assert!(seen_a.is_disjoint(&seen_b));
        // The expiry comes first when it is earlier.
        let soon = Instant::now() + Duration::from_secs(1);
        assert_eq!(Deadlines::new(soon, every, 7).next(start), soon);
    }
}
