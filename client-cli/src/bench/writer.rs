//! The publishing side, through the public API with the client library, each writer on its own
//! connection at a fixed total rate or as fast as it goes: job updates (each writer updating its
//! own job), or broadcasts on one topic (each writer a user sending stamped data: its sequence
//! number and send time, read back by the subscribers for order and latency).
use std::{sync::Mutex, time::Duration};

use bytes::Buf;

use orgpulse::{
    client::{Client, ClientConfig, TokenSource},
    proto::{Audience, BroadcastRequest, CreateJobRequest, ListJobsRequest, UpdateJobRequest},
};
use prost::encoding::WireType;
use prost_types::{Struct, Value, value::Kind};
use tokio::time::Instant;

use super::{histogram::Histogram, subscriber::now_us};
use crate::error::CliError;

/// The topic of the presence scenario's broadcasts.
pub const BROADCAST_TOPIC: &str = "bench:presence";

/// The server's limit of broadcasts per second per user and node (API.md).
pub const BROADCASTS_PER_USER: f64 = 20.0;

/// The shortest gap between two broadcasts of one writer, even one catching up on its schedule:
/// 10 % above the rate limit's 1/20 s, so a late writer never bursts past the limit.
const MIN_BROADCAST_GAP: Duration = Duration::from_micros((1e6 / BROADCASTS_PER_USER * 1.1) as u64);

/// A writer's connection and what it sends.
pub struct Writer {
    client: Client,
    org: String,
    sends: Sends,
}

enum Sends {
    /// Updates of this job.
    Updates { job_id: String },
    /// Broadcasts on [`BROADCAST_TOPIC`] as this user.
    Broadcasts { user: String },
}

/// How a publishing run went.
pub struct Published {
    pub writes: u64,
    pub elapsed: Duration,
    /// How long each call took to return (empty when the events were not made by calls).
    pub calls: Histogram,
    /// When each call began, and how long it took (µs): to tell the calls of one phase apart.
    pub timeline: Vec<(std::time::Instant, u64)>,
}

/// A client of its own (own connection) for `url` with `token`.
pub fn client(url: &str, token: &str) -> Result<Client, CliError> {
    Ok(Client::new(ClientConfig {
        endpoints: vec![url.to_string()],
        token: TokenSource::Static(token.to_string()),
        ..ClientConfig::default()
    })?)
}

impl Writer {
    /// Connects and creates the job this writer will update (seen by `audience`, when given).
    pub async fn new(
        url: &str,
        token: &str,
        org: &str,
        n: usize,
        audience: Option<Audience>,
    ) -> Result<Writer, CliError> {
        let client = client(url, token)?;
        let job = client
            .create_job(CreateJobRequest {
                org_id: org.to_string(),
                title: format!("bench writer {n}"),
                audience,
                ..Default::default()
            })
            .await?;
        Ok(Writer {
            client,
            org: org.to_string(),
            sends: Sends::Updates { job_id: job.id },
        })
    }

    /// A writer broadcasting on [`BROADCAST_TOPIC`] as `user` (whose `token` this is).
    pub fn broadcaster(url: &str, token: &str, org: &str, user: &str) -> Result<Writer, CliError> {
        Ok(Writer {
            client: client(url, token)?,
            org: org.to_string(),
            sends: Sends::Broadcasts { user: user.into() },
        })
    }

    /// What the subscribers know this writer's events by: its job's id, or its user id.
    pub fn key(&self) -> &str {
        match &self.sends {
            Sends::Updates { job_id } => job_id,
            Sends::Broadcasts { user } => user,
        }
    }

    /// The org's log position now (ListJobs' snapshot cursor).
    pub async fn cursor(&self) -> Result<String, CliError> {
        Ok(self
            .client
            .list_jobs(ListJobsRequest {
                org_id: self.org.clone(),
                page_size: 1,
                ..Default::default()
            })
            .await?
            .cursor)
    }

    /// `count` updates or broadcasts, one at a time, the i-th not before `start + i / rate`
    /// (rate 0: at once), and a broadcast not before [`MIN_BROADCAST_GAP`] after the previous one;
    /// each call's start and duration go to `calls`.
    async fn run(
        &self,
        count: u64,
        rate: f64,
        start: Instant,
        calls: &Mutex<Vec<(std::time::Instant, u64)>>,
    ) -> Result<(), CliError> {
        let mut last = None;
        for i in 0..count {
            if rate > 0.0 {
                tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / rate)).await;
            }
            let call = Instant::now();
            match &self.sends {
                Sends::Updates { job_id } => {
                    self.client
                        .update_job(UpdateJobRequest {
                            org_id: self.org.clone(),
                            job_id: job_id.clone(),
                            progress: Some((i % 101) as u32),
                            message: Some(format!("bench update {i}")),
                            ..Default::default()
                        })
                        .await?;
                }
                Sends::Broadcasts { .. } => {
                    if let Some(last) = last {
                        tokio::time::sleep_until(last + MIN_BROADCAST_GAP).await;
                    }
                    last = Some(Instant::now());
                    self.client
                        .broadcast(BroadcastRequest {
                            org_id: self.org.clone(),
                            topic: BROADCAST_TOPIC.into(),
                            data: Some(stamp(i, now_us())),
                            audience: None,
                        })
                        .await?;
                }
            }
            let took = call.elapsed().as_micros() as u64;
            calls.lock().unwrap().push((call.into_std(), took));
        }
        Ok(())
    }
}

/// `total` updates split over `writers` running concurrently at `rate` per second in all (0 =
/// each as fast as it goes); returns when every one is committed.
pub async fn publish(writers: &[Writer], total: u64, rate: f64) -> Result<Published, CliError> {
    let n = writers.len();
    let start = Instant::now();
    let calls = Mutex::new(Vec::new());
    // Writer i starts i/rate after the first, so together they write evenly at `rate` rather
    // than all at once every n/rate.
    let offset = |i: usize| match rate > 0.0 {
        true => Duration::from_secs_f64(i as f64 / rate),
        false => Duration::ZERO,
    };
    let runs = writers.iter().enumerate().map(|(i, w)| {
        w.run(
            share(total, n, i),
            rate / n as f64,
            start + offset(i),
            &calls,
        )
    });
    futures::future::try_join_all(runs).await?;
    let timeline = calls.into_inner().unwrap();
    let mut calls = Histogram::new();
    timeline.iter().for_each(|(_, took)| calls.record(*took));
    Ok(Published {
        writes: total,
        elapsed: start.elapsed(),
        calls,
        timeline,
    })
}

/// How many of `total` updates writer `i` of `writers` makes.
pub fn share(total: u64, writers: usize, i: usize) -> u64 {
    let n = writers as u64;
    total / n + u64::from((i as u64) < total % n)
}

/// A broadcast's data: `{"n": i, "sentUs": µs since the epoch, "x": .., "y": ..}` (a cursor's
/// worth of payload besides the stamp).
fn stamp(n: u64, sent_us: u64) -> Struct {
    let number = |v: u64| Value {
        kind: Some(Kind::NumberValue(v as f64)),
    };
    Struct {
        fields: [
            ("n", number(n)),
            ("sentUs", number(sent_us)),
            ("x", number(n * 7 % 1920)),
            ("y", number(n * 13 % 1080)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    }
}

/// A received broadcast `Event` as a subscriber reads it: in place, without copying, allocating
/// or counting a reference (at a million deliveries a second, the bench's one core cannot afford
/// the full decode, whose `Struct` data alone is a map of owned strings). Only the fields below
/// are read (event.proto's tags); every other one is skipped, and a malformed message is an error.
#[derive(Debug, PartialEq)]
pub struct StampedEvent<'a> {
    /// `Event.time` in µs since the epoch: when the server fanned the broadcast out.
    pub time_us: Option<u64>,
    /// `Event.broadcast`, None for any other event.
    pub broadcast: Option<Stamped<'a>>,
}

/// A `BroadcastMessage`'s sender and the (n, sentUs) stamp of its data, if it has one.
#[derive(Debug, PartialEq)]
pub struct Stamped<'a> {
    pub user_id: &'a [u8],
    pub stamp: Option<(u64, u64)>,
}

impl<'a> StampedEvent<'a> {
    pub fn read(msg: &'a [u8]) -> Result<StampedEvent<'a>, String> {
        let mut ev = StampedEvent {
            time_us: None,
            broadcast: None,
        };
        each_field(msg, |tag, wire, buf| match (tag, wire) {
            // Event.time: Timestamp { int64 seconds = 1; int32 nanos = 2; }
            (4, WireType::LengthDelimited) => {
                ev.time_us = Some(timestamp_us(sub_message(buf)?)?);
                Ok(())
            }
            (21, WireType::LengthDelimited) => {
                ev.broadcast = Some(Stamped::read(sub_message(buf)?)?);
                Ok(())
            }
            _ => skip(wire, tag, buf),
        })?;
        Ok(ev)
    }
}

impl<'a> Stamped<'a> {
    /// `BroadcastMessage { string user_id = 1; string topic = 2; Struct data = 3; }`
    fn read(msg: &'a [u8]) -> Result<Stamped<'a>, String> {
        let mut user_id = &[][..];
        let (mut n, mut sent) = (None, None);
        each_field(msg, |tag, wire, buf| match (tag, wire) {
            (1, WireType::LengthDelimited) => {
                user_id = sub_message(buf)?;
                Ok(())
            }
            // Struct { map<string, Value> fields = 1; }: a repeated entry { key = 1; value = 2; }
            // Once the stamp is read, the other entries (the payload's) are left unread: a
            // Struct's entries come sorted by key, "n" and "sentUs" first.
            (3, WireType::LengthDelimited) => {
                let mut entries = sub_message(buf)?;
                while !entries.is_empty() && (n.is_none() || sent.is_none()) {
                    let (tag, wire) = key(&mut entries)?;
                    if (tag, wire) != (1, WireType::LengthDelimited) {
                        skip(wire, tag, &mut entries)?;
                        continue;
                    }
                    let (key, value) = map_entry(sub_message(&mut entries)?)?;
                    match key {
                        b"n" => n = value,
                        b"sentUs" => sent = value,
                        _ => {}
                    }
                }
                Ok(())
            }
            _ => skip(wire, tag, buf),
        })?;
        Ok(Stamped {
            user_id,
            stamp: n.zip(sent),
        })
    }
}

/// A `Struct` entry's key, and its value when that is a number (`Value.number_value`, tag 2).
#[inline]
fn map_entry(msg: &[u8]) -> Result<(&[u8], Option<u64>), String> {
    let (mut key, mut number) = (&[][..], None);
    each_field(msg, |tag, wire, buf| match (tag, wire) {
        (1, WireType::LengthDelimited) => {
            key = sub_message(buf)?;
            Ok(())
        }
        (2, WireType::LengthDelimited) => {
            each_field(sub_message(buf)?, |tag, wire, buf| match (tag, wire) {
                (2, WireType::SixtyFourBit) => {
                    number = Some(buf.get_f64_le() as u64);
                    Ok(())
                }
                _ => skip(wire, tag, buf),
            })
        }
        _ => skip(wire, tag, buf),
    })?;
    Ok((key, number))
}

/// What a subscriber counting job updates reads of an `Event`, without decoding it (no
/// allocation per delivery: at 100,000 subscribers the bench's one core is the receiving end):
/// its seq, its time, and the job's id when it is a `job_updated`.
#[derive(Debug, PartialEq)]
pub struct JobEvent<'a> {
    pub seq: u64,
    /// `Event.time` in µs since the epoch: when the update was committed.
    pub time_us: Option<u64>,
    /// `Event.job_updated.id`, None for any other event.
    pub updated: Option<&'a [u8]>,
}

impl<'a> JobEvent<'a> {
    pub fn read(msg: &'a [u8]) -> Result<JobEvent<'a>, String> {
        let mut ev = JobEvent {
            seq: 0,
            time_us: None,
            updated: None,
        };
        each_field(msg, |tag, wire, buf| match (tag, wire) {
            (2, WireType::Varint) => {
                ev.seq = varint(buf)?;
                Ok(())
            }
            (4, WireType::LengthDelimited) => {
                ev.time_us = Some(timestamp_us(sub_message(buf)?)?);
                Ok(())
            }
            // Job { string id = 1; ... }
            (11, WireType::LengthDelimited) => {
                let mut id = &[][..];
                each_field(sub_message(buf)?, |tag, wire, buf| match (tag, wire) {
                    (1, WireType::LengthDelimited) => {
                        id = sub_message(buf)?;
                        Ok(())
                    }
                    _ => skip(wire, tag, buf),
                })?;
                ev.updated = Some(id);
                Ok(())
            }
            _ => skip(wire, tag, buf),
        })?;
        Ok(ev)
    }
}

/// A `Timestamp { int64 seconds = 1; int32 nanos = 2; }` in µs since the epoch.
#[inline]
fn timestamp_us(msg: &[u8]) -> Result<u64, String> {
    let (mut seconds, mut nanos) = (0, 0);
    each_field(msg, |tag, wire, buf| match (tag, wire) {
        (1, WireType::Varint) => {
            seconds = varint(buf)?;
            Ok(())
        }
        (2, WireType::Varint) => {
            nanos = varint(buf)?;
            Ok(())
        }
        _ => skip(wire, tag, buf),
    })?;
    Ok(seconds * 1_000_000 + nanos / 1000)
}

/// Calls `field` with each field's tag and wire type and the bytes from its value on, which it
/// must consume (read or skip). This and the readers below are always inlined, their errors made
/// out of line: at a million messages a second, a call and a stack frame per field showed as a
/// tenth of the bench's CPU.
#[inline(always)]
fn each_field<'a>(
    mut msg: &'a [u8],
    mut field: impl FnMut(u32, WireType, &mut &'a [u8]) -> Result<(), String>,
) -> Result<(), String> {
    while !msg.is_empty() {
        let (tag, wire) = key(&mut msg)?;
        if wire == WireType::SixtyFourBit && msg.len() < 8 {
            return Err(malformed(format_args!("buffer underflow")));
        }
        field(tag, wire, &mut msg)?;
    }
    Ok(())
}

/// A field's key (tag and wire type), taken off the front of `buf`.
#[inline(always)]
fn key(buf: &mut &[u8]) -> Result<(u32, WireType), String> {
    let key = varint(buf)?;
    let tag = key >> 3;
    let wire = match key & 7 {
        0 => WireType::Varint,
        1 => WireType::SixtyFourBit,
        2 => WireType::LengthDelimited,
        3 => WireType::StartGroup,
        4 => WireType::EndGroup,
        5 => WireType::ThirtyTwoBit,
        _ => return Err(malformed(format_args!("invalid field key {key}"))),
    };
    if tag == 0 || tag > u64::from(u32::MAX >> 3) {
        return Err(malformed(format_args!("invalid field key {key}")));
    }
    Ok((tag as u32, wire))
}

/// A length-delimited value (a string or a message), taken off the front of `buf`.
#[inline(always)]
fn sub_message<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], String> {
    let len = varint(buf)? as usize;
    if len > buf.len() {
        return Err(malformed(format_args!("buffer underflow")));
    }
    let (value, rest) = buf.split_at(len);
    *buf = rest;
    Ok(value)
}

/// A varint, taken off the front of `buf` (read here rather than through prost's `Buf`-generic
/// decoder: the bench reads a few million of them a second).
#[inline(always)]
fn varint(buf: &mut &[u8]) -> Result<u64, String> {
    // Most are one byte (a field key of a tag below 16, a short length): no loop for those.
    if let Some(&b) = buf.first()
        && b < 0x80
    {
        *buf = &buf[1..];
        return Ok(u64::from(b));
    }
    let mut value = 0u64;
    for (i, &b) in buf.iter().take(10).enumerate() {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            if i == 9 && b > 1 {
                break;
            }
            *buf = &buf[i + 1..];
            return Ok(value);
        }
    }
    Err(malformed(format_args!("invalid varint")))
}

/// A malformed message's error, made out of line (see [`each_field`]).
#[cold]
fn malformed(what: std::fmt::Arguments) -> String {
    what.to_string()
}

/// Skips a field whose key was read.
#[inline(always)]
fn skip(wire: WireType, tag: u32, buf: &mut &[u8]) -> Result<(), String> {
    let width = match wire {
        WireType::Varint => return varint(buf).map(drop),
        WireType::LengthDelimited => return sub_message(buf).map(drop),
        WireType::SixtyFourBit => 8,
        WireType::ThirtyTwoBit => 4,
        WireType::StartGroup | WireType::EndGroup => {
            return Err(malformed(format_args!(
                "field {tag}: groups are not used in orgpulse's messages"
            )));
        }
    };
    if buf.len() < width {
        return Err(malformed(format_args!("buffer underflow")));
    }
    *buf = &buf[width..];
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use orgpulse::proto::{BroadcastMessage, Event, event::Payload};
    use prost::Message;

    /// A broadcast `Event` as the server encodes it.
    fn event(data: Struct) -> Vec<u8> {
        Event {
            org_id: "o".into(),
            time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5_000,
            }),
            actor: "sub7".into(),
            topics: vec![BROADCAST_TOPIC.into()],
            payload: Some(Payload::Broadcast(BroadcastMessage {
                user_id: "sub7".into(),
                topic: BROADCAST_TOPIC.into(),
                data: Some(data),
            })),
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn stamps_read_back_from_the_event() {
        let sent = now_us();
        let msg = event(stamp(41, sent));
        let read = StampedEvent::read(&msg).unwrap();
        assert_eq!(read.time_us, Some(1_700_000_000_000_005));
        let broadcast = read.broadcast.unwrap();
        assert_eq!(broadcast.user_id, b"sub7");
        assert_eq!(broadcast.stamp, Some((41, sent)));
        let unstamped = event(Struct::default());
        assert_eq!(
            StampedEvent::read(&unstamped)
                .unwrap()
                .broadcast
                .unwrap()
                .stamp,
            None
        );
    }

    #[test]
    fn varints_read_as_prost_writes_them_and_bad_ones_are_errors() {
        for v in [0u64, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut bytes = Vec::new();
            prost::encoding::encode_varint(v, &mut bytes);
            bytes.push(0xAA);
            let mut rest = &bytes[..];
            assert_eq!(varint(&mut rest), Ok(v));
            assert_eq!(rest, [0xAA]);
        }
        assert!(varint(&mut &[0x80u8; 11][..]).is_err(), "too long");
        assert!(
            varint(&mut &[0xFFu8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x02][..])
                .is_err(),
            "past 64 bits"
        );
        assert!(varint(&mut &[0x80u8][..]).is_err(), "cut");
    }

    #[test]
    fn a_job_update_reads_back_without_a_decode() {
        use orgpulse::proto::Job;
        let update = Event {
            seq: 42,
            time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5_000,
            }),
            payload: Some(Payload::JobUpdated(Job {
                id: "job7".into(),
                title: "t".into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        let msg = update.encode_to_vec();
        let read = JobEvent::read(&msg).unwrap();
        assert_eq!(
            read,
            JobEvent {
                seq: 42,
                time_us: Some(1_700_000_000_000_005),
                updated: Some(&b"job7"[..]),
            }
        );
        let heartbeat = Event {
            payload: Some(Payload::Heartbeat(Default::default())),
            ..Default::default()
        };
        assert_eq!(
            JobEvent::read(&heartbeat.encode_to_vec()).unwrap().updated,
            None
        );
        assert!(JobEvent::read(&msg[..msg.len() - 1]).is_err());
    }

    #[test]
    fn a_cut_message_is_an_error() {
        let msg = event(stamp(41, now_us()));
        for len in [1, msg.len() / 2, msg.len() - 1] {
            assert!(
                StampedEvent::read(&msg[..len]).is_err(),
                "{len} of {} bytes",
                msg.len()
            );
        }
    }

    #[test]
    fn other_events_have_no_broadcast() {
        let heartbeat = Event {
            payload: Some(Payload::Heartbeat(Default::default())),
            ..Default::default()
        };
        let msg = heartbeat.encode_to_vec();
        assert_eq!(StampedEvent::read(&msg).unwrap().broadcast, None);
    }
}
