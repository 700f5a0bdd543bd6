//! `Client::watch`: an org's events as one endless stream across reconnects, server restarts,
//! endpoint failures and token expiry. It resumes from the last cursor it yielded, drops any
//! durable event whose seq is not above the last one yielded, and reports connection states
//! beside the events.
use std::{collections::VecDeque, fmt, time::Duration};

use futures::stream::{self, BoxStream};
use tonic::{Status, Streaming};

use super::{
    Client, Error,
    backoff::Backoff,
    error::{is_resumable_stream, is_token_expired},
};
use crate::proto::{Event, EventKind, OrgFilter, event::Payload};

/// Which events to watch.
#[derive(Debug, Clone, Default)]
pub struct WatchFilter {
    /// Empty = the token's org.
    pub org_id: String,
    /// Empty = every kind.
    pub kinds: Vec<EventKind>,
    /// Narrows entity events to these entity types; empty = every type.
    pub entity_types: Vec<String>,
    /// Durable events with at least one of these topics; empty = all.
    pub topics: Vec<String>,
}

/// What a watch yields: the server's events (durable and ephemeral, `resync` included) and the
/// watch's own connection-state changes.
#[derive(Debug, Clone)]
pub enum WatchItem {
    /// An event from the server.
    Event(Box<Event>),
    /// A connection-state change.
    State(ConnState),
}

/// Connection-state changes of a watch.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnState {
    /// A `Subscribe` stream is open on `endpoint`.
    Connected {
        /// The server URL.
        endpoint: String,
    },
    /// The stream broke; the next attempt starts after `delay`.
    Reconnecting {
        /// How long the watch waits before the attempt.
        delay: Duration,
        /// Attempts since the last healthy connection (1 = first retry).
        attempt: u32,
        /// Why the previous stream or attempt failed.
        reason: String,
    },
    /// The server could not replay from the cursor (too old, or another log): the caller should
    /// reload its snapshot. The `resync` event itself follows this state.
    Resynced {
        /// The server's explanation.
        reason: String,
    },
}

impl fmt::Display for ConnState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnState::Connected { endpoint } => write!(f, "connected to {endpoint}"),
            ConnState::Reconnecting {
                delay,
                attempt,
                reason,
            } => write!(
                f,
                "reconnecting in {} ms (attempt {attempt}): {reason}",
                delay.as_millis()
            ),
            ConnState::Resynced { reason } => {
                write!(
                    f,
                    "resynced: {reason}; events before this point were not replayed"
                )
            }
        }
    }
}

/// The stream returned by [`Client::watch`]. It ends only after yielding an error that another
/// attempt cannot fix (an invalid token, a forbidden org, a malformed cursor).
pub type Watch = BoxStream<'static, Result<WatchItem, Error>>;

impl Client {
    /// Watches the org's events after `from` (a cursor), or live from now when `from` is `None`
    /// or empty.
    ///
    /// The stream never ends by itself on a broken connection, a restarting server or an expired
    /// token: it reconnects with backoff (to the next endpoint, unless only its token expired),
    /// re-fetches an expired token from a file or command source and resumes at once, always from
    /// the cursor of the last event it yielded. Durable events come exactly once, in seq order
    /// (any seq at or below the last one yielded is dropped); when the server cannot serve the
    /// cursor it yields [`ConnState::Resynced`] and the `resync` event, and the caller should
    /// reload its snapshot. It ends, after yielding the error, only on what retrying cannot fix:
    /// an invalid token, a forbidden org, a malformed cursor. A stream silent for longer than
    /// [`ClientConfig::idle_timeout`](super::ClientConfig::idle_timeout), or an open unanswered
    /// that long, is treated as broken: its server hangs, and the watch moves on.
    pub fn watch(&self, filter: WatchFilter, from: Option<String>) -> Watch {
        let watcher = Watcher::new(self.clone(), filter, from);
        Box::pin(stream::unfold(watcher, |mut w| async move {
            let item = w.next().await?;
            Some((item, w))
        }))
    }
}

/// The state of one watch.
struct Watcher {
    client: Client,
    filter: WatchFilter,
    backoff: Backoff,
    /// Where to resume: the cursor of the last event yielded that carried one.
    cursor: String,
    /// The seq of the last durable event yielded (0 after a resync).
    last_seq: u64,
    /// The token in use; `None` until first fetched.
    token: Option<Option<String>>,
    stream: Option<Streaming<Event>>,
    /// The endpoint of the open stream, or of the last attempt to open one.
    endpoint: usize,
    /// Wait before the next connection attempt.
    delay: Option<Duration>,
    /// Consecutive "token expired" failures: the first one reconnects at once.
    expired_in_a_row: u32,
    pending: VecDeque<WatchItem>,
    done: bool,
}

impl Watcher {
    fn new(client: Client, filter: WatchFilter, from: Option<String>) -> Self {
        Watcher {
            backoff: Backoff::new(client.inner.config.backoff),
            client,
            filter,
            cursor: from.unwrap_or_default(),
            last_seq: 0,
            token: None,
            stream: None,
            endpoint: 0,
            delay: None,
            expired_in_a_row: 0,
            pending: VecDeque::new(),
            done: false,
        }
    }

    async fn next(&mut self) -> Option<Result<WatchItem, Error>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(Ok(item));
            }
            if self.done {
                return None;
            }
            let outcome: Result<(), Error> = match self.stream.as_mut() {
                None => self.connect().await,
                Some(stream) => {
                    let idle = self.client.inner.config.idle_timeout;
                    match tokio::time::timeout(idle, stream.message()).await {
                        Ok(Ok(Some(ev))) => {
                            self.accept(ev);
                            Ok(())
                        }
                        Ok(Ok(None)) => {
                            Err(Status::unavailable("the server ended the stream").into())
                        }
                        Ok(Err(status)) => Err(status.into()),
                        Err(_) => Err(Status::deadline_exceeded(format!(
                            "no event or heartbeat for {idle:?}"
                        ))
                        .into()),
                    }
                }
            };
            if let Err(err) = outcome
                && let Err(fatal) = self.failed(err).await
            {
                self.done = true;
                return Some(Err(fatal));
            }
        }
    }

    /// One connection attempt (after the pending backoff delay).
    async fn connect(&mut self) -> Result<(), Error> {
        if let Some(delay) = self.delay.take() {
            tokio::time::sleep(delay).await;
        }
        let token = match &self.token {
            Some(t) => t.clone(),
            None => self.client.inner.tokens.get().await?,
        };
        let filter = OrgFilter {
            org_id: self.filter.org_id.clone(),
            kinds: self.filter.kinds.iter().map(|k| *k as i32).collect(),
            after_cursor: self.cursor.clone(),
            entity_types: self.filter.entity_types.clone(),
            topics: self.filter.topics.clone(),
        };
        let (idx, opened) = self.client.open_stream(filter, &token).await?;
        self.token = Some(token);
        self.endpoint = idx;
        self.stream = Some(opened?);
        let endpoint = self.client.endpoint(idx).to_string();
        self.pending
            .push_back(WatchItem::State(ConnState::Connected { endpoint }));
        Ok(())
    }

    /// Takes in an event from the stream: updates the resume position and queues it, unless it is
    /// a durable event already yielded.
    fn accept(&mut self, ev: Event) {
        // The stream delivered: the connection is healthy.
        self.backoff.reset();
        self.expired_in_a_row = 0;
        match &ev.payload {
            Some(Payload::Resync(r)) => {
                self.last_seq = 0;
                self.cursor = ev.cursor.clone();
                let reason = r.reason.clone();
                self.pending
                    .push_back(WatchItem::State(ConnState::Resynced { reason }));
            }
            Some(Payload::Heartbeat(_) | Payload::CaughtUp(_)) if !ev.cursor.is_empty() => {
                self.cursor = ev.cursor.clone();
            }
            _ if ev.seq > 0 => {
                if ev.seq <= self.last_seq {
                    return;
                }
                self.last_seq = ev.seq;
                self.cursor = ev.cursor.clone();
            }
            _ => {}
        }
        self.pending.push_back(WatchItem::Event(Box::new(ev)));
    }

    /// Decides what a failure means: a reconnect (queued `Reconnecting` state and delay) or the
    /// end of the watch (the returned error).
    async fn failed(&mut self, err: Error) -> Result<(), Error> {
        self.stream = None;
        let status = match err {
            // A token that expired but cannot be replaced is as good as an invalid one.
            Error::Status(s) if is_token_expired(&s) && !self.client.inner.tokens.renewable() => {
                return Err(Error::Status(s));
            }
            Error::Status(s) if is_resumable_stream(&s) => s,
            fatal => return Err(fatal),
        };
        let reason = match status.message() {
            "" => format!("{:?}", status.code()),
            m => m.to_string(),
        };
        // Whatever broke the stream or the attempt (a dead, hung or leaving server) the next
        // attempt goes to the next endpoint; only an expired token is the client's own doing.
        if !is_token_expired(&status) {
            self.client.rotate(self.endpoint);
        }
        let delay = if is_token_expired(&status) {
            self.expired_in_a_row += 1;
            let stale = self.token.take().flatten();
            match self.client.inner.tokens.refresh(&stale).await {
                Ok(fresh) => self.token = Some(fresh),
                // A token file in the middle of being rewritten: keep the stale one, retry later.
                Err(_) => self.token = Some(stale),
            }
            if self.expired_in_a_row == 1 {
                Duration::ZERO
            } else {
                self.backoff.next_delay()
            }
        } else {
            self.backoff.next_delay()
        };
        let attempt = self.backoff.attempts().max(1);
        self.pending
            .push_back(WatchItem::State(ConnState::Reconnecting {
                delay,
                attempt,
                reason,
            }));
        self.delay = Some(delay);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        client::ClientConfig,
        proto::{CaughtUp, Resync},
    };

    fn event(seq: u64, cursor: &str, payload: Option<Payload>) -> Event {
        Event {
            seq,
            cursor: cursor.into(),
            payload,
            ..Default::default()
        }
    }

    fn seqs(w: &mut Watcher) -> Vec<u64> {
        w.pending
            .drain(..)
            .filter_map(|i| match i {
                WatchItem::Event(e) => Some(e.seq),
                WatchItem::State(_) => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn repeated_seqs_are_dropped_until_a_resync() {
        let client = Client::new(ClientConfig::default()).unwrap();
        let mut w = Watcher::new(client, WatchFilter::default(), None);
        let job = || Some(Payload::JobDeleted(Default::default()));
        for (seq, cursor) in [(1, "c1"), (2, "c2"), (2, "c2"), (1, "c1"), (3, "c3")] {
            w.accept(event(seq, cursor, job()));
        }
        assert_eq!(seqs(&mut w), [1, 2, 3]);
        assert_eq!(w.cursor, "c3");
        w.accept(event(0, "c3", Some(Payload::CaughtUp(CaughtUp {}))));
        w.accept(event(0, "e1", Some(Payload::Resync(Resync::default()))));
        assert_eq!(w.cursor, "e1");
        assert!(
            w.pending
                .iter()
                .any(|i| matches!(i, WatchItem::State(ConnState::Resynced { .. })))
        );
        w.pending.clear();
        w.accept(event(1, "e1-1", job()));
        assert_eq!(seqs(&mut w), [1], "a new log starts again at 1");
    }
}
