//! The server's door against strangers without a token (docs/api.md "Limits before
//! authentication"): partial request bodies hold no memory, sockets that never send a request
//! head are closed within 10 s, a flood of them under a 1,024 descriptor limit does not keep a
//! real client out, a request body must be complete within 30 s, the bodies being received share
//! one budget, and malformed grpc-web frames are counted but not logged one line each. All over
//! real sockets against the real server binary; the raw HTTP/2 streams come from the h2 crate.
mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use support::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// The largest request message the server takes (docs/api.md: 1 MiB).
const MIB: usize = 1 << 20;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// One value of `/metrics`.
async fn metric(server: &TestServer, name: &str) -> u64 {
    let text = get_text(server, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
        .parse()
        .unwrap()
}

/// An HTTP/2 connection of the h2 crate (no gRPC library in between).
async fn h2_connection(addr: &str) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// The head of a native gRPC call to `path`, with `token` when given.
fn grpc_head(addr: &str, path: &str, token: Option<&str>) -> http::Request<()> {
    let mut req = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    req.body(()).unwrap()
}

/// The start of a gRPC message announced as `len` bytes long, with `sent` of them: a body that
/// is never finished.
fn partial_message(len: usize, sent: usize) -> Bytes {
    let mut body = vec![0u8];
    body.extend((len as u32).to_be_bytes());
    body.resize(5 + sent, b'x');
    body.into()
}

/// The gRPC status of a response: in its headers (trailers-only) or its trailers.
async fn grpc_status(res: h2::client::ResponseFuture) -> (i32, String) {
    let res = res.await.expect("a response");
    let from = |h: &http::HeaderMap| {
        let code = h.get("grpc-status")?.to_str().ok()?.parse().ok()?;
        let message = h
            .get("grpc-message")
            .map(|m| m.to_str().unwrap().to_string())
            .unwrap_or_default();
        Some((code, message))
    };
    if let Some(status) = from(res.headers()) {
        return status;
    }
    let mut body = res.into_body();
    while let Some(data) = body.data().await {
        data.expect("body");
    }
    let trailers = body.trailers().await.expect("trailers").expect("trailers");
    from(&trailers).expect("grpc-status in the trailers")
}

/// A real call (CreateJob over a fresh tonic channel) and how long it took.
async fn real_call(server: &TestServer) -> Duration {
    let t0 = Instant::now();
    create_job(server, &token("acme", "alice", "member"), "", "real").await;
    t0.elapsed()
}

#[tokio::test]
async fn unauthenticated_partial_bodies_hold_no_memory_and_real_calls_go_on() {
    let server = TestServer::start().await;
    real_call(&server).await;
    let pid = server.pid();
    let baseline = rss(pid);
    let limit = baseline + 100 * MIB as u64;
    // On a server that buffers such bodies the attack would take gigabytes: it stops as soon as
    // the server holds the +100 MiB this test allows.
    let over = Arc::new(AtomicBool::new(false));
    let monitor = tokio::spawn({
        let over = over.clone();
        async move {
            let mut peak = 0;
            while !over.load(Relaxed) {
                peak = peak.max(rss(pid));
                if peak > limit {
                    over.store(true, Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            peak
        }
    });
    let body = partial_message(MIB - 64, MIB - 64 * 1024);
    let mut attackers = Vec::new();
    for _ in 0..10 {
        let (addr, body, over) = (server.addr.clone(), body.clone(), over.clone());
        attackers.push(tokio::spawn(async move {
            let mut send = h2_connection(&addr).await;
            let mut held = Vec::new();
            // As many streams as the server lets one connection open (at most the 1,000 it
            // allowed before), each sending most of a 1 MiB message and never finishing it.
            for _ in 0..1000 {
                if over.load(Relaxed) {
                    break;
                }
                match tokio::time::timeout(Duration::from_secs(1), send.clone().ready()).await {
                    Ok(Ok(ready)) => send = ready,
                    _ => break,
                }
                let head = grpc_head(&addr, "/orgpulse.v1.JobService/CreateJob", None);
                let Ok((res, mut stream)) = send.send_request(head, false) else {
                    break;
                };
                let _ = stream.send_data(body.clone(), false);
                held.push((res, stream));
            }
            held
        }));
    }
    let mut held = Vec::new();
    for a in attackers {
        held.extend(a.await.unwrap());
    }
    // Give the server the time to take in whatever the client could send (or to grow past the
    // limit: then the test fails at once, its runtime closing the attack's connections).
    let grown = async {
        while !over.load(Relaxed) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(3), grown).await;
    let took = real_call(&server).await;
    over.store(true, Relaxed);
    let peak = monitor.await.unwrap();
    assert!(
        peak <= limit,
        "the server grew by {} MiB under {} unauthenticated partial bodies",
        (peak - baseline) >> 20,
        held.len()
    );
    assert!(took < Duration::from_secs(1), "a real call took {took:?}");
    eprintln!(
        "{} partial bodies: server RSS {} -> {} MiB at most; a real call took {took:?}",
        held.len(),
        baseline >> 20,
        peak >> 20
    );
    // The first stream of a connection (the later ones may be refused before the client knew
    // the server's stream limit).
    let (code, message) = grpc_status(held.swap_remove(0).0).await;
    assert_eq!(code, tonic::Code::Unauthenticated as i32, "{message}");
    assert!(message.contains("missing%20authorization"), "{message}");
    assert!(metric(&server, "orgpulse_unauthenticated_refusals_total").await >= 1000);
}

/// Opens a socket that sends `first` and then nothing, and measures when the server closes it.
async fn closed_after(addr: String, first: &'static [u8]) -> Option<Duration> {
    let t0 = Instant::now();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(first).await.unwrap();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(Duration::from_secs(15), async {
        // The server may answer a bad head before it closes; the close is what counts.
        while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await
    .ok()
    .map(|()| t0.elapsed())
}

#[tokio::test]
async fn idle_and_half_preface_sockets_are_closed_within_10_to_12_s() {
    let server = TestServer::start().await;
    // A client that sent its preface in time keeps its connection past the 10 s.
    let early = server.jobs(&token("acme", "alice", "member")).await;
    let openings: [&'static [u8]; 4] = [
        b"",
        &H2_PREFACE[..16],
        b"GET /healthz HTTP/1.1\r\nhost: x\r\n",
        b"POST /orgpulse.v1.EventService/ListOnline HTTP/1.1\r\n",
    ];
    let mut sockets = Vec::new();
    let mut closes = Vec::new();
    for first in openings {
        for _ in 0..10 {
            sockets.push((
                first,
                tokio::spawn(closed_after(server.addr.clone(), first)),
            ));
        }
    }
    for (first, socket) in sockets {
        let after = socket.await.unwrap();
        let after = after.unwrap_or_else(|| {
            panic!(
                "a socket that sent {:?} was still open after 15 s",
                String::from_utf8_lossy(first)
            )
        });
        assert!(
            after >= Duration::from_millis(9500) && after <= Duration::from_secs(12),
            "a socket that sent {:?} was closed after {after:?}",
            String::from_utf8_lossy(first)
        );
        closes.push(after);
    }
    eprintln!(
        "40 sockets without a request head closed after {:?} to {:?}",
        closes.iter().min().unwrap(),
        closes.iter().max().unwrap()
    );
    let mut early = early;
    early
        .list_jobs(orgpulse::proto::ListJobsRequest::default())
        .await
        .expect("a connection past its preface stays open");
    assert_eq!(
        metric(&server, "orgpulse_connections_head_timeouts_total").await,
        40
    );
}

#[tokio::test]
async fn under_a_1024_descriptor_limit_1100_idle_sockets_do_not_keep_real_calls_out() {
    // This process holds the 1,100 sockets too.
    rlimit::increase_nofile_limit(4096).unwrap();
    assert!(rlimit::Resource::NOFILE.get().unwrap().0 >= 1200);
    let server = TestServer::start_with(ServerOpts {
        open_files: Some(1024),
        capture_stderr: true,
        ..Default::default()
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..1100 {
        idle.push(TcpStream::connect(&server.addr).await.unwrap());
    }
    let took = tokio::time::timeout(Duration::from_secs(5), real_call(&server))
        .await
        .expect("a real call is served while 1,100 idle sockets are open");
    assert!(took < Duration::from_secs(2), "{took:?}");
    let max = metric(&server, "orgpulse_max_connections").await;
    assert!((512..1024).contains(&max), "max connections {max}");
    // Every idle socket past the cap, the real call and this metrics request each evicted one.
    let evicted = metric(&server, "orgpulse_connections_evicted_total").await;
    assert!(evicted >= 1100 - max, "{evicted} evicted, cap {max}");
    assert_eq!(metric(&server, "orgpulse_accept_errors_total").await, 0);
    eprintln!(
        "1,024 descriptors, 1,100 idle sockets: a real call took {took:?}; \
         cap {max} connections, {evicted} evicted"
    );
    drop(idle);
    let mut server = server;
    let logs = server.stop_and_read_stderr().await;
    assert!(!logs.contains("accept failed"), "{logs}");
}

#[tokio::test]
async fn at_capacity_with_every_connection_served_a_new_one_is_closed_at_accept() {
    let server = TestServer::start_args(&["--max-connections", "20"]).await;
    let mut served = Vec::new();
    // The preface and an empty SETTINGS frame.
    let opening = [H2_PREFACE, &[0, 0, 0, 4, 0, 0, 0, 0, 0]].concat();
    for _ in 0..20 {
        let mut tcp = TcpStream::connect(&server.addr).await.unwrap();
        tcp.write_all(&opening).await.unwrap();
        served.push(tcp);
    }
    // The server has read a preface when it acknowledged the SETTINGS after it (its own SETTINGS
    // may come before it reads anything).
    for tcp in &mut served {
        loop {
            let mut head = [0u8; 9];
            tcp.read_exact(&mut head).await.unwrap();
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            tcp.read_exact(&mut payload).await.unwrap();
            if head[3] == 4 && head[4] & 1 == 1 {
                break;
            }
        }
    }
    let t0 = Instant::now();
    let mut late = TcpStream::connect(&server.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), late.read(&mut buf))
        .await
        .expect("closed at accept, not left waiting");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert!(t0.elapsed() < Duration::from_secs(2));
    served.pop();
    // The freed place lets /metrics in.
    let text = loop {
        if let Ok(res) = reqwest::get(format!("{}/metrics", server.url)).await {
            break res.text().await.unwrap();
        }
    };
    assert!(
        !text.contains("\norgpulse_connections_refused_total 0\n"),
        "{text}"
    );
    assert!(
        text.contains("\norgpulse_connections_evicted_total 0\n"),
        "{text}"
    );
}

#[tokio::test]
async fn a_request_body_not_complete_in_30_s_is_refused() {
    let server = TestServer::start().await;
    let alice = token("acme", "alice", "member");
    let mut send = h2_connection(&server.addr).await.ready().await.unwrap();
    let t0 = Instant::now();
    let (res, mut stream) = send
        .send_request(
            grpc_head(
                &server.addr,
                "/orgpulse.v1.JobService/CreateJob",
                Some(&alice),
            ),
            false,
        )
        .unwrap();
    stream.send_data(partial_message(1000, 10), false).unwrap();
    let (code, message) = tokio::time::timeout(Duration::from_secs(40), grpc_status(res))
        .await
        .expect("refused within 40 s");
    let after = t0.elapsed();
    assert_eq!(code, tonic::Code::DeadlineExceeded as i32, "{message}");
    assert!(
        after >= Duration::from_secs(29) && after < Duration::from_secs(33),
        "refused after {after:?}"
    );
    assert_eq!(
        metric(&server, "orgpulse_request_body_timeouts_total").await,
        1
    );
    // The connection and the server go on.
    real_call(&server).await;
}

#[tokio::test]
async fn bodies_being_received_share_the_request_buffer() {
    let server = TestServer::start_args(&["--max-request-buffer", "1MiB"]).await;
    let alice = token("acme", "alice", "member");
    let path = "/orgpulse.v1.JobService/CreateJob";
    let mut send = h2_connection(&server.addr).await.ready().await.unwrap();
    // Two bodies of half the budget each, both unfinished, fill it ...
    let mut open = Vec::new();
    for _ in 0..2 {
        let (res, mut stream) = send
            .send_request(grpc_head(&server.addr, path, Some(&alice)), false)
            .unwrap();
        stream
            .send_data(partial_message(MIB - 64, MIB / 2 - 5), false)
            .unwrap();
        open.push((res, stream));
        send = send.ready().await.unwrap();
    }
    // ... so that a new call is refused (once the server has taken both bodies in).
    let full = async {
        loop {
            let mut jobs = server.jobs(&alice).await;
            let call = jobs.list_jobs(orgpulse::proto::ListJobsRequest::default());
            match call.await {
                Err(s) if s.code() == tonic::Code::ResourceExhausted => return s,
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    };
    let refused = tokio::time::timeout(WAIT, full).await.expect("budget full");
    assert!(
        refused.message().contains("--max-request-buffer"),
        "{refused:?}"
    );
    // Raw HTTP/2 the same.
    let (res, mut stream) = send
        .send_request(grpc_head(&server.addr, path, Some(&alice)), false)
        .unwrap();
    let _ = stream.send_data(partial_message(100_000, 50_000), false);
    let (code, _) = grpc_status(res).await;
    assert_eq!(code, tonic::Code::ResourceExhausted as i32);
    // The unfinished bodies are given back when their streams end: calls pass again.
    drop(open);
    tokio::time::timeout(WAIT, async {
        loop {
            let mut jobs = server.jobs(&alice).await;
            if jobs
                .list_jobs(orgpulse::proto::ListJobsRequest::default())
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the budget is released");
}

/// A grpc-web request of HTTP/1.1 with a body that is not a grpc-web message stream.
async fn malformed_grpc_web(server: &TestServer, i: usize) -> reqwest::Response {
    let (content_type, body): (_, &[u8]) = match i % 3 {
        // A compression flag that is not 0 or 1.
        0 => ("application/grpc-web+proto", b"\x40\x00\x00\x00\x02ab"),
        // A message shorter than its announced length.
        1 => ("application/grpc-web+proto", b"\x00\x00\x00\x00\x10ab"),
        // Not base64.
        _ => ("application/grpc-web-text", b"!!!not base64!!!"),
    };
    reqwest::Client::builder()
        .http1_only()
        .build()
        .unwrap()
        .post(format!(
            "{}/orgpulse.v1.EventService/ListOnline",
            server.url
        ))
        .header("content-type", content_type)
        .header("x-grpc-web", "1")
        .header(
            "authorization",
            format!("Bearer {}", token("acme", "alice", "member")),
        )
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn malformed_grpc_web_frames_are_counted_and_logged_at_most_once_a_second() {
    let mut server = TestServer::start_with(ServerOpts {
        capture_stderr: true,
        ..Default::default()
    })
    .await;
    let t0 = Instant::now();
    for i in 0..100 {
        let res = malformed_grpc_web(&server, i).await;
        assert_eq!(
            res.headers()["grpc-status"],
            (tonic::Code::InvalidArgument as i32).to_string().as_str(),
            "{res:?}"
        );
    }
    let seconds = t0.elapsed().as_secs();
    assert_eq!(
        metric(&server, "orgpulse_malformed_requests_total").await,
        100
    );
    let logs = server.stop_and_read_stderr().await;
    let lines = logs
        .lines()
        .filter(|l| l.contains("malformed request") || l.contains("rpc failed"))
        .count() as u64;
    assert!(
        (1..=seconds + 2).contains(&lines),
        "{lines} log lines for 100 malformed frames in {seconds} s:\n{logs}"
    );
}

#[tokio::test]
async fn a_new_connections_burst_of_streams_waits_its_turn_while_a_subscriber_gets_every_event() {
    const BURST: usize = 100;
    let server = TestServer::start().await;
    let alice = token("acme", "alice", "member");
    let mut sub = Sub::open(&server, &alice, "acme", "", &[]).await.unwrap();
    sub.caught_up().await;
    // A hundred calls at once on one new connection, each refused once it is its turn (no token).
    let mut conn = h2_connection(&server.addr).await;
    let mut answers = Vec::new();
    for _ in 0..BURST {
        conn = conn.ready().await.unwrap();
        let head = grpc_head(&server.addr, "/orgpulse.v1.EventService/ListOnline", None);
        let (res, mut body) = conn.send_request(head, false).unwrap();
        body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)
            .unwrap();
        answers.push(grpc_status(res));
    }
    let writes = async {
        for i in 0..20 {
            create_job(&server, &alice, "acme", &format!("during the burst {i}")).await;
        }
    };
    let (answers, ()) = tokio::time::timeout(WAIT, async {
        tokio::join!(futures::future::join_all(answers), writes)
    })
    .await
    .expect("the burst and the writes are served");
    assert!(answers.iter().all(|(code, _)| *code == 16), "{answers:?}");
    // They came faster than the gate's first pace lets in: some waited their turn.
    let delayed = metric(&server, "orgpulse_admission_delayed_total").await;
    assert!(delayed > 0, "{delayed} waited at the gate");
    assert_eq!(metric(&server, "orgpulse_admission_waiting").await, 0);
    let got = sub.durable(20).await;
    assert_exactly_once(&got, &log_of(&server.dir, "acme"), 1..=20, "alice", &[]);
    eprintln!(
        "{BURST} streams at once on a new connection: {delayed} waited at the admission gate"
    );
}

/// A call to `path` for each of `tokens`, at once on one new connection, each with `message` as
/// its body in a DATA frame of its own and an empty one that ends it, as gRPC clients send them.
async fn burst_of_calls(
    addr: &str,
    path: &str,
    tokens: &[String],
    message: &Bytes,
) -> Vec<h2::client::ResponseFuture> {
    let n = tokens.len();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut conn, connection) = h2::client::Builder::new()
        .initial_max_send_streams(n)
        // Answers' small DATA frames wait in this client until read: its budget allows them.
        .data_frame_budget(n * 256)
        .handshake(tcp)
        .await
        .unwrap();
    let mut answers = Vec::new();
    for token in tokens {
        conn = conn.ready().await.unwrap();
        let (res, mut body) = conn
            .send_request(grpc_head(addr, path, Some(token)), false)
            .unwrap();
        body.send_data(message.clone(), false).unwrap();
        body.send_data(Bytes::new(), true).unwrap();
        answers.push(res);
    }
    // Every call's frames are queued: they go out together, faster than the gate lets them in.
    tokio::spawn(connection);
    answers
}

/// Thousands of calls at once on one new connection (a server that allows them), each with a
/// small body, behind a storm of streams on another: they wait their turn at the gate with their
/// bodies unread, and every one is answered. (HTTP/2's guard against floods of small DATA frames
/// once counted those waiting bodies as a flood and closed the connection: vendor/h2's
/// PATCH.md.)
#[tokio::test]
async fn thousands_of_waiting_calls_with_small_bodies_on_one_new_connection_are_all_answered() {
    // What one connection may hold: more small bodies than the guard allowed before.
    const BURST: usize = 4_900;
    let server = TestServer::start_args(&[
        "--max-concurrent-streams",
        "5000",
        "--max-streams-per-user",
        "5000",
    ])
    .await;
    let alice = vec![token("acme", "alice", "member"); BURST];
    // OrgFilter and ListOnlineRequest alike: org "acme" (field 1, 4 bytes).
    let message = Bytes::from_static(&[0, 0, 0, 0, 6, 0x0a, 4, b'a', b'c', b'm', b'e']);
    let subscribe = "/orgpulse.v1.EventService/Subscribe";
    let storm = burst_of_calls(&server.addr, subscribe, &alice, &message).await;
    let list_online = "/orgpulse.v1.EventService/ListOnline";
    let calls = burst_of_calls(&server.addr, list_online, &alice, &message).await;
    let answers = tokio::time::timeout(
        WAIT,
        futures::future::join_all(calls.into_iter().map(grpc_status)),
    )
    .await
    .expect("the burst is answered");
    let ok = answers.iter().filter(|(code, _)| *code == 0).count();
    assert_eq!(ok, BURST, "{:?}", answers.iter().find(|a| a.0 != 0));
    // The storm's streams are open too: each has its response head, and no error in it.
    let heads = tokio::time::timeout(WAIT, futures::future::join_all(storm))
        .await
        .expect("the storm's streams are open");
    for head in heads {
        let head = head.expect("a stream's response head");
        assert!(head.headers().get("grpc-status").is_none(), "{head:?}");
    }
    let delayed = metric(&server, "orgpulse_admission_delayed_total").await;
    eprintln!(
        "{BURST} streams, then {BURST} calls with bodies, at once on two new connections: \
         {delayed} waited at the gate, all answered"
    );
}
