//! The connection door (docs/api.md "Limits before authentication"): at most `--max-connections`
//! open connections, each of which must send a complete HTTP/1.1 request head or the HTTP/2
//! preface within [`HEAD_TIMEOUT`] of its accept (TLS handshake included) or be closed. At
//! capacity a new connection evicts the oldest one still waiting for its head; when none is
//! waiting, the new one is closed at accept. So a flood of idle sockets holding no token cannot
//! keep real clients out, nor run the process out of descriptors.
use std::{
    collections::BTreeMap,
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::{hub::Pacer, metrics::METRICS};

/// How long a connection may take to send its first complete request head or HTTP/2 preface.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Descriptors kept for everything but client connections (database, files, the bus, the JWKS
/// fetch): at most this many, at most half the open-file limit.
const RESERVE: u64 = 128;
/// Connections evicted but not yet closed (their tasks have not run since) that the accept loop
/// lets pile up before it waits for them: beyond the cap they take descriptors of the reserve.
const CLOSING: usize = 32;
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Raises the open-file soft limit to the hard limit and logs the figure; returns the number of
/// connections the server may hold: `asked`, lowered to what that limit allows beside
/// [`RESERVE`].
pub fn open_file_budget(asked: usize) -> usize {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            let (soft, _) = rlimit::Resource::NOFILE.get().unwrap_or((1024, 1024));
            tracing::warn!(error = %e, soft, "raising the open-file limit failed");
            soft
        }
    };
    let cap = connection_cap(asked, limit);
    tracing::info!(
        open_file_limit = limit,
        max_connections = cap,
        "open-file soft limit raised to the hard limit; --max-connections {} to fit it",
        if cap < asked { "lowered" } else { "kept" }
    );
    cap
}

fn connection_cap(asked: usize, open_file_limit: u64) -> usize {
    let reserve = RESERVE.min(open_file_limit / 2);
    let allowed = usize::try_from(open_file_limit - reserve).unwrap_or(usize::MAX);
    asked.min(allowed).max(1)
}

/// The open connections of the server, against `--max-connections`.
pub struct Connections {
    max: usize,
    /// The hub's: a multiplexed connection's write round waits for its turns.
    pacer: Arc<Pacer>,
    state: Mutex<State>,
    /// Told whenever a connection closes (see [`Connections::room`]).
    closed: tokio::sync::Notify,
}

#[derive(Default)]
struct State {
    open: usize,
    next_id: u64,
    /// The connections that have not sent a complete head yet, oldest first, each with the
    /// token that closes it.
    waiting: BTreeMap<u64, CancellationToken>,
}

/// One admitted connection; dropping it frees its place.
pub struct Slot {
    connections: Arc<Connections>,
    connection: Connection,
}

impl Slot {
    pub fn connection(&self) -> Connection {
        self.connection.clone()
    }
}

/// What a connection's requests (as a request extension) share with its byte stream: the
/// connection's id, when it was accepted, and how many `Subscribe` streams it carries now.
#[derive(Clone)]
pub struct Connection(Arc<Shared>);

struct Shared {
    id: u64,
    streams: AtomicU32,
    accepted: Instant,
}

impl Connection {
    fn new(id: u64) -> Connection {
        Connection(Arc::new(Shared {
            id,
            streams: AtomicU32::new(0),
            accepted: Instant::now(),
        }))
    }

    pub fn id(&self) -> u64 {
        self.0.id
    }

    /// When the connection was accepted.
    pub fn accepted(&self) -> Instant {
        self.0.accepted
    }

    /// Counts a stream on this connection while the guard lives.
    pub fn carry_stream(&self) -> CarriedStream {
        self.0.streams.fetch_add(1, Ordering::Relaxed);
        CarriedStream(self.clone())
    }

    /// Whether the connection carries more than one stream (a multiplexed one).
    fn multiplexed(&self) -> bool {
        self.0.streams.load(Ordering::Relaxed) > 1
    }
}

/// A stream counted on its connection until dropped.
pub struct CarriedStream(Connection);

impl Drop for CarriedStream {
    fn drop(&mut self) {
        self.0.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Connections {
    pub fn new(max: usize, pacer: Arc<Pacer>) -> Arc<Self> {
        METRICS.max_connections.set(max as i64);
        Arc::new(Connections {
            max,
            pacer,
            state: Mutex::default(),
            closed: tokio::sync::Notify::new(),
        })
    }

    /// Returns once there is room to accept: at once unless more than [`CLOSING`] connections
    /// evicted at capacity are still open (a busy node runs their tasks late), then when enough of
    /// them have closed. Without it a burst of accepts could outrun the closing and run the
    /// process out of descriptors.
    pub async fn room(&self) {
        loop {
            let closed = self.closed.notified();
            if self.state.lock().open < self.max + CLOSING {
                return;
            }
            closed.await;
        }
    }

    /// Admits a connection just accepted: evicts the oldest connection still waiting for its head
    /// when at capacity; `None` (the new one is to be closed) when every open one has sent its.
    /// The [`Waiting`] closes the connection at the door until its head is complete.
    pub fn admit(self: &Arc<Self>) -> Option<(Slot, Waiting)> {
        let mut state = self.state.lock();
        if state.open >= self.max {
            let Some((_, oldest)) = state.waiting.pop_first() else {
                METRICS.connections_refused.inc();
                return None;
            };
            // Its place goes to the new connection as soon as its task has closed it.
            oldest.cancel();
            METRICS.connections_evicted.inc();
        }
        state.open += 1;
        state.next_id += 1;
        let id = state.next_id;
        let evicted = CancellationToken::new();
        state.waiting.insert(id, evicted.clone());
        METRICS.open_connections.inc();
        let slot = Slot {
            connections: self.clone(),
            connection: Connection::new(id),
        };
        let connections = self.clone();
        let closed = async move {
            tokio::select! {
                _ = evicted.cancelled_owned() => "evicted: the server holds --max-connections",
                _ = tokio::time::sleep(HEAD_TIMEOUT) => {
                    connections.stop_waiting(id);
                    METRICS.connections_head_timeouts.inc();
                    "no complete request head or HTTP/2 preface within 10 s"
                }
            }
        };
        let waiting = Waiting {
            closed: Box::pin(closed),
            watch: HeadWatch::default(),
        };
        Some((slot, waiting))
    }

    /// Connection `id` no longer waits for its head.
    fn stop_waiting(&self, id: u64) {
        self.state.lock().waiting.remove(&id);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.connections.state.lock();
        state.open -= 1;
        state.waiting.remove(&self.connection.id());
        METRICS.open_connections.dec();
        drop(state);
        self.connections.closed.notify_waiters();
    }
}

/// What closes a connection at the door while it has not sent its head (eviction, and the
/// [`HEAD_TIMEOUT`] from its accept), and the watch of its first bytes. The deadlines are boxed,
/// and all of it is dropped once the head is complete.
pub struct Waiting {
    closed: Pin<Box<dyn Future<Output = &'static str> + Send>>,
    watch: HeadWatch,
}

impl Waiting {
    /// Resolves with the reason when the connection is to be closed before it was served (for a
    /// wait outside a [`Door`], such as a TLS handshake).
    pub async fn closed(&mut self) -> &'static str {
        self.closed.as_mut().await
    }
}

/// A connection's byte stream, watched until it carries a complete HTTP/1.1 request head or the
/// HTTP/2 preface: a read fails once the connection is to be closed at the door. After the head it
/// tells its [`Slot`], drops the watch and is a pass-through holding its place, whose writes go
/// out in rounds (see [`Door::take_turn`]).
pub struct Door<IO> {
    io: IO,
    waiting: Option<Waiting>,
    slot: Slot,
    /// A round of writes has begun: they go through until the flush that ends it.
    writing: bool,
    /// The round's first write waits for the hub's pacer to pass this mark.
    round: Option<u64>,
}

impl<IO> Door<IO> {
    pub fn new(io: IO, slot: Slot, waiting: Waiting) -> Self {
        Door {
            io,
            waiting: Some(waiting),
            slot,
            writing: false,
            round: None,
        }
    }

    /// On a connection that carries several streams, the first write of a round waits for one
    /// turn of the runtime and until the hub's pacer has handed out the wake-ups queued before
    /// it (`hub::Pacer`): the connection's task wakes itself and goes to the back of the run
    /// queue, behind the tasks already woken. An event to every stream of a multiplexed
    /// connection wakes each stream's task (in the pacer's turns), and each hands its frame to
    /// HTTP/2 and wakes the connection; without the wait the connection would run right after
    /// the first (tokio runs a task woken by another next) and write each stream's frame on its
    /// own, one system call per stream. With it, the frames of all the streams the event woke
    /// go out in one write. A round ends at the flush that follows its writes. A connection of
    /// one stream writes at once: a turn would only delay it (and a unary answer) behind every
    /// other task.
    fn take_turn(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.writing || !self.slot.connection.multiplexed() {
            return Poll::Ready(());
        }
        let pacer = &self.slot.connections.pacer;
        let Some(mark) = self.round else {
            self.round = Some(pacer.mark());
            cx.waker().wake_by_ref();
            return Poll::Pending;
        };
        ready!(pacer.poll_handed(mark, cx));
        self.round = None;
        self.writing = true;
        Poll::Ready(())
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Door<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some(waiting) = &mut this.waiting else {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        };
        if let Poll::Ready(why) = waiting.closed.as_mut().poll(cx) {
            this.waiting = None;
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why)));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if waiting.watch.complete_after(&buf.filled()[before..]) {
            this.slot
                .connections
                .stop_waiting(this.slot.connection.id());
            this.waiting = None;
        }
        read
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Door<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.take_turn(cx));
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.take_turn(cx));
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let flushed = ready!(Pin::new(&mut this.io).poll_flush(cx));
        this.writing = false;
        Poll::Ready(flushed)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Reads the first bytes of a connection: complete at the end of the HTTP/2 preface, or (for
/// anything that is not a preface) at the first blank line, the end of an HTTP/1.1 request head
/// (`\r\n\r\n`; bare `\n\n` too, as HTTP/1.1 parsers accept it).
#[derive(Default)]
struct HeadWatch {
    /// Bytes of the preface matched so far.
    preface_matched: usize,
    /// A byte differed from the preface: this is HTTP/1.1 (or garbage).
    not_preface: bool,
    /// The last byte other than `\r` was a line feed.
    after_line_feed: bool,
}

impl HeadWatch {
    fn complete_after(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            if !self.not_preface {
                if b == H2_PREFACE[self.preface_matched] {
                    self.preface_matched += 1;
                    if self.preface_matched == H2_PREFACE.len() {
                        return true;
                    }
                } else {
                    self.not_preface = true;
                }
            }
            match b {
                b'\r' => {}
                b'\n' if self.after_line_feed && self.not_preface => return true,
                b'\n' => self.after_line_feed = true,
                _ => self.after_line_feed = false,
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete_in_pieces(pieces: &[&[u8]]) -> Vec<bool> {
        let mut watch = HeadWatch::default();
        pieces.iter().map(|p| watch.complete_after(p)).collect()
    }

    #[test]
    fn a_head_or_preface_is_complete_only_at_its_end() {
        assert_eq!(
            complete_in_pieces(&[b"PRI * HTTP/2.0\r\n\r\n", b"SM\r\n", b"\r\n"]),
            [false, false, true]
        );
        assert_eq!(
            complete_in_pieces(&[b"GET / HTTP/1.1\r\nHost: x\r", b"\n", b"\r\n"]),
            [false, false, true]
        );
        assert_eq!(complete_in_pieces(&[b"GET / HTTP/1.0\n\n"]), [true]);
        assert_eq!(complete_in_pieces(&[b"", b"P", b"RI * HT"]), [false; 3]);
        assert_eq!(complete_in_pieces(&[b"\x16\x03\x01\x02\x00"]), [false]);
    }

    #[tokio::test]
    async fn accepts_wait_while_too_many_evicted_connections_are_still_open() {
        let connections = Connections::new(2, Arc::default());
        // Each past the cap evicts one waiting for its head; none of them has closed yet.
        let mut open: Vec<_> = (0..2 + CLOSING)
            .map(|_| connections.admit().unwrap())
            .collect();
        let mut room = std::pin::pin!(connections.room());
        assert!(futures::poll!(room.as_mut()).is_pending());
        open.pop();
        assert!(futures::poll!(room.as_mut()).is_ready());
    }

    #[test]
    fn the_cap_keeps_a_reserve_of_descriptors() {
        assert_eq!(connection_cap(100_000, 1_048_576), 100_000);
        assert_eq!(connection_cap(100_000, 1024), 896);
        assert_eq!(connection_cap(50, 1024), 50);
        assert_eq!(connection_cap(100_000, 100), 50);
        assert_eq!(connection_cap(100_000, 0), 1);
    }
}
