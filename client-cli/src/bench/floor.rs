//! The `floor` scenario: the physical cost of one delivery on this kernel, to run beside `e`. No
//! server: a thread of the bench pinned like the server (--server-cpus) accepts e's number of
//! loopback TCP connections and, at e's rate, writes to each the bytes e's server sends for one
//! event (an HTTP/2 DATA frame holding a gRPC message holding a `job_updated` Event shaped like
//! e's), one `write` per connection and event; the readers run on this process's runtime like e's
//! subscribers, checking order and latency. Its CPU over the writing window per delivery is the
//! floor's `serverCpuUsPerDelivery`: what a server doing nothing but the unavoidable syscall would
//! spend.
use std::{
    io::Write,
    net::{SocketAddr, TcpStream},
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, Instant, SystemTime},
};

use bytes::{Buf, BufMut, BytesMut};
use futures::StreamExt;
use orgpulse::proto::{Event, Job, JobStatus, event::Payload};
use prost::Message;
use serde_json::{Value, json};
use tokio::{io::AsyncReadExt, net::TcpSocket, sync::oneshot};

use super::{
    BenchArgs, Shape, deliveries,
    histogram::Histogram,
    server::{self, Usage, fail},
    subscriber::{self, Tally, now_us},
    timed,
    writer::Published,
};
use crate::error::CliError;

/// The HTTP/2 frame header: 24-bit length, type, flags, stream id.
const FRAME_HEADER: usize = 9;
/// The gRPC message prefix: compressed flag, 32-bit length.
const GRPC_PREFIX: usize = 5;
/// HTTP/2 frame type DATA.
const DATA: u8 = 0;
/// The stream the frames are on (the first a client opens).
const STREAM_ID: u32 = 1;

/// What the writing thread did: its CPU seconds (all, and user space) over the writing window.
struct Written {
    cpu: (f64, f64),
    elapsed: Duration,
}

/// Runs the floor: connects `shape.subscribers` readers, writes `shape.events` rounds at
/// `shape.rate`, and reports like `e`.
pub async fn measure(args: &BenchArgs, shape: &Shape) -> Result<Value, CliError> {
    let listener = TcpSocket::new_v4()
        .and_then(|s| {
            s.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
            s.listen(4096)
        })
        .map_err(|e| fail(format!("listening on 127.0.0.1: {e}")))?;
    let addr = listener.local_addr().map_err(|e| fail(e.to_string()))?;
    let listener = listener.into_std().map_err(|e| fail(e.to_string()))?;
    listener
        .set_nonblocking(false)
        .map_err(|e| fail(e.to_string()))?;
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let (n, rounds, rate, org) = (
        shape.subscribers,
        shape.events,
        shape.rate,
        args.org.clone(),
    );
    let cpus = args.server_cpus.clone();
    let writing = std::thread::spawn(move || -> Result<Written, CliError> {
        server::pin_self(&cpus)?;
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            let (c, _) = listener
                .accept()
                .map_err(|e| fail(format!("accept: {e}")))?;
            c.set_nodelay(true).map_err(|e| fail(e.to_string()))?;
            conns.push(c);
        }
        go_rx
            .blocking_recv()
            .map_err(|_| fail("the floor's readers gave up"))?;
        Ok(write_rounds(&mut conns, rounds, rate, &org))
    });

    let tally = Tally::new();
    let client_cpu0 = server::self_cpu_s();
    let t_connect = Instant::now();
    let sources = args.source_addrs.unwrap_or(n.div_ceil(8_000)).max(1);
    let opened: Vec<Result<tokio::net::TcpStream, String>> = timed(args, async {
        Ok(futures::stream::iter(0..n)
            .map(|i| subscriber::tcp(addr, subscriber::source(i, sources)))
            .buffer_unordered(args.connect_concurrency.max(1))
            .collect()
            .await)
    })
    .await?;
    let connect_elapsed = t_connect.elapsed();
    let tasks: Vec<_> = opened
        .into_iter()
        .filter_map(|conn| conn.map_err(|e| tally.error(e)).ok())
        .map(|conn| tokio::spawn(read(conn, tally.clone())))
        .collect();
    let connected = tasks.len() as u64;
    let mut out = json!({
        "label": "floor",
        "server": "floor",
        "subscribers": n,
        "events": rounds,
        "rate": if rate > 0.0 { json!(rate) } else { json!("max") },
        "writers": 1,
        "connected": connected,
        "connectFailures": n as u64 - connected,
        "connectWallMs": connect_elapsed.as_millis() as u64,
        "sourceAddrs": sources,
    });
    tokio::time::sleep(shape.settle).await;
    let expected = rounds * connected;
    // Fewer connections than accepts wanted: the thread is still in accept(), and is left there.
    if connected == n as u64 {
        let t0 = now_us();
        let _ = go_tx.send(());
        let written = tokio::task::spawn_blocking(move || writing.join())
            .await
            .map_err(|e| fail(e.to_string()))?
            .map_err(|_| fail("the floor's writing thread panicked"))??;
        subscriber::wait_for(&tally, expected, args.stall, args.phase_timeout).await;
        let received = tally.received.load(Relaxed);
        let published = Published {
            writes: rounds,
            elapsed: written.elapsed,
            calls: Histogram::new(),
            timeline: Vec::new(),
        };
        let usage = |cpu_s| Usage {
            cpu_s,
            ..Usage::default()
        };
        let (cpu, user) = written.cpu;
        let (from, to) = (usage(0.0), usage(cpu));
        deliveries(&mut out, &published, t0, &tally, received, from, to);
        out["serverUserCpuUsPerDelivery"] = super::us_per(user, received);
        out["serverCpuUsPerEvent"] = super::us_per(cpu, rounds);
        out["frameBytes"] = frame(1, &args.org).len().into();
    }
    let received = tally.received.load(Relaxed);
    out["deliveriesExpected"] = expected.into();
    out["deliveriesReceived"] = received.into();
    out["lost"] = expected.saturating_sub(received).into();
    out["outOfOrder"] = tally.out_of_order.load(Relaxed).into();
    out["brokenStreams"] = tally.broken.load(Relaxed).into();
    out["clientCpuS"] = super::round2(server::self_cpu_s() - client_cpu0).into();
    if let Some(e) = tally.first_error.lock().unwrap().take() {
        out["firstError"] = e.into();
    }
    for t in tasks {
        t.abort();
    }
    Ok(out)
}

/// `rounds` rounds at `rate` (0: back to back), each writing round r's frame to every connection;
/// the calling thread's CPU over them. A failed write ends that connection (its reader reports
/// the loss).
fn write_rounds(conns: &mut Vec<TcpStream>, rounds: u64, rate: f64, org: &str) -> Written {
    let cpu0 = server::thread_cpu_s();
    let start = Instant::now();
    for r in 0..rounds {
        if rate > 0.0 {
            let due = start + Duration::from_secs_f64(r as f64 / rate);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        let frame = frame(r + 1, org);
        conns.retain_mut(|c| c.write_all(&frame).is_ok());
    }
    let cpu1 = server::thread_cpu_s();
    Written {
        cpu: (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1),
        elapsed: start.elapsed(),
    }
}

/// The DATA frame e's server sends for the `seq`-th update of e's writer job: the Event as the
/// server encodes it (cursor, seq, org, commit time, actor, the updated job), in a gRPC message.
fn frame(seq: u64, org: &str) -> Vec<u8> {
    let now = prost_types::Timestamp::from(SystemTime::now());
    let n = seq - 1;
    let event = Event {
        // A cursor is 16 bytes (epoch, seq) in unpadded URL-safe base64: 22 characters.
        cursor: format!("{:022}", seq),
        seq,
        org_id: org.into(),
        time: Some(now),
        actor: "writer0".into(),
        topics: vec![],
        payload: Some(Payload::JobUpdated(Job {
            // A ULID: 26 characters.
            id: format!("{:026}", 0),
            org_id: org.into(),
            title: "bench writer 0".into(),
            status: JobStatus::Queued as i32,
            progress: (n % 101) as u32,
            message: format!("bench update {n}"),
            created_by: "writer0".into(),
            updated_by: "writer0".into(),
            created_at: Some(now),
            updated_at: Some(now),
            version: seq + 1,
            ..Default::default()
        })),
    };
    let len = GRPC_PREFIX + event.encoded_len();
    let mut f = Vec::with_capacity(FRAME_HEADER + len);
    f.put_uint(len as u64, 3);
    f.put_u8(DATA);
    f.put_u8(0);
    f.put_u32(STREAM_ID);
    f.put_u8(0);
    f.put_u32(event.encoded_len() as u32);
    event.encode(&mut f).expect("sized buffer");
    f
}

/// Reads one connection's frames until it closes: each DATA frame's Event must be the next seq;
/// counted with its commit→receipt latency like a subscriber's.
async fn read(mut tcp: tokio::net::TcpStream, tally: Arc<Tally>) {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut last = 0;
    loop {
        while buf.len() >= FRAME_HEADER {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < FRAME_HEADER + len {
                break;
            }
            let kind = buf[3];
            buf.advance(FRAME_HEADER);
            let payload = buf.split_to(len);
            if kind != DATA || payload.len() < GRPC_PREFIX {
                continue;
            }
            let ev = match Event::decode(&payload[GRPC_PREFIX..]) {
                Ok(ev) => ev,
                Err(e) => return tally.error(format!("bad Event: {e}")),
            };
            let now = now_us();
            if ev.seq != last + 1 {
                tally.out_of_order.fetch_add(1, Relaxed);
            }
            last = ev.seq;
            if let Some(t) = &ev.time {
                let sent = subscriber::micros(t);
                tally
                    .latency
                    .lock()
                    .unwrap()
                    .record(now.saturating_sub(sent));
            }
            tally.last_us.fetch_max(now, Relaxed);
            tally.received.fetch_add(1, Relaxed);
        }
        match tcp.read_buf(&mut buf).await {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                tally.broken.fetch_add(1, Relaxed);
                return tally.error(format!("read: {e}"));
            }
        }
    }
}
