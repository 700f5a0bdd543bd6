//! A connection's HTTP/2 streams run inside the connection's own task, not as tasks of their own.
//!
//! hyper hands each HTTP/2 stream it accepts to its executor, and tokio's makes it a task. Then
//! every delivery on a `Subscribe` stream takes two turns in the run queue (the stream's task
//! frames the events and hands them to h2, which wakes the connection's task to write them), and
//! a unary call waits for two (its connection's, to read it, then its own, to answer it), each
//! behind every task already queued: on a busy node, a whole round of its streams each time.
//!
//! Here [`StreamExec`] is the executor of one connection: it keeps the streams hyper gives it,
//! and [`LocalStreams`], the connection's future, polls them right after the connection itself,
//! in rounds until neither wakes the other. A delivery is then one wake-up of the connection's
//! task, and a unary call is answered in the poll that read it. A stream's wake-ups (its queue,
//! its body, its timers) wake the connection's task; the wake-ups that the connection and its
//! streams give each other while it runs only mark another round.
//!
//! The streams of one connection share a worker thread, as its frames already did: a load
//! balancer's connection of many streams is still spread over the runtime as a whole. When the
//! connection ends, its streams are driven to their own ends (h2 tells them the connection is
//! gone), as their tasks would have been.
use std::{
    future::Future,
    mem,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering::SeqCst},
    },
    task::{Context, Poll, Wake, Waker},
};

use futures::{StreamExt, future::BoxFuture, stream::FuturesUnordered, task::AtomicWaker};

/// Most rounds of one poll while the connection and its streams keep waking each other; then the
/// task yields, so that one connection cannot hold its worker (and tokio's per-poll budget,
/// once spent, makes its resources answer "not yet" until the task is polled again).
const ROUNDS: usize = 8;

/// hyper's executor for one connection's HTTP/2 streams: they run in that connection's
/// [`LocalStreams`].
#[derive(Clone)]
pub struct StreamExec(Arc<Shared>);

/// A stream as hyper gives it.
type Stream = BoxFuture<'static, ()>;

/// What the executor, the wakers and the connection's future share.
struct Shared {
    /// Streams given by hyper, not yet taken by the connection's future.
    spawned: Mutex<Vec<Stream>>,
    /// The connection's task.
    task: AtomicWaker,
    /// Set while the connection's future runs its rounds: a wake-up then only marks a flag.
    polling: AtomicBool,
    /// The connection woken (through [`ConnWaker`]) since it was last polled.
    conn_woken: AtomicBool,
    /// The streams woken (through `Shared` itself) since they were last polled.
    streams_woken: AtomicBool,
}

/// The connection's own waker: only its wake-ups poll it (polled for nothing, it costs about as
/// much as a delivery).
struct ConnWaker(Arc<Shared>);

/// A new connection's executor (its connection is polled first).
impl Default for StreamExec {
    fn default() -> StreamExec {
        StreamExec(Arc::new(Shared {
            spawned: Mutex::new(Vec::new()),
            task: AtomicWaker::new(),
            polling: AtomicBool::new(false),
            conn_woken: AtomicBool::new(true),
            streams_woken: AtomicBool::new(false),
        }))
    }
}

impl StreamExec {
    /// The future serving `conn` (hyper's connection, built with this executor) and its streams:
    /// it ends with `conn`'s result once `conn` and all its streams have ended.
    pub fn serve<C: Future>(self, conn: C) -> LocalStreams<C> {
        LocalStreams {
            conn: Some(conn),
            ended: None,
            streams: Streams::None,
            streams_waker: Waker::from(self.0.clone()),
            conn_waker: Waker::from(Arc::new(ConnWaker(self.0.clone()))),
            exec: self,
        }
    }
}

impl<F: Future<Output = ()> + Send + 'static> hyper::rt::Executor<F> for StreamExec {
    fn execute(&self, stream: F) {
        self.0.spawned.lock().unwrap().push(Box::pin(stream));
        // hyper gives streams while the connection is polled: this only marks another round.
        self.0.mark(&self.0.streams_woken);
    }
}

impl Shared {
    /// Sets `flag` and wakes the connection's task, unless it is running its rounds.
    fn mark(&self, flag: &AtomicBool) {
        flag.store(true, SeqCst);
        if !self.polling.load(SeqCst) {
            self.task.wake();
        }
    }

    fn woken(&self) -> bool {
        self.conn_woken.load(SeqCst) || self.streams_woken.load(SeqCst)
    }
}

impl Wake for Shared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.mark(&self.streams_woken);
    }
}

impl Wake for ConnWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.mark(&self.0.conn_woken);
    }
}

/// A connection's streams. Most connections carry one (a browser's, a service's `Subscribe`),
/// which its wake-ups poll directly; a second one makes them a `FuturesUnordered`, which polls
/// only the streams that woke.
enum Streams {
    None,
    One(Stream),
    Many(FuturesUnordered<Stream>),
}

impl Streams {
    fn add(&mut self, stream: Stream) {
        *self = match mem::replace(self, Streams::None) {
            Streams::None => Streams::One(stream),
            // The first stream's wake-ups go to the shared waker until the set polls it (a
            // pushed future is polled) and it takes the set's.
            Streams::One(first) => Streams::Many([first, stream].into_iter().collect()),
            Streams::Many(set) => {
                set.push(stream);
                Streams::Many(set)
            }
        };
    }

    /// Polls the streams that may have woken (`cx` wakes the streams' side of the task).
    fn poll(&mut self, cx: &mut Context<'_>) {
        match self {
            Streams::None => {}
            Streams::One(stream) => {
                if stream.as_mut().poll(cx).is_ready() {
                    *self = Streams::None;
                }
            }
            Streams::Many(set) => while let Poll::Ready(Some(())) = set.poll_next_unpin(cx) {},
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Streams::None => true,
            Streams::One(_) => false,
            Streams::Many(set) => set.is_empty(),
        }
    }
}

pin_project_lite::pin_project! {
    /// One connection and its streams, as one future (see the module's doc).
    pub struct LocalStreams<C: Future> {
        #[pin]
        conn: Option<C>,
        // The connection's result, once it has ended (its streams may still be ending).
        ended: Option<C::Output>,
        streams: Streams,
        streams_waker: Waker,
        conn_waker: Waker,
        exec: StreamExec,
    }
}

impl<C: Future> Future for LocalStreams<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let mut this = self.project();
        let shared = &this.exec.0;
        shared.task.register(cx.waker());
        shared.polling.store(true, SeqCst);
        for _ in 0..ROUNDS {
            if shared.conn_woken.swap(false, SeqCst)
                && let Some(conn) = this.conn.as_mut().as_pin_mut()
                && let Poll::Ready(out) = conn.poll(&mut Context::from_waker(this.conn_waker))
            {
                // Dropped at once: its socket (and its place at the door) is freed now.
                this.conn.set(None);
                *this.ended = Some(out);
            }
            if shared.streams_woken.swap(false, SeqCst) {
                mem::take(&mut *shared.spawned.lock().unwrap())
                    .into_iter()
                    .for_each(|s| this.streams.add(s));
                this.streams
                    .poll(&mut Context::from_waker(this.streams_waker));
            }
            if !shared.woken() {
                break;
            }
        }
        shared.polling.store(false, SeqCst);
        if this.ended.is_some() && this.streams.is_empty() {
            return Poll::Ready(this.ended.take().expect("checked"));
        }
        // Woken in the last round (or after it, while `polling` still held the wake-up back).
        if shared.woken() {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    use hyper::rt::Executor;

    use super::*;

    /// A future standing for the connection or a stream: counts its polls, keeps its latest
    /// waker, ends once told to, and on each poll wakes what `on_poll` holds.
    #[derive(Clone, Default)]
    struct Probe(Arc<ProbeState>);

    #[derive(Default)]
    struct ProbeState {
        polls: AtomicUsize,
        waker: Mutex<Option<Waker>>,
        done: AtomicBool,
        on_poll: Mutex<Option<Waker>>,
    }

    impl Probe {
        fn polls(&self) -> usize {
            self.0.polls.load(Relaxed)
        }
        fn wake(&self) {
            self.0.waker.lock().unwrap().take().expect("polled").wake();
        }
        fn end(&self) {
            self.0.done.store(true, Relaxed);
            self.wake();
        }
        fn future(&self) -> impl Future<Output = ()> + Send + 'static {
            let probe = self.clone();
            std::future::poll_fn(move |cx| {
                let s = &probe.0;
                s.polls.fetch_add(1, Relaxed);
                *s.waker.lock().unwrap() = Some(cx.waker().clone());
                if let Some(w) = s.on_poll.lock().unwrap().as_ref() {
                    w.wake_by_ref();
                }
                if s.done.load(Relaxed) {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            })
        }
    }

    /// The task's waker: counts its wake-ups.
    #[derive(Default)]
    struct Task(AtomicUsize);

    impl Wake for Task {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Relaxed);
        }
    }

    struct Served {
        exec: StreamExec,
        conn: Probe,
        task: Arc<Task>,
        future: Pin<Box<LocalStreams<Stream>>>,
    }

    impl Served {
        fn new() -> Served {
            let (exec, conn) = (StreamExec::default(), Probe::default());
            let future = Box::pin(exec.clone().serve(Box::pin(conn.future()) as Stream));
            Served {
                exec,
                conn,
                task: Arc::new(Task::default()),
                future,
            }
        }
        fn poll(&mut self) -> Poll<()> {
            let waker = Waker::from(self.task.clone());
            self.future.as_mut().poll(&mut Context::from_waker(&waker))
        }
        fn wakes(&self) -> usize {
            self.task.0.load(Relaxed)
        }
        fn stream(&self) -> Probe {
            let stream = Probe::default();
            self.exec.execute(stream.future());
            stream
        }
    }

    #[test]
    fn each_wake_polls_only_what_woke_and_the_end_waits_for_the_streams() {
        let mut s = Served::new();
        assert!(s.poll().is_pending());
        assert_eq!(s.conn.polls(), 1);
        let stream = s.stream();
        assert_eq!(s.wakes(), 1, "a stream given outside a poll wakes the task");
        assert!(s.poll().is_pending());
        assert_eq!((s.conn.polls(), stream.polls()), (1, 1));
        stream.wake();
        assert_eq!(s.wakes(), 2);
        assert!(s.poll().is_pending());
        assert_eq!((s.conn.polls(), stream.polls()), (1, 2));
        s.conn.wake();
        assert_eq!(s.wakes(), 3);
        assert!(s.poll().is_pending());
        assert_eq!((s.conn.polls(), stream.polls()), (2, 2));
        s.conn.end();
        assert!(s.poll().is_pending(), "the stream is still running");
        stream.end();
        assert!(s.poll().is_ready());
        assert_eq!((s.conn.polls(), stream.polls()), (3, 3));
    }

    #[test]
    fn a_stream_waking_the_connection_is_written_in_the_same_poll_without_a_task_wake() {
        let mut s = Served::new();
        assert!(s.poll().is_pending());
        let stream = s.stream();
        assert!(s.poll().is_pending());
        // As h2's send_data does: the stream's poll wakes the connection to write.
        let conn_waker = s.conn.0.waker.lock().unwrap().clone();
        *stream.0.on_poll.lock().unwrap() = conn_waker;
        let wakes = s.wakes();
        stream.wake();
        assert!(s.poll().is_pending());
        assert_eq!((s.conn.polls(), stream.polls()), (2, 2));
        assert_eq!(
            s.wakes(),
            wakes + 1,
            "only the stream's own wake-up reached the task"
        );
    }

    #[test]
    fn of_several_streams_only_the_woken_one_is_polled() {
        let mut s = Served::new();
        assert!(s.poll().is_pending());
        let (a, b) = (s.stream(), s.stream());
        assert!(s.poll().is_pending());
        assert_eq!((a.polls(), b.polls()), (1, 1));
        b.wake();
        assert!(s.poll().is_pending());
        assert_eq!((a.polls(), b.polls()), (1, 2));
        let c = s.stream();
        a.wake();
        assert!(s.poll().is_pending());
        assert_eq!((a.polls(), b.polls(), c.polls()), (2, 2, 1));
    }

    #[test]
    fn a_stream_that_keeps_waking_itself_yields_the_worker_after_the_rounds() {
        let mut s = Served::new();
        assert!(s.poll().is_pending());
        let stream = s.stream();
        assert!(s.poll().is_pending());
        *stream.0.on_poll.lock().unwrap() = stream.0.waker.lock().unwrap().clone();
        stream.wake();
        let wakes = s.wakes();
        assert!(s.poll().is_pending());
        assert_eq!(stream.polls(), 1 + ROUNDS);
        assert_eq!(s.wakes(), wakes + 1, "the task is woken to go on later");
    }
}
