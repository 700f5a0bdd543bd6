//! The cluster engine's bus: NATS core pub/sub, one subject per org under the cluster's prefix
//! (`PREFIX.events.ORG`). A node subscribes to an org's subject while its Hub has a room for the
//! org and drops the subscription with the last room. Committed events are published after COMMIT
//! in a compact encoding (`encode` / `decode`); the publishing node hands them to its own Hub
//! directly (the connection is `no_echo`), so local delivery does not depend on NATS.
//!
//! NATS may lose (a slow consumer's overflow, an outage), duplicate (a reconnect's resend) or
//! reorder; the Hub repairs all of it from the Store. Nothing here ever waits on NATS in the
//! write path or in the reader: `publish` queues without blocking (a full queue drops, the tail
//! check finds the event), and the reader hands each message to the Hub, which never blocks.
//! async-nats reconnects by itself and re-sends its subscriptions on reconnect.
use std::{collections::HashMap, sync::Arc, time::Duration};

use async_nats::{Client, ConnectOptions, Event, connection::State};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::StreamExt;
use orgpulse::proto::EventKind;
use tokio::{sync::mpsc, task::JoinHandle};

use super::{Bus, Deliver};
use crate::{metrics::METRICS, store::CommittedEvent};

/// Events waiting to be handed to the NATS client; past this `publish` drops (the subscribers'
/// nodes find the event in the Store).
const OUTBOX: usize = 16 * 1024;
/// Messages one org subscription may have unread before async-nats drops (a slow consumer).
const SUBSCRIPTION_CAPACITY: usize = 64 * 1024;
/// The longest wait between two reconnect attempts while NATS is down.
const MAX_RECONNECT_DELAY: Duration = Duration::from_millis(500);
/// Version byte of the wire encoding.
const WIRE_V1: u8 = 1;

/// Connects to the NATS server at `url` (retrying in the background when it is down at start:
/// the node then runs degraded, from the Store, until it comes up).
pub async fn connect(url: &str, node_id: &str) -> anyhow::Result<Client> {
    let opts = ConnectOptions::new()
        .name(format!("orgpulse-{node_id}"))
        .no_echo()
        .retry_on_initial_connect()
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
        .reconnect_delay_callback(|attempt| {
            (Duration::from_millis(50) * attempt as u32).min(MAX_RECONNECT_DELAY)
        })
        .event_callback(|event| async move {
            match event {
                Event::Connected => tracing::info!("NATS connected"),
                Event::Disconnected => {
                    tracing::warn!("NATS disconnected; delivering from the store until it is back")
                }
                Event::SlowConsumer(_) => METRICS.bus_dropped.inc(),
                Event::ClientError(e) => tracing::debug!(error = %e, "NATS (while reconnecting)"),
                other => tracing::warn!(event = %other, "NATS"),
            }
        });
    opts.connect(url)
        .await
        .map_err(|e| anyhow::anyhow!("--nats {url}: {e}"))
}

/// Checks `--nats-subject-prefix`: dot-separated tokens without spaces or wildcards.
pub fn check_prefix(prefix: &str) -> anyhow::Result<()> {
    let valid = !prefix.is_empty()
        && prefix.split('.').all(|t| {
            !t.is_empty() && !t.contains(|c: char| c.is_whitespace() || c == '*' || c == '>')
        });
    anyhow::ensure!(
        valid,
        "--nats-subject-prefix {prefix:?}: expected dot-separated tokens without spaces, '*' or '>'"
    );
    Ok(())
}

/// The subject of `org`'s events: the org id itself when it is a safe subject token, else `~`
/// and its hex (`~` is not in the safe set, so the two forms never collide).
pub fn org_subject(prefix: &str, org: &str) -> String {
    let safe = !org.is_empty()
        && org
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if safe {
        format!("{prefix}.events.{org}")
    } else {
        let hex: String = org.bytes().map(|b| format!("{b:02x}")).collect();
        format!("{prefix}.events.~{hex}")
    }
}

/// `ev` on the wire: version, seq, kind, org, audience as stored (`u16::MAX` length: none; a
/// stored audience is under 12 KB), event bytes.
pub fn encode(ev: &CommittedEvent) -> Bytes {
    let audience = ev.stored_audience();
    let mut b = BytesMut::with_capacity(
        1 + 8
            + 4
            + 2
            + ev.org.len()
            + 2
            + audience.as_ref().map_or(0, String::len)
            + ev.bytes.len(),
    );
    b.put_u8(WIRE_V1);
    b.put_u64(ev.seq);
    b.put_i32(ev.kind as i32);
    b.put_u16(ev.org.len() as u16);
    b.put_slice(ev.org.as_bytes());
    match audience {
        Some(a) => {
            b.put_u16(a.len() as u16);
            b.put_slice(a.as_bytes());
        }
        None => b.put_u16(u16::MAX),
    }
    b.put_slice(&ev.bytes);
    b.freeze()
}

/// The event `encode` wrote, or `None` for anything else.
pub fn decode(mut b: Bytes) -> Option<CommittedEvent> {
    fn text(b: &mut Bytes, len: usize) -> Option<Arc<str>> {
        (b.remaining() >= len)
            .then(|| std::str::from_utf8(&b.split_to(len)).ok().map(Arc::from))
            .flatten()
    }
    if b.remaining() < 1 + 8 + 4 + 2 || b.get_u8() != WIRE_V1 {
        return None;
    }
    let seq = b.get_u64();
    let kind = EventKind::try_from(b.get_i32()).ok()?;
    let org_len = b.get_u16() as usize;
    let org = text(&mut b, org_len)?;
    if b.remaining() < 2 {
        return None;
    }
    let audience = match b.get_u16() {
        u16::MAX => None,
        len => Some(text(&mut b, len as usize)?),
    };
    CommittedEvent::from_log(org, seq, kind, audience.as_deref(), b).ok()
}

enum RoomChange {
    Opened(Arc<str>),
    Closed(Arc<str>),
}

pub struct NatsBus {
    client: Client,
    prefix: String,
    to: Arc<dyn Deliver>,
    outbox: mpsc::Sender<(String, Bytes)>,
    rooms: mpsc::UnboundedSender<RoomChange>,
}

impl NatsBus {
    /// A bus on `client` under `prefix` delivering to `to`, with its publisher and subscription
    /// tasks.
    pub fn new(client: Client, prefix: &str, to: Arc<dyn Deliver>) -> NatsBus {
        let (outbox, queued) = mpsc::channel(OUTBOX);
        let (rooms, changes) = mpsc::unbounded_channel();
        tokio::spawn(send_queued(client.clone(), queued));
        tokio::spawn(follow_rooms(
            client.clone(),
            prefix.to_string(),
            to.clone(),
            changes,
        ));
        NatsBus {
            client,
            prefix: prefix.to_string(),
            to,
            outbox,
            rooms,
        }
    }
}

impl Bus for NatsBus {
    fn publish(&self, ev: CommittedEvent) {
        METRICS.events_committed.inc();
        let message = (org_subject(&self.prefix, &ev.org), encode(&ev));
        if self.outbox.try_send(message).is_err() {
            METRICS.bus_dropped.inc();
        }
        self.to.deliver(ev);
    }

    fn lossy(&self) -> bool {
        true
    }

    fn room_opened(&self, org: &Arc<str>) {
        let _ = self.rooms.send(RoomChange::Opened(org.clone()));
    }

    fn room_closed(&self, org: &Arc<str>) {
        let _ = self.rooms.send(RoomChange::Closed(org.clone()));
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }
}

/// Hands queued events to the NATS client, in order (it buffers them while reconnecting).
async fn send_queued(client: Client, mut queued: mpsc::Receiver<(String, Bytes)>) {
    while let Some((subject, payload)) = queued.recv().await {
        if let Err(e) = client.publish(subject, payload).await {
            METRICS.bus_dropped.inc();
            tracing::debug!(error = %e, "NATS publish failed; the store has the event");
        }
    }
}

/// Keeps one subscription per org the Hub has a room for, applying room changes in order.
async fn follow_rooms(
    client: Client,
    prefix: String,
    to: Arc<dyn Deliver>,
    mut changes: mpsc::UnboundedReceiver<RoomChange>,
) {
    let mut readers: HashMap<Arc<str>, JoinHandle<()>> = HashMap::new();
    while let Some(change) = changes.recv().await {
        match change {
            RoomChange::Opened(org) => {
                let subject = org_subject(&prefix, &org);
                match client.subscribe(subject).await {
                    Ok(sub) => {
                        let reader = tokio::spawn(read_org(sub, to.clone()));
                        if let Some(old) = readers.insert(org.clone(), reader) {
                            old.abort();
                        }
                        // Events committed elsewhere before the server had the subscription
                        // came to nobody: look for them now rather than at the next tail check.
                        let (client, to) = (client.clone(), to.clone());
                        tokio::spawn(async move {
                            let _ = client.flush().await;
                            to.subscribed(&org);
                        });
                    }
                    Err(e) => {
                        tracing::warn!(org = %org, error = %e, "NATS subscribe failed; the tail check delivers this org")
                    }
                }
            }
            RoomChange::Closed(org) => {
                if let Some(reader) = readers.remove(&org) {
                    // Dropping the Subscriber unsubscribes.
                    reader.abort();
                }
            }
        }
    }
}

/// Hands each message of one org's subscription to the Hub (which never blocks).
async fn read_org(mut sub: async_nats::Subscriber, to: Arc<dyn Deliver>) {
    while let Some(msg) = sub.next().await {
        match decode(msg.payload) {
            Some(ev) => to.deliver(ev),
            None => {
                tracing::warn!(subject = %msg.subject, "ignoring a message that is not an orgpulse event")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audience::Audience;

    #[test]
    fn the_wire_encoding_round_trips() {
        let groups = Audience {
            user_ids: vec![],
            groups: vec!["project:42".into()],
            roles: vec!["admin".into()],
        };
        for audience in [None, Some(Audience::one_user("bob")), Some(groups)] {
            let ev = CommittedEvent {
                org: "acme".into(),
                seq: u64::MAX - 1,
                kind: EventKind::Notification,
                audience: audience.map(Arc::new),
                topics: Default::default(),
                entity_type: None,
                bytes: Bytes::from_static(b"\x00\x01event"),
            };
            let back = decode(encode(&ev)).expect("decodes");
            assert_eq!(
                (&*back.org, back.seq, back.kind, back.audience.as_deref()),
                (&*ev.org, ev.seq, ev.kind, ev.audience.as_deref())
            );
            assert_eq!(back.bytes, ev.bytes);
        }
        assert!(decode(Bytes::from_static(b"\x02garbage-of-some-length")).is_none());
        assert!(decode(Bytes::from_static(b"\x01")).is_none());
    }

    #[test]
    fn org_subjects_are_single_safe_tokens() {
        assert_eq!(org_subject("op", "acme-1_x"), "op.events.acme-1_x");
        assert_eq!(org_subject("op", "a.b"), "op.events.~612e62");
        assert_ne!(org_subject("op", "~612e62"), org_subject("op", "a.b"));
        assert!(check_prefix("orgpulse.test-1").is_ok());
        for bad in ["", "a..b", "a b", "a.*", ">"] {
            assert!(check_prefix(bad).is_err(), "{bad:?}");
        }
    }
}
