//! A subscriber's bounded queue: one producer (its room) and one consumer (its stream).
//!
//! tokio's `mpsc::channel` allocates a 32-slot block and a cache-padded channel up front, about
//! 1.8 KiB per subscriber that stays allocated while the stream idles. This queue is a
//! `VecDeque` behind a mutex: it holds nothing until the first value and grows only while events
//! wait. A busy stream keeps the slots it grew to (freeing and growing them again on every burst
//! put each delivery on a cold allocation); its consumer gives them back with [`Receiver::trim`]
//! once it idles, so an idle stream costs one small allocation.
use std::{
    collections::VecDeque,
    future::poll_fn,
    sync::Arc,
    task::{Context, Poll, Waker},
};

use parking_lot::Mutex;

/// Slots an idle queue keeps (the first allocation's size): freeing and allocating them again
/// on every delivery costs more than the 32 bytes they hold.
const KEEP: usize = 4;

/// Creates a queue of at most `capacity` waiting values, with a `mark` both ends can read (the
/// hub's reason for cutting a subscriber off: one allocation per subscriber, not two).
pub fn channel<T, M: Default>(capacity: usize) -> (Sender<T, M>, Receiver<T, M>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            waker: None,
            sender_alive: true,
            receiver_alive: true,
        }),
        capacity,
        mark: M::default(),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

struct Shared<T, M> {
    state: Mutex<State<T>>,
    capacity: usize,
    mark: M,
}

struct State<T> {
    items: VecDeque<T>,
    /// The receiver waiting for a value or for the end.
    waker: Option<Waker>,
    sender_alive: bool,
    receiver_alive: bool,
}

/// Why `try_send` did not queue the value.
#[derive(Debug, PartialEq, Eq)]
pub enum TrySendError {
    /// `capacity` values are waiting.
    Full,
    /// The receiver is gone.
    Closed,
}

/// The producing end; dropping it ends the queue once the waiting values are taken.
pub struct Sender<T, M> {
    shared: Arc<Shared<T, M>>,
}

impl<T, M> Sender<T, M> {
    /// The queue's mark.
    pub fn mark(&self) -> &M {
        &self.shared.mark
    }

    /// Queues `value` unless the queue is full or the receiver is gone; returns the receiver's
    /// waker when it was waiting, for the caller to wake (the hub paces its wake-ups).
    #[must_use = "a waiting receiver sleeps until its waker is woken"]
    pub fn try_send(&self, value: T) -> Result<Option<Waker>, TrySendError> {
        let mut state = self.shared.state.lock();
        if !state.receiver_alive {
            return Err(TrySendError::Closed);
        }
        if state.items.len() >= self.shared.capacity {
            return Err(TrySendError::Full);
        }
        state.items.push_back(value);
        Ok(state.waker.take())
    }
}

impl<T, M> Drop for Sender<T, M> {
    fn drop(&mut self) {
        let waker = {
            let mut state = self.shared.state.lock();
            state.sender_alive = false;
            state.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// The consuming end.
pub struct Receiver<T, M> {
    shared: Arc<Shared<T, M>>,
}

impl<T, M> Receiver<T, M> {
    /// The queue's mark.
    pub fn mark(&self) -> &M {
        &self.shared.mark
    }

    /// The next waiting value, if one is waiting.
    pub fn try_recv(&mut self) -> Option<T> {
        let mut state = self.shared.state.lock();
        let value = state.items.pop_front();
        if state.items.is_empty() {
            // The next burst starts at the front: the slots the last one used, still cached.
            state.items.clear();
        }
        value
    }

    /// Gives back the slots of a drained queue beyond the few an idle stream keeps: for a
    /// consumer that has been idle a while.
    pub fn trim(&mut self) {
        let mut state = self.shared.state.lock();
        if state.items.is_empty() && state.items.capacity() > KEEP {
            state.items = VecDeque::new();
        }
    }

    /// Runs `f` on the waiting values under one lock (it takes what it wants from the front):
    /// a burst is drained at the cost of one lock, not one per value.
    pub fn take_waiting<R>(&mut self, f: impl FnOnce(&mut VecDeque<T>) -> R) -> R {
        let mut state = self.shared.state.lock();
        let r = f(&mut state.items);
        if state.items.is_empty() {
            state.items.clear();
        }
        r
    }

    /// The next value; `None` once the sender is gone and every value has been taken.
    pub async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// `recv` for a hand-written poll: Pending registers `cx`'s waker for the next value or the
    /// end.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        if let Some(value) = self.try_recv() {
            return Poll::Ready(Some(value));
        }
        let mut state = self.shared.state.lock();
        // A value may have arrived since try_recv let go of the lock.
        if let Some(value) = state.items.pop_front() {
            return Poll::Ready(Some(value));
        }
        if !state.sender_alive {
            return Poll::Ready(None);
        }
        match &state.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => state.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl<T, M> Drop for Receiver<T, M> {
    fn drop(&mut self) {
        let mut state = self.shared.state.lock();
        state.receiver_alive = false;
        state.items.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn values_arrive_in_order_and_the_end_follows_the_last() {
        let (tx, mut rx) = channel::<_, ()>(2);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        assert!(matches!(tx.try_send(3), Err(TrySendError::Full)));
        assert_eq!(rx.recv().await, Some(1));
        tx.try_send(3).unwrap();
        drop(tx);
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.try_recv(), Some(3));
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_by_a_send_and_by_the_sender_going_away() {
        let (tx, mut rx) = channel::<_, ()>(4);
        let waiting = tokio::spawn(async move {
            let first = rx.recv().await;
            let end = rx.recv().await;
            (first, end)
        });
        tokio::task::yield_now().await;
        let waker = tx.try_send("a").unwrap();
        waker.expect("the receiver was waiting").wake();
        tokio::task::yield_now().await;
        drop(tx);
        assert_eq!(waiting.await.unwrap(), (Some("a"), None));
    }

    #[test]
    fn take_waiting_takes_what_it_wants_and_leaves_the_rest_in_order() {
        let (tx, mut rx) = channel::<_, ()>(8);
        for v in 1..=5 {
            tx.try_send(v).unwrap();
        }
        let taken: Vec<i32> = rx.take_waiting(|items| items.drain(..3).collect());
        assert_eq!(taken, [1, 2, 3]);
        assert_eq!(rx.try_recv(), Some(4));
        assert_eq!(rx.take_waiting(|items| items.pop_front()), Some(5));
        assert_eq!(rx.take_waiting(|items| items.len()), 0);
    }

    #[test]
    fn a_drained_queue_keeps_its_slots_until_trimmed() {
        let (tx, mut rx) = channel::<_, ()>(64);
        for v in 0..40 {
            let _ = tx.try_send(v).unwrap();
        }
        let taken: Vec<i32> = rx.take_waiting(|items| items.drain(..).collect());
        assert_eq!(taken.len(), 40);
        let grown = rx.shared.state.lock().items.capacity();
        assert!(grown >= 40, "{grown}");
        rx.trim();
        assert_eq!(rx.shared.state.lock().items.capacity(), 0);
        let _ = tx.try_send(1).unwrap();
        rx.trim();
        // Not drained: nothing is given back.
        assert_eq!(rx.shared.state.lock().items.capacity(), KEEP);
        assert_eq!(rx.try_recv(), Some(1));
    }

    #[test]
    fn sending_to_a_dropped_receiver_is_closed() {
        let (tx, rx) = channel::<_, ()>(4);
        drop(rx);
        assert!(matches!(tx.try_send(1), Err(TrySendError::Closed)));
    }
}
