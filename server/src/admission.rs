//! Admission of the requests of new connections at the pace the node keeps up with (a reconnect
//! storm: a node died and all its clients come back on this one at once, up to a hundred
//! `Subscribe` streams to a connection). A request (an HTTP/2 stream, or an HTTP/1.1 request) on
//! a connection accepted less than [`YOUNG`] ago waits its turn at the gate before it is routed,
//! authenticated, registered and replayed: the work a storm brings. Waiting, it costs its task's
//! memory and no CPU. Requests on older connections (the clients already here: a writer's calls,
//! a dashboard's) never wait, and their events and answers no longer queue behind the storm;
//! nor do health checks and metrics.
//!
//! Every [`TICK`] while requests of new connections come in (every [`QUIET_TICK`] after
//! [`QUIET_TICKS`] ticks without one: an idle node does not wake 200 times a second), the gate
//! measures the runtime's lag, the longer of:
//! - how long a task woken from a thread outside the runtime waits for its turn, as the
//!   subscribers of an event wait, woken by the store's writer (tokio's global queue);
//! - how long a task that yields waits at the back of its worker's run queue, as a connection
//!   woken by its socket waits.
//!
//! Then:
//! - lag within half of [`TARGET_LAG`]: the pace doubles, up to [`MAX_PER_TICK`], if the last
//!   tick used all of it;
//! - lag over [`TARGET_LAG`]: the pace halves, down to [`MIN_PER_TICK`];
//! - between: the pace holds.
//!
//! New requests always get in, slowly, even on a node busy with its own: whatever the pace, a
//! tick lets in at least [`MIN_PER_TICK`] for every [`TICK`] of wall-clock time since the last
//! one (400/s), as a busy runtime runs the gate's ticks late.
use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::Thread,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{connections::Connection, metrics::METRICS};

/// How often the lag is measured and the pace set while requests of new connections come in.
const TICK: Duration = Duration::from_millis(5);
/// How often otherwise (the lag shown in `/metrics` stays fresh).
const QUIET_TICK: Duration = Duration::from_secs(1);
/// Ticks without a request of a new connection (and none waiting) before the gate ticks at
/// [`QUIET_TICK`]: a second's worth.
const QUIET_TICKS: u32 = 200;
/// The lag above which the pace halves.
const TARGET_LAG: Duration = Duration::from_millis(20);
/// Requests let in per tick at the slowest pace, and per [`TICK`] of wall-clock time whatever
/// the pace (400/s).
const MIN_PER_TICK: usize = 2;
/// Requests let in per tick at the fastest pace (25,600/s, about twice the streams one core
/// opens).
const MAX_PER_TICK: usize = 128;
/// Requests that never wait: a load balancer's health checks and a scraper must see the node
/// through a storm (on new connections too), and they cost next to nothing.
const PROBES: [&str; 3] = ["/healthz", "/metrics", "/grpc.health.v1.Health/"];
/// How long after its accept a connection's requests wait their turn.
const YOUNG: Duration = Duration::from_secs(2);

/// The gate the requests of new connections pass before they are served.
pub struct Admission {
    state: Mutex<Pace>,
    /// Whether the probe ticks every [`TICK`] (else every [`QUIET_TICK`]). Written with `state`
    /// locked, so a request that arrives as the gate goes quiet always finds it quiet and
    /// wakes the probe.
    fast: Arc<AtomicBool>,
    /// The thread that wakes the gate's task every tick (woken early when ticks speed up).
    probe: Thread,
}

/// The pace and the requests waiting for their turn, first come first in.
struct Pace {
    per_tick: usize,
    /// Turns left in this tick.
    left: usize,
    /// Requests that came to the gate since the last tick.
    arrived: usize,
    waiting: VecDeque<oneshot::Sender<()>>,
    /// The node is shutting down: every request goes in at once (and is ended there).
    open: bool,
}

impl Admission {
    /// The gate, its pace kept by a task until `stop`.
    pub fn start(stop: CancellationToken) -> Arc<Admission> {
        let fast = Arc::new(AtomicBool::new(false));
        let (wake, woken) = mpsc::channel::<Instant>(1);
        let admission = Arc::new(Admission {
            state: Mutex::new(Pace {
                per_tick: MIN_PER_TICK,
                left: MIN_PER_TICK,
                arrived: 0,
                waiting: VecDeque::new(),
                open: false,
            }),
            probe: probe(wake, fast.clone()),
            fast,
        });
        tokio::spawn(admission.clone().keep_pace(woken, stop));
        admission
    }

    /// Whether a request for `path` on `connection` waits its turn: one on a connection accepted
    /// less than [`YOUNG`] ago, unless it is a health check or metrics ([`PROBES`]).
    pub fn must_wait(connection: &Connection, path: &str) -> bool {
        connection.accepted().elapsed() < YOUNG && !PROBES.iter().any(|p| path.starts_with(p))
    }

    /// Returns when it is this request's turn.
    pub async fn enter(&self) {
        if let Err(turn) = self.take_turn() {
            // An error only if the gate is gone with the node.
            let _ = turn.await;
        }
    }

    /// A turn now, or the wait for one, first come first in.
    fn take_turn(&self) -> Result<(), oneshot::Receiver<()>> {
        let mut pace = self.state.lock();
        pace.arrived += 1;
        if !self.fast.swap(true, Ordering::Relaxed) {
            // The first request after a quiet spell: the gate ticks at its pace again, now.
            self.probe.unpark();
        }
        if pace.open || (pace.waiting.is_empty() && pace.left > 0) {
            pace.left = pace.left.saturating_sub(1);
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        pace.waiting.push_back(tx);
        METRICS.admission_waiting.inc();
        METRICS.admission_delayed.inc();
        Err(rx)
    }

    async fn keep_pace(
        self: Arc<Self>,
        mut woken: mpsc::Receiver<Instant>,
        stop: CancellationToken,
    ) {
        let mut last_tick = Instant::now();
        let mut rhythm = Rhythm::default();
        loop {
            let sent = tokio::select! {
                _ = stop.cancelled() => break,
                sent = woken.recv() => match sent {
                    Some(sent) => sent,
                    None => break,
                },
            };
            let remote = sent.elapsed();
            // A task that yields waits behind every task its worker has runnable (a woken
            // connection among them).
            let queued = Instant::now();
            tokio::task::yield_now().await;
            let lag = remote.max(queued.elapsed());
            METRICS.runtime_lag_us.set(lag.as_micros() as i64);
            let since = std::mem::replace(&mut last_tick, Instant::now()).elapsed();
            let mut pace = self.state.lock();
            let fast = self.fast.load(Ordering::Relaxed);
            let arrived = pace.arrived;
            pace.tick(lag, rhythm.since(fast, since));
            if fast && rhythm.goes_quiet(arrived, pace.waiting.len()) {
                self.fast.store(false, Ordering::Relaxed);
            }
        }
        let mut pace = self.state.lock();
        pace.open = true;
        pace.let_in(usize::MAX);
    }
}

impl Pace {
    /// Sets the pace for the next tick from the lag at the end of this one, and lets its turns in:
    /// the pace's, or [`MIN_PER_TICK`] for every [`TICK`] in `since` (the time since the last
    /// tick) if that is more.
    fn tick(&mut self, lag: Duration, since: Duration) {
        let used_all = self.left == 0;
        self.per_tick = if lag > TARGET_LAG {
            (self.per_tick / 2).max(MIN_PER_TICK)
        } else if lag <= TARGET_LAG / 2 && used_all {
            (self.per_tick * 2).min(MAX_PER_TICK)
        } else {
            self.per_tick
        };
        let floor = MIN_PER_TICK * (since.as_micros() / TICK.as_micros()) as usize;
        self.left = self.let_in(self.per_tick.max(floor));
        self.arrived = 0;
    }

    /// Lets up to `turns` waiting requests in (one that was dropped waiting takes no turn);
    /// returns the turns left.
    fn let_in(&mut self, mut turns: usize) -> usize {
        while turns > 0 {
            let Some(next) = self.waiting.pop_front() else {
                break;
            };
            METRICS.admission_waiting.dec();
            if next.send(()).is_ok() {
                turns -= 1;
            }
        }
        turns
    }
}

/// Whether the gate's ticks are fast, as its task follows them.
#[derive(Default)]
struct Rhythm {
    /// Fast ticks in a row without a request of a new connection and with none waiting.
    quiet_ticks: u32,
    was_fast: bool,
}

impl Rhythm {
    /// The time a tick `since` the last one counts for the wall-clock floor ([`Pace::tick`]):
    /// all of it between fast ticks, one [`TICK`] for a quiet tick or the first fast one after
    /// a quiet spell (it comes as soon as a request does: the spell is not lateness).
    fn since(&mut self, fast: bool, since: Duration) -> Duration {
        let was_fast = std::mem::replace(&mut self.was_fast, fast);
        if fast && was_fast { since } else { TICK }
    }

    /// After a fast tick in which `arrived` requests came, with `waiting` still waiting: whether
    /// the gate goes quiet now, after [`QUIET_TICKS`] such ticks without either.
    fn goes_quiet(&mut self, arrived: usize, waiting: usize) -> bool {
        self.quiet_ticks = match arrived == 0 && waiting == 0 {
            true => self.quiet_ticks + 1,
            false => 0,
        };
        let quiet = self.quiet_ticks >= QUIET_TICKS;
        if quiet {
            self.quiet_ticks = 0;
        }
        quiet
    }
}

/// The probe: a thread of its own that wakes the gate's task every tick, as the store's writer
/// wakes the subscribers of an event and the callers it answers, so how long the task then waits
/// for its turn is how late they are. Every [`TICK`] while `fast`, else every [`QUIET_TICK`]
/// or when unparked; it ends with the gate's task.
fn probe(wake: mpsc::Sender<Instant>, fast: Arc<AtomicBool>) -> Thread {
    std::thread::Builder::new()
        .name("admission-probe".into())
        .spawn(move || {
            while wake.blocking_send(Instant::now()).is_ok() {
                match fast.load(Ordering::Relaxed) {
                    true => std::thread::sleep(TICK),
                    false => std::thread::park_timeout(QUIET_TICK),
                }
            }
        })
        .expect("spawning the admission probe's thread")
        .thread()
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pace(per_tick: usize, left: usize) -> Pace {
        Pace {
            per_tick,
            left,
            arrived: 0,
            waiting: VecDeque::new(),
            open: false,
        }
    }

    fn wait(pace: &mut Pace) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        pace.waiting.push_back(tx);
        rx
    }

    #[test]
    fn the_pace_doubles_while_the_node_keeps_up_and_all_turns_are_used() {
        let mut p = pace(8, 0);
        p.tick(Duration::from_millis(1), TICK);
        assert_eq!(p.per_tick, 16);
        // Turns left over: no demand for a faster pace.
        p.tick(Duration::from_millis(1), TICK);
        assert_eq!(p.per_tick, 16);
        p.left = 0;
        p.tick(TARGET_LAG / 2, TICK);
        assert_eq!(p.per_tick, 32);
        p.per_tick = MAX_PER_TICK;
        p.left = 0;
        p.tick(Duration::ZERO, TICK);
        assert_eq!(p.per_tick, MAX_PER_TICK);
    }

    #[test]
    fn the_pace_halves_when_tasks_wait_too_long_and_holds_in_between() {
        let mut p = pace(64, 0);
        p.tick(TARGET_LAG + Duration::from_millis(1), TICK);
        assert_eq!(p.per_tick, 32);
        p.left = 0;
        p.tick(TARGET_LAG, TICK);
        assert_eq!(p.per_tick, 32);
        for _ in 0..10 {
            p.tick(Duration::from_secs(1), TICK);
        }
        assert_eq!(p.per_tick, MIN_PER_TICK);
    }

    #[test]
    fn waiting_requests_go_in_first_come_first_in_and_one_dropped_takes_no_turn() {
        let mut p = pace(2, 0);
        let mut first = wait(&mut p);
        drop(wait(&mut p));
        let mut third = wait(&mut p);
        let mut fourth = wait(&mut p);
        p.tick(TARGET_LAG, TICK);
        assert!(first.try_recv().is_ok());
        assert!(third.try_recv().is_ok());
        assert!(fourth.try_recv().is_err());
        assert_eq!((p.left, p.waiting.len()), (0, 1));
        p.tick(TARGET_LAG, TICK);
        assert!(fourth.try_recv().is_ok());
        assert_eq!(p.left, 1);
    }

    #[test]
    fn the_gate_goes_quiet_after_a_second_of_ticks_without_requests_and_counts_no_floor_for_it() {
        let mut r = Rhythm::default();
        // The first fast tick after a quiet spell (or the start) counts one tick, not the spell.
        assert_eq!(r.since(true, QUIET_TICK), TICK);
        assert_eq!(
            r.since(true, Duration::from_millis(100)),
            Duration::from_millis(100)
        );
        for _ in 1..QUIET_TICKS {
            assert!(!r.goes_quiet(0, 0));
        }
        // A request, or one still waiting, starts the count again.
        assert!(!r.goes_quiet(1, 0));
        for _ in 1..QUIET_TICKS {
            assert!(!r.goes_quiet(0, 0));
        }
        assert!(!r.goes_quiet(0, 3));
        for _ in 1..QUIET_TICKS {
            assert!(!r.goes_quiet(0, 0));
        }
        assert!(r.goes_quiet(0, 0));
        assert_eq!(r.since(false, QUIET_TICK), TICK);
        assert_eq!(r.since(true, QUIET_TICK), TICK);
    }

    #[test]
    fn ticks_that_come_late_still_let_in_the_slowest_pace_per_tick_of_wall_clock_time() {
        let mut p = pace(MIN_PER_TICK, 0);
        let waiting: Vec<_> = (0..100).map(|_| wait(&mut p)).collect();
        // A runtime so busy that the gate's tick came 100 ms after the last: 20 ticks' worth.
        p.tick(Duration::from_millis(100), Duration::from_millis(100));
        assert_eq!(p.per_tick, MIN_PER_TICK);
        let let_in = waiting
            .into_iter()
            .filter_map(|mut w| w.try_recv().ok())
            .count();
        assert_eq!(let_in, 20 * MIN_PER_TICK);
    }
}
