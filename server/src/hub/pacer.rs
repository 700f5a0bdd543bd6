//! Wake-ups of subscribers' streams after a fan-out, handed to the runtime a few at a time in
//! the order they came, so that every stream is served once per round and a new call is not kept
//! waiting behind them.
//!
//! A fan-out to a big room wakes every subscriber's stream at once. A tokio worker's own run
//! queue holds 256 tasks; the rest spill into the shared queue, which a busy worker takes from
//! only once every few dozen polls, while the streams woken again by the next event refill its
//! own queue. The spilled streams then wait many rounds, and so does the connection of a call
//! that comes in meanwhile: with 1,000 broadcasts a second to 1,000 streams, a Broadcast call's
//! p99 was 12-55 ms and a delivery's 67-250 ms. Here a fan-out's wake-ups join one FIFO list,
//! and one task wakes `PER_WORKER` of them per worker each turn and goes to the back of the run
//! queue behind them: the run queues stay short and every stream gets its turn in order.
//!
//! A connection that carries several streams writes in rounds (`connections::Door`): the first
//! write of a round waits until the wake-ups queued before it have been handed out, or the next
//! `ROUND_TURNS` turns' worth of them, whichever comes first. The streams of one connection that
//! one event woke (subscribed together, so near each other in the list) still leave in one
//! write, and no round waits for the whole of a huge room.
use std::{
    collections::VecDeque,
    future::poll_fn,
    sync::Arc,
    task::{Context, Poll, Waker},
};

use parking_lot::Mutex;

/// Wake-ups per worker per turn: far below a worker's 256-task queue, so that the connections
/// the woken streams write to and the tasks the I/O driver wakes meanwhile fit beside them, and
/// enough for the other workers to steal from the pacing task's worker.
const PER_WORKER: usize = 16;

/// Turns a write round waits for at most.
const ROUND_TURNS: u64 = 8;

/// The wake-ups waiting for their turn.
#[derive(Default)]
pub struct Pacer {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    waiting: VecDeque<Waker>,
    /// A task is handing `waiting` out.
    running: bool,
    /// Wake-ups ever queued in `waiting`, and ever handed out of it.
    queued: u64,
    handed: u64,
    /// Wake-ups handed out per turn (set when the task starts).
    turn: usize,
    /// Write rounds waiting for `handed` to reach their mark.
    rounds: Vec<(u64, Waker)>,
}

impl Pacer {
    /// Wakes `woken` in their turn: at once when nothing waits and they are few, otherwise
    /// behind the wake-ups already waiting, from a task started when none runs.
    pub fn wake(self: &Arc<Self>, mut woken: Vec<Waker>) {
        if woken.is_empty() {
            return;
        }
        let start = {
            let mut s = self.state.lock();
            if !s.running && woken.len() <= PER_WORKER {
                false
            } else {
                s.queued += woken.len() as u64;
                s.waiting.extend(woken.drain(..));
                let start = !std::mem::replace(&mut s.running, true);
                if start {
                    s.turn = PER_WORKER * tokio::runtime::Handle::current().metrics().num_workers();
                }
                start
            }
        };
        // Empty unless they are woken now.
        woken.into_iter().for_each(Waker::wake);
        if start {
            tokio::spawn(self.clone().run());
        }
    }

    /// The mark of a write round that begins now: the wake-ups queued so far, or the next
    /// `ROUND_TURNS` turns' worth.
    pub fn mark(&self) -> u64 {
        let s = self.state.lock();
        s.queued.min(s.handed + ROUND_TURNS * s.turn as u64)
    }

    /// Ready once the wake-ups queued before `mark` have all been handed out; otherwise `cx`'s
    /// task is woken then, behind the streams of that turn.
    pub fn poll_handed(&self, mark: u64, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.state.lock();
        if s.handed >= mark {
            return Poll::Ready(());
        }
        s.rounds.push((mark, cx.waker().clone()));
        Poll::Pending
    }

    /// Wakes a turn's worth of the waiting wake-ups per turn until none waits.
    async fn run(self: Arc<Self>) {
        let mut batch = Vec::new();
        let mut rounds = Vec::new();
        poll_fn(|cx| {
            {
                let mut s = self.state.lock();
                if s.waiting.is_empty() {
                    s.running = false;
                    return Poll::Ready(());
                }
                let n = s.waiting.len().min(s.turn);
                batch.extend(s.waiting.drain(..n));
                s.handed += n as u64;
                let handed = s.handed;
                let passed = s.rounds.extract_if(.., |(mark, _)| *mark <= handed);
                rounds.extend(passed.map(|(_, waker)| waker));
            }
            // The rounds after the streams: they write what those streams hand them.
            batch
                .drain(..)
                .chain(rounds.drain(..))
                .for_each(Waker::wake);
            // Woken while running, the task goes to the back of the run queue, behind the
            // streams it just woke.
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::task::Wake;

    use super::*;

    /// Records its wake-ups in a list shared with the others.
    struct Recorder {
        n: usize,
        order: Arc<Mutex<Vec<usize>>>,
    }

    impl Wake for Recorder {
        fn wake(self: Arc<Self>) {
            self.order.lock().push(self.n);
        }
    }

    fn wakers(from: usize, to: usize, order: &Arc<Mutex<Vec<usize>>>) -> Vec<Waker> {
        (from..to)
            .map(|n| {
                Waker::from(Arc::new(Recorder {
                    n,
                    order: order.clone(),
                }))
            })
            .collect()
    }

    #[tokio::test]
    async fn every_wake_up_happens_once_in_the_order_they_came() {
        let pacer = Arc::new(Pacer::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        // A small fan-out with nothing waiting: woken at once.
        pacer.wake(wakers(0, 3, &order));
        assert_eq!(*order.lock(), vec![0, 1, 2]);
        // Two big ones and a small one behind them: in turn, in order. A probe task that goes
        // to the back of the run queue at each poll, as the pacing task does, sees each turn.
        let probe = tokio::spawn({
            let (order, pacer) = (order.clone(), pacer.clone());
            let mut seen = vec![];
            async move {
                poll_fn(|cx| {
                    seen.push(order.lock().len());
                    if seen.len() > 1 && !pacer.state.lock().running {
                        return Poll::Ready(std::mem::take(&mut seen));
                    }
                    cx.waker().wake_by_ref();
                    Poll::Pending
                })
                .await
            }
        });
        pacer.wake(wakers(3, 203, &order));
        pacer.wake(wakers(203, 603, &order));
        pacer.wake(wakers(603, 605, &order));
        assert_eq!(order.lock().len(), 3, "a big fan-out waits for its turns");
        // One worker: 16 a turn.
        let seen = probe.await.unwrap();
        assert!(
            seen.len() > 602 / PER_WORKER && seen.windows(2).all(|w| w[1] - w[0] <= PER_WORKER),
            "more than one turn's wake-ups at once: {seen:?}"
        );
        assert_eq!(*order.lock(), (0..605).collect::<Vec<_>>());
        assert!(pacer.state.lock().waiting.is_empty());
    }

    #[tokio::test]
    async fn a_write_round_waits_for_the_wake_ups_queued_before_it() {
        let pacer = Arc::new(Pacer::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let round = wakers(1000, 1001, &order).pop().unwrap();
        let mut cx = Context::from_waker(&round);
        // Nothing waits: a round writes at once.
        assert!(pacer.poll_handed(pacer.mark(), &mut cx).is_ready());
        pacer.wake(wakers(0, 100, &order));
        let mark = pacer.mark();
        pacer.wake(wakers(100, 200, &order));
        assert!(pacer.poll_handed(mark, &mut cx).is_pending());
        while pacer.state.lock().running {
            tokio::task::yield_now().await;
        }
        let order = order.lock();
        let at = order
            .iter()
            .position(|&n| n == 1000)
            .expect("the round was woken");
        // Behind every wake-up queued before its mark, and not behind those queued after.
        assert!((100..=100 + PER_WORKER).contains(&at), "woken at {at}");
        assert_eq!(order.len(), 201);
    }
}
