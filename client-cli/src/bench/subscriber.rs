//! A bench subscriber: one `Subscribe` stream on an HTTP/2 connection from a chosen 127.0.0.x
//! source address: a connection of its own read frame by frame (own_connection.rs), or one shared
//! by many streams through h2's client (a tonic channel per connection would cost the client more
//! memory than the server). Every counted event (a `job_updated`, in the outbox scenario an outbox
//! row's `entity_changed`, in the presence scenario a `broadcast`) is checked for order (a
//! broadcast: per sender) and its commit→receipt latency (the commit or send time vs. the wall
//! clock of this host) recorded; with several nodes, the latency of the events written through
//! another node than the subscriber's is recorded again on its own (cross-node).
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::{RecvStream, client::SendRequest};
use orgpulse::proto::{Event, EventKind, OrgFilter, event::Payload};
use prost::Message;
use tokio::net::{TcpSocket, TcpStream};

use super::{
    histogram::Histogram,
    outbox,
    own_connection::{OwnConnection, Received},
    writer,
    writer::{JobEvent, StampedEvent},
};

/// What all subscribers add up, shared by their tasks.
pub struct Tally {
    pub received: AtomicU64,
    pub out_of_order: AtomicU64,
    /// Streams that ended or failed after their `caught_up`.
    pub broken: AtomicU64,
    /// Wall clock (µs since the epoch) of the latest receipt.
    pub last_us: AtomicU64,
    pub latency: Mutex<Histogram>,
    /// The latency of the deliveries whose writer's node is not the subscriber's.
    pub cross_node: Mutex<Histogram>,
    /// Broadcasts: from the server's `Event.time` (when it fanned the broadcast out) to receipt,
    /// the part of the send→receipt latency after the server took the call.
    pub fan_out: Mutex<Histogram>,
    /// Outbox rows received before their inserter saw the COMMIT return: (row, receipt µs), for
    /// the latency once the commit time is known.
    pub early: Mutex<Vec<(usize, u64)>>,
    pub first_error: Mutex<Option<String>>,
}

impl Tally {
    pub fn new() -> Arc<Tally> {
        Arc::new(Tally {
            received: AtomicU64::new(0),
            out_of_order: AtomicU64::new(0),
            broken: AtomicU64::new(0),
            last_us: AtomicU64::new(0),
            latency: Mutex::new(Histogram::new()),
            cross_node: Mutex::new(Histogram::new()),
            fan_out: Mutex::new(Histogram::new()),
            early: Mutex::new(Vec::new()),
            first_error: Mutex::new(None),
        })
    }

    pub fn error(&self, e: String) {
        self.first_error.lock().unwrap().get_or_insert(e);
    }
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// A timestamp in µs since the epoch.
pub fn micros(t: &prost_types::Timestamp) -> u64 {
    t.seconds as u64 * 1_000_000 + t.nanos as u64 / 1000
}

/// Which events a subscriber counts, and where each one's commit time comes from.
#[derive(Clone)]
pub enum Counted {
    /// `job_updated`, committed at its `Event.time` (set by the store at commit).
    Jobs,
    /// The outbox rows' `entity_changed` (entity id = row number), committed when the inserter
    /// saw its COMMIT return.
    OutboxRows(Arc<outbox::CommitTimes>),
    /// The broadcasts on [`writer::BROADCAST_TOPIC`], sent at the time stamped in their data.
    Broadcasts,
    /// Every durable event of the org after seq `after` (the storm scenario), each seq exactly
    /// the one after the last (the log is gapless, so this is exactly once in log order),
    /// committed at its `Event.time`.
    Log { after: u64 },
}

impl Counted {
    fn filter(&self, org: &str, after_cursor: String) -> OrgFilter {
        let (kinds, entity_types, topics) = match self {
            Counted::Jobs => (vec![EventKind::Job], vec![], vec![]),
            Counted::OutboxRows(_) => (
                vec![EventKind::Entity],
                vec![outbox::ENTITY_TYPE.to_string()],
                vec![],
            ),
            Counted::Broadcasts => (
                vec![EventKind::Broadcast],
                vec![],
                vec![writer::BROADCAST_TOPIC.to_string()],
            ),
            // The durable kinds: the whole log, without the presence of the org's other
            // subscribers (each of them a user of its own coming online: the square of an org's
            // subscribers in user_online events while they connect).
            Counted::Log { .. } => (
                vec![EventKind::Job, EventKind::Notification, EventKind::Entity],
                vec![],
                vec![],
            ),
        };
        OrgFilter {
            org_id: org.to_string(),
            kinds: kinds.into_iter().map(|k| k as i32).collect(),
            after_cursor,
            entity_types,
            topics,
        }
    }
}

/// Which node a subscriber is on, and which node wrote each job or broadcast (by job id, or by
/// the broadcasting user's id).
#[derive(Clone, Default)]
pub struct Placement {
    pub node: usize,
    pub writer_nodes: Arc<HashMap<String, usize>>,
}

impl Placement {
    /// Whether the writer known by `key` (see [`writer::Writer::key`]) is on another node than
    /// this subscriber.
    fn cross_node(&self, key: &str) -> bool {
        self.writer_nodes.get(key).is_some_and(|&n| n != self.node)
    }
}

/// An open stream past its `caught_up`.
pub struct Subscriber {
    body: Body,
    /// Received bytes not yet split into messages (messages are slices of the received chunks).
    buf: Bytes,
    counted: Counted,
    placement: Placement,
    pub last_seq: u64,
    /// The cursor of the counted event received last (`Counted::Log` only: where to resume).
    pub cursor: String,
    /// The outbox row received last.
    last_row: Option<usize>,
    /// Broadcasts: each sender's last stamp (sequence number) and whether it is on another node,
    /// by the sender's number (its user is `sub{n}`: indexed, not hashed, at a million a second).
    senders: Vec<Option<Sender>>,
    /// Counted since the last [`Subscriber::flush`]: the messages of one received chunk are
    /// counted here and added to the `Tally` together.
    unflushed: Unflushed,
    /// Counted events that arrived before `caught_up` (a replay).
    pub replayed: u64,
}

/// Where, as whom and for what to subscribe.
pub struct Dial<'a> {
    pub server: SocketAddr,
    pub token: &'a str,
    pub org: &'a str,
    pub after_cursor: String,
    pub counted: Counted,
    pub placement: Placement,
}

/// An HTTP/2 connection from `source` to `server`, driven by its own task until it closes. Streams
/// are opened on clones of the returned handle (up to the server's concurrent-stream limit).
pub async fn connect(server: SocketAddr, source: IpAddr) -> Result<SendRequest<Bytes>, String> {
    let tcp = tcp(server, source).await?;
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(1 << 20)
        .handshake::<_, Bytes>(tcp)
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// A TCP connection from `source` to `server`, without Nagle's delay.
pub async fn tcp(server: SocketAddr, source: IpAddr) -> Result<TcpStream, String> {
    let sock = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    sock.bind(SocketAddr::new(source, 0))
        .map_err(|e| format!("bind {source}: {e}"))?;
    let tcp = sock
        .connect(server)
        .await
        .map_err(|e| format!("connect from {source}: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    Ok(tcp)
}

impl Subscriber {
    /// Subscribes to the org's counted events on a connection of its own or a shared one, and
    /// reads up to `caught_up`.
    pub async fn open(via: Via, d: Dial<'_>, tally: &Tally) -> Result<Subscriber, String> {
        const PATH: &str = "/orgpulse.v1.EventService/Subscribe";
        let filter = d.counted.filter(d.org, d.after_cursor.clone());
        let last_seq = match d.counted {
            Counted::Log { after } => after,
            _ => 0,
        };
        let mut msg = BytesMut::with_capacity(5 + filter.encoded_len());
        msg.put_u8(0);
        msg.put_u32(filter.encoded_len() as u32);
        filter.encode(&mut msg).expect("sized buffer");
        let mut headers = http::HeaderMap::new();
        headers.insert("content-type", "application/grpc".parse().expect("a value"));
        headers.insert("te", "trailers".parse().expect("a value"));
        let bearer = format!("Bearer {}", d.token);
        headers.insert(
            "authorization",
            bearer.parse().map_err(|e| format!("token: {e}"))?,
        );
        // The response's headers, or a refusal's trailers (gRPC's Trailers-Only).
        let (body, head) = match via {
            Via::Own(source) => {
                let (conn, resp) =
                    OwnConnection::post(d.server, source, PATH, headers, msg.freeze()).await?;
                if resp.status != Some(http::StatusCode::OK) {
                    return Err(format!("Subscribe: HTTP status {:?}", resp.status));
                }
                if resp.ended && !resp.fields.contains_key("grpc-status") {
                    return Err("Subscribe: the response ended without a gRPC status".into());
                }
                (Body::Own(Box::new(conn)), resp.fields)
            }
            Via::Shared(conn) => {
                let mut send = conn.ready().await.map_err(|e| e.to_string())?;
                let mut req = http::Request::post(format!("http://{}{PATH}", d.server))
                    .body(())
                    .map_err(|e| e.to_string())?;
                *req.headers_mut() = headers;
                let (resp, mut out) = send
                    .send_request(req, false)
                    .map_err(|e| format!("Subscribe: {e}"))?;
                out.send_data(msg.freeze(), true)
                    .map_err(|e| format!("Subscribe: {e}"))?;
                let (head, body) = resp
                    .await
                    .map_err(|e| format!("Subscribe: {e}"))?
                    .into_parts();
                (Body::Shared(body), head.headers)
            }
        };
        if let Some(status) = head.get("grpc-status") {
            let m = head.get("grpc-message");
            return Err(format!("Subscribe refused: grpc-status {status:?} {m:?}"));
        }
        let mut sub = Subscriber {
            body,
            buf: Bytes::new(),
            counted: d.counted,
            last_seq,
            cursor: d.after_cursor,
            placement: d.placement,
            last_row: None,
            senders: Vec::new(),
            unflushed: Unflushed::default(),
            replayed: 0,
        };
        loop {
            let msg = sub.next().await?.ok_or("stream ended before caught_up")?;
            let counted = sub.count(msg.clone(), now_us(), tally);
            sub.flush(tally);
            if counted? {
                sub.replayed += 1;
                continue;
            }
            match decode(msg)?.payload {
                Some(Payload::CaughtUp(_)) => return Ok(sub),
                Some(Payload::Resync(r)) => return Err(format!("resync: {}", r.reason)),
                _ => {}
            }
        }
    }

    /// Reads the live stream until it ends, counting into `tally`.
    pub async fn run(mut self, tally: Arc<Tally>) {
        let end = self.until_end(&tally).await;
        tally.broken.fetch_add(1, Relaxed);
        tally.error(end);
    }

    /// Reads the live stream, counting into `tally`, until it ends; returns how it ended. The
    /// messages of one received chunk arrived together: one clock read and one addition to
    /// `tally` serve them all.
    pub async fn until_end(&mut self, tally: &Tally) -> String {
        loop {
            let now = now_us();
            while let Some(msg) = self.split_message() {
                if let Err(e) = self.count(msg, now, tally) {
                    self.flush(tally);
                    return e;
                }
            }
            self.flush(tally);
            match self.receive().await {
                Ok(true) => {}
                Ok(false) => return "a stream ended".into(),
                Err(e) => return e,
            }
        }
    }

    /// Adds what was counted since the last flush to `tally`.
    fn flush(&mut self, tally: &Tally) {
        let u = &mut self.unflushed;
        if u.received == 0 {
            return;
        }
        if !u.latency.is_empty() {
            let mut h = tally.latency.lock().unwrap();
            u.latency.drain(..).for_each(|us| h.record(us));
        }
        if !u.fan_out.is_empty() {
            let mut h = tally.fan_out.lock().unwrap();
            u.fan_out.drain(..).for_each(|us| h.record(us));
        }
        if u.out_of_order > 0 {
            tally.out_of_order.fetch_add(u.out_of_order, Relaxed);
        }
        tally.last_us.fetch_max(u.last_us, Relaxed);
        tally.received.fetch_add(u.received, Relaxed);
        u.received = 0;
        u.out_of_order = 0;
    }

    /// Counts a counted event (one gRPC message, received at `now`) into `unflushed`: order,
    /// latency, totals. False for any other event; an error for one that is not an `Event`.
    fn count(&mut self, msg: Bytes, now: u64, tally: &Tally) -> Result<bool, String> {
        let delivery = match &self.counted {
            Counted::Broadcasts => self.broadcast(&msg, now, tally)?,
            Counted::Jobs => self.job(&msg)?,
            _ => self.durable(&decode(msg)?, now, tally),
        };
        let Some(d) = delivery else {
            return Ok(false);
        };
        let u = &mut self.unflushed;
        if !d.in_order {
            u.out_of_order += 1;
        }
        if let Some(sent) = d.sent_us {
            let us = now.saturating_sub(sent);
            u.latency.push(us);
            if d.cross_node {
                tally.cross_node.lock().unwrap().record(us);
            }
        }
        u.last_us = now;
        u.received += 1;
        Ok(true)
    }

    /// A `job_updated` (read with [`JobEvent`], not decoded), None for any other event.
    fn job(&mut self, msg: &[u8]) -> Result<Option<Delivery>, String> {
        let ev = JobEvent::read(msg).map_err(|e| format!("bad Event: {e}"))?;
        let Some(id) = ev.updated else {
            return Ok(None);
        };
        let in_order = ev.seq > self.last_seq;
        self.last_seq = ev.seq;
        Ok(Some(Delivery {
            in_order,
            sent_us: ev.time_us,
            cross_node: self.placement.cross_node(&String::from_utf8_lossy(id)),
        }))
    }

    /// A counted durable event (received at `now`), None for any other event.
    fn durable(&mut self, ev: &Event, now: u64, tally: &Tally) -> Option<Delivery> {
        let mut in_order = ev.seq > self.last_seq;
        let sent_us = match (&self.counted, &ev.payload) {
            (Counted::OutboxRows(commits), Some(Payload::EntityChanged(e))) => {
                let Ok(row) = e.entity_id.parse::<usize>() else {
                    tally.error(format!("outbox event with entity id {:?}", e.entity_id));
                    return None;
                };
                in_order &= self.last_row.is_none_or(|last| row > last);
                self.last_row = Some(row);
                let committed = commits.get(row);
                if committed.is_none() {
                    tally.early.lock().unwrap().push((row, now));
                }
                committed
            }
            (Counted::Log { .. }, _) if ev.seq > 0 => {
                in_order = ev.seq == self.last_seq + 1;
                self.cursor.clone_from(&ev.cursor);
                ev.time.as_ref().map(micros)
            }
            _ => return None,
        };
        self.last_seq = ev.seq;
        Some(Delivery {
            in_order,
            sent_us,
            cross_node: false,
        })
    }

    /// A broadcast on the counted topic (received at `now`; read with [`StampedEvent`], not
    /// decoded as a whole), None for any other event. In order when each sender's stamps increase.
    fn broadcast(
        &mut self,
        msg: &[u8],
        now: u64,
        tally: &Tally,
    ) -> Result<Option<Delivery>, String> {
        let ev = StampedEvent::read(msg).map_err(|e| format!("bad Event: {e}"))?;
        let Some(b) = ev.broadcast else {
            return Ok(None);
        };
        let Some((n, sent)) = b.stamp else {
            let user = String::from_utf8_lossy(b.user_id);
            tally.error(format!("broadcast from {user} without a stamp"));
            return Ok(None);
        };
        if let Some(fanned_out) = ev.time_us {
            self.unflushed.fan_out.push(now.saturating_sub(fanned_out));
        }
        let Some(i) = super::subscriber_index(b.user_id) else {
            let user = String::from_utf8_lossy(b.user_id);
            tally.error(format!(
                "broadcast from {user}, not one of the bench's users"
            ));
            return Ok(None);
        };
        if i >= self.senders.len() {
            self.senders.resize_with(i + 1, || None);
        }
        let (in_order, cross_node) = match &mut self.senders[i] {
            Some(s) => (std::mem::replace(&mut s.last, n) < n, s.cross_node),
            new => {
                let cross_node = self
                    .placement
                    .cross_node(&String::from_utf8_lossy(b.user_id));
                *new = Some(Sender {
                    last: n,
                    cross_node,
                });
                (true, cross_node)
            }
        };
        Ok(Some(Delivery {
            in_order,
            sent_us: Some(sent),
            cross_node,
        }))
    }

    /// The next gRPC message of the stream; None at its end (an error if with a non-OK status).
    async fn next(&mut self) -> Result<Option<Bytes>, String> {
        loop {
            if let Some(msg) = self.split_message() {
                return Ok(Some(msg));
            }
            if !self.receive().await? {
                return Ok(None);
            }
        }
    }

    /// The next gRPC message already received whole, if there is one.
    fn split_message(&mut self) -> Option<Bytes> {
        if self.buf.len() >= 5 {
            let len = u32::from_be_bytes(self.buf[1..5].try_into().expect("4 bytes")) as usize;
            if self.buf.len() >= 5 + len {
                self.buf.advance(5);
                return Some(self.buf.split_to(len));
            }
        }
        None
    }

    /// Waits for the next received chunk and appends it to `buf`; false at the stream's end
    /// (an error if with a non-OK status).
    async fn receive(&mut self) -> Result<bool, String> {
        let chunk = match &mut self.body {
            Body::Shared(body) => match body.data().await {
                Some(Ok(chunk)) => {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    chunk
                }
                Some(Err(e)) => return Err(format!("stream: {e}")),
                None => return ended(body.trailers().await.map_err(|e| e.to_string())?),
            },
            Body::Own(conn) => match conn.data().await? {
                Received::Data(chunk) => chunk,
                Received::Trailers(t) => return ended(Some(t)),
            },
        };
        if self.buf.is_empty() {
            self.buf = chunk;
        } else {
            // A message split between DATA frames: joined in a copy.
            let mut joined = BytesMut::with_capacity(self.buf.len() + chunk.len());
            joined.extend_from_slice(&self.buf);
            joined.extend_from_slice(&chunk);
            self.buf = joined.freeze();
        }
        Ok(true)
    }
}

/// Where a subscriber's stream goes.
pub enum Via {
    /// A connection of its own from this source address, read frame by frame
    /// (own_connection.rs).
    Own(IpAddr),
    /// A connection shared with other streams, through h2's client (see [`connect`]).
    Shared(SendRequest<Bytes>),
}

/// A subscriber's response body (the codec of a connection of its own is ~600 bytes: boxed, so
/// that the streams on shared connections do not carry its size).
enum Body {
    Own(Box<OwnConnection>),
    Shared(RecvStream),
}

/// A stream's end by its trailers: false with grpc-status 0, else an error with the status.
fn ended(trailers: Option<http::HeaderMap>) -> Result<bool, String> {
    let status = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?");
    if status == "0" {
        return Ok(false);
    }
    let m = trailers.as_ref().and_then(|t| t.get("grpc-message"));
    Err(format!("stream ended: grpc-status {status} {m:?}"))
}

/// One counted delivery: whether it came in order, when it was sent or committed (when known),
/// and whether its writer is on another node than the subscriber.
struct Delivery {
    in_order: bool,
    sent_us: Option<u64>,
    cross_node: bool,
}

/// What a subscriber counted and has not yet added to the `Tally`.
#[derive(Default)]
struct Unflushed {
    received: u64,
    out_of_order: u64,
    /// Wall clock (µs since the epoch) of the latest receipt.
    last_us: u64,
    latency: Vec<u64>,
    fan_out: Vec<u64>,
}

/// A broadcasting user as one subscriber saw it.
struct Sender {
    /// The stamp (sequence number) of its broadcast received last.
    last: u64,
    cross_node: bool,
}

/// A gRPC message of the stream as an `Event`.
fn decode(msg: Bytes) -> Result<Event, String> {
    Event::decode(msg).map_err(|e| format!("bad Event: {e}"))
}

/// The `n`-th of `count` source addresses: 127.0.0.1, 127.0.0.2, ...
pub fn source(n: usize, count: usize) -> IpAddr {
    IpAddr::from([127, 0, 0, 1 + (n % count.max(1)) as u8])
}

/// Polls `tally` until `expected` deliveries arrived, nothing arrived for `stall`, or `timeout`;
/// true when complete.
pub async fn wait_for(tally: &Tally, expected: u64, stall: Duration, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = (0, tokio::time::Instant::now());
    loop {
        let got = tally.received.load(Relaxed);
        if got >= expected {
            return true;
        }
        let now = tokio::time::Instant::now();
        if got != last.0 {
            last = (got, now);
        }
        if now >= deadline || now - last.1 >= stall || tally.broken.load(Relaxed) > 0 {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
