//! The one port: grpc-web over HTTP/1.1 (binary and -text, streamed incrementally), CORS
//! preflights, gRPC health, server reflection, /healthz and /metrics, and graceful shutdown.
mod support;

use std::time::Duration;

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use bytes::BytesMut;
use futures::StreamExt;
use orgpulse::proto::{Event, ListJobsRequest, ListJobsResponse, OrgFilter, event::Payload};
use prost::Message;
use support::{
    grpc_web::{frame, frames},
    *,
};
use tonic::Code;

/// A grpc-web call over HTTP/1.1; `text` selects application/grpc-web-text.
async fn grpc_web(
    url: &str,
    path: &str,
    token: &str,
    body: Vec<u8>,
    text: bool,
) -> reqwest::Response {
    let (ct, body) = if text {
        ("application/grpc-web-text", B64.encode(body).into_bytes())
    } else {
        ("application/grpc-web+proto", body)
    };
    let res = reqwest::Client::builder()
        .http1_only()
        .build()
        .unwrap()
        .post(format!("{url}{path}"))
        .header("content-type", ct)
        .header("accept", ct)
        .header("x-grpc-web", "1")
        .header("authorization", format!("Bearer {token}"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.version(), reqwest::Version::HTTP_11);
    assert!(res.status().is_success(), "{res:?}");
    res
}

/// Decodes a response body chunk stream into frames, handling -text's base64 (which may be split
/// across chunks at any point).
struct FrameReader {
    text: bool,
    pending_text: Vec<u8>,
    buf: BytesMut,
}

impl FrameReader {
    fn push(&mut self, chunk: &[u8]) -> Vec<(bool, Vec<u8>)> {
        if self.text {
            self.pending_text.extend_from_slice(chunk);
            // decode whole base64 quanta; each server chunk is padded on its own
            while let Some(end) = quantum_end(&self.pending_text) {
                let q: Vec<u8> = self.pending_text.drain(..end).collect();
                self.buf.extend(B64.decode(q).expect("base64"));
            }
        } else {
            self.buf.extend_from_slice(chunk);
        }
        frames(&mut self.buf)
    }
}

/// The length of the longest prefix made of complete base64 groups ending at a padded group or
/// covering whole 4-char groups.
fn quantum_end(s: &[u8]) -> Option<usize> {
    let mut i = 0;
    let mut end = None;
    while i + 4 <= s.len() {
        i += 4;
        end = Some(i);
        if s[i - 1] == b'=' {
            break;
        }
    }
    end
}

async fn web_subscribe_is_incremental(text: bool) {
    let server = TestServer::start().await;
    let t = token("acme", "alice", "member");
    // unary
    let res = grpc_web(
        &server.url,
        "/orgpulse.v1.JobService/ListJobs",
        &t,
        frame(&ListJobsRequest::default()),
        text,
    )
    .await;
    let body = res.bytes().await.unwrap();
    let mut r = FrameReader {
        text,
        pending_text: vec![],
        buf: BytesMut::new(),
    };
    let got = r.push(&body);
    let list = ListJobsResponse::decode(&got[0].1[..]).unwrap();
    assert!(!list.cursor.is_empty());
    assert!(got.last().unwrap().0, "trailer frame");
    assert!(String::from_utf8_lossy(&got.last().unwrap().1).contains("grpc-status:0"));
    // streaming: caught_up arrives before any write, then each write arrives while the response
    // is still open.
    let res = grpc_web(
        &server.url,
        "/orgpulse.v1.EventService/Subscribe",
        &t,
        frame(&OrgFilter {
            kinds: vec![1],
            ..Default::default()
        }),
        text,
    )
    .await;
    let mut body = res.bytes_stream();
    let mut r = FrameReader {
        text,
        pending_text: vec![],
        buf: BytesMut::new(),
    };
    let mut next_event = async || -> Event {
        loop {
            let chunk = tokio::time::timeout(WAIT, body.next())
                .await
                .expect("chunk in time")
                .expect("open")
                .unwrap();
            if let Some((trailer, data)) = r.push(&chunk).into_iter().next() {
                assert!(
                    !trailer,
                    "stream ended early: {}",
                    String::from_utf8_lossy(&data)
                );
                return Event::decode(&data[..]).unwrap();
            }
        }
    };
    assert!(matches!(
        next_event().await.payload,
        Some(Payload::CaughtUp(_))
    ));
    for i in 0..3 {
        let job = create_job(&server, &t, "", &format!("web {i}")).await;
        let ev = next_event().await;
        assert!(
            matches!(&ev.payload, Some(Payload::JobCreated(j)) if j.id == job.id),
            "{ev:?}"
        );
    }
}

#[tokio::test]
async fn grpc_web_binary_unary_and_incremental_stream() {
    web_subscribe_is_incremental(false).await;
}

#[tokio::test]
async fn grpc_web_text_unary_and_incremental_stream() {
    web_subscribe_is_incremental(true).await;
}

/// The `orgpulse-error: token-expired` marker reaches grpc-web clients: in the headers of a call
/// refused for an expired token, and in the trailer frame of a stream that ended at `exp`.
#[tokio::test]
async fn grpc_web_sees_the_token_expired_marker() {
    let server = TestServer::start().await;
    let expired = mint_claims(&Claims {
        sub: "alice".into(),
        org: Some("acme".into()),
        roles: vec!["member".into()],
        exp: now_secs() - 10,
        nbf: None,
    });
    let list = frame(&ListJobsRequest::default());
    let path = "/orgpulse.v1.JobService/ListJobs";
    let res = grpc_web(&server.url, path, &expired, list, false).await;
    assert_eq!(res.headers()["grpc-status"], "16", "{res:?}");
    assert_eq!(res.headers()["orgpulse-error"], "token-expired", "{res:?}");
    let short = token_ttl("acme", "alice", "member", 1);
    let subscribe = frame(&OrgFilter::default());
    let path = "/orgpulse.v1.EventService/Subscribe";
    let mut body = grpc_web(&server.url, path, &short, subscribe, false)
        .await
        .bytes_stream();
    let mut r = FrameReader {
        text: false,
        pending_text: vec![],
        buf: BytesMut::new(),
    };
    let trailer = loop {
        let chunk = tokio::time::timeout(WAIT, body.next())
            .await
            .expect("chunk in time")
            .expect("the stream ends with a trailer frame")
            .unwrap();
        if let Some((_, data)) = r.push(&chunk).into_iter().find(|(trailer, _)| *trailer) {
            break String::from_utf8_lossy(&data).to_lowercase();
        }
    };
    assert!(trailer.contains("grpc-status:16"), "{trailer}");
    assert!(
        trailer.contains("orgpulse-error:token-expired"),
        "{trailer}"
    );
}

#[tokio::test]
async fn cors_preflight_allows_configured_origin_only() {
    let server = TestServer::start_args(&["--cors-origin", "http://app.example"]).await;
    let client = reqwest::Client::new();
    let preflight = |origin: &'static str| {
        client
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/orgpulse.v1.JobService/ListJobs", server.url),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type,x-grpc-web,x-user-agent,grpc-timeout",
            )
            .send()
    };
    let ok = preflight("http://app.example").await.unwrap();
    let h = ok.headers();
    assert_eq!(
        h.get("access-control-allow-origin").unwrap(),
        "http://app.example"
    );
    let allowed = h
        .get("access-control-allow-headers")
        .unwrap()
        .to_str()
        .unwrap()
        .to_lowercase();
    for name in [
        "authorization",
        "content-type",
        "x-grpc-web",
        "x-user-agent",
        "grpc-timeout",
    ] {
        assert!(allowed.contains(name), "{allowed}");
    }
    let bad = preflight("http://evil.example").await.unwrap();
    assert!(
        bad.headers().get("access-control-allow-origin").is_none(),
        "{:?}",
        bad.headers()
    );
    // A real call from the allowed origin exposes the grpc status headers.
    let res = reqwest::Client::new()
        .post(format!("{}/orgpulse.v1.JobService/ListJobs", server.url))
        .header("origin", "http://app.example")
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(frame(&ListJobsRequest::default()))
        .send()
        .await
        .unwrap();
    let exposed = res
        .headers()
        .get("access-control-expose-headers")
        .unwrap()
        .to_str()
        .unwrap()
        .to_lowercase();
    for name in [
        "grpc-status",
        "grpc-message",
        "grpc-status-details-bin",
        "orgpulse-error",
    ] {
        assert!(exposed.contains(name), "{exposed}");
    }
    // Plain HTTP still works next to grpc-web.
    let health = reqwest::get(format!("{}/healthz", server.url))
        .await
        .unwrap();
    assert_eq!(health.text().await.unwrap().trim(), "ok");
    let page = reqwest::get(format!("{}/", server.url)).await.unwrap();
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let metrics = get_text(&server, "/metrics").await;
    for m in [
        "orgpulse_open_streams",
        "orgpulse_waiting_polls",
        "orgpulse_runtime_global_queue_depth",
        "orgpulse_events_committed_total",
        "orgpulse_events_delivered_total",
        "orgpulse_slow_subscriber_disconnects_total",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ] {
        assert!(metrics.contains(m), "{m} missing from /metrics");
    }
}

/// One reflection request, its one answer.
async fn ask(
    client: &mut tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient<
        tonic::transport::Channel,
    >,
    request: tonic_reflection::pb::v1::server_reflection_request::MessageRequest,
) -> tonic_reflection::pb::v1::ServerReflectionResponse {
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut stream = client
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap()
}

#[tokio::test]
async fn reflection_and_health_work_without_proto_files() {
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let server = TestServer::start().await;
    let mut client = ServerReflectionClient::new(server.channel().await);
    let res = ask(&mut client, MessageRequest::ListServices(String::new())).await;
    let Some(MessageResponse::ListServicesResponse(list)) = res.message_response else {
        panic!("{res:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "orgpulse.v1.JobService",
        "orgpulse.v1.NotificationService",
        "orgpulse.v1.EventService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    let res = ask(
        &mut client,
        MessageRequest::FileContainingSymbol("orgpulse.v1.EventService".into()),
    )
    .await;
    assert!(
        matches!(
            res.message_response,
            Some(MessageResponse::FileDescriptorResponse(_))
        ),
        "{res:?}"
    );
    assert_eq!(grpc_health(&server).await, SERVING);
}

/// `grpc.health.v1.HealthCheckResponse.status` values.
const SERVING: i32 = 1;
const NOT_SERVING: i32 = 2;

/// grpc.health.v1 `Check` of the whole server over the raw path (empty request): its status.
async fn grpc_health(server: &TestServer) -> i32 {
    let res = reqwest::Client::new()
        .post(format!("{}/grpc.health.v1.Health/Check", server.url))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(vec![0u8, 0, 0, 0, 0])
        .send()
        .await
        .unwrap();
    let body = res.bytes().await.unwrap();
    let mut buf = BytesMut::from(&body[..]);
    let f = frames(&mut buf);
    let status = &f[0].1;
    assert_eq!(status.len(), 2, "one varint field: {status:?}");
    status[1].into()
}

/// `/healthz` as (HTTP status, body).
async fn healthz(server: &TestServer) -> (u16, String) {
    let res = reqwest::get(format!("{}/healthz", server.url))
        .await
        .unwrap();
    (res.status().as_u16(), res.text().await.unwrap())
}

/// Waits (up to 10 s) until both health answers are `want` (SERVING or NOT_SERVING); returns the
/// `/healthz` body.
async fn health_becomes(server: &TestServer, want: i32) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = healthz(server).await;
        let grpc = grpc_health(server).await;
        let http_ok = code == 200;
        if http_ok == (want == SERVING) && grpc == want {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "health stayed /healthz {code} {body:?}, grpc {grpc}; wanted {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn health_reports_not_serving_while_the_store_cannot_write_and_recovers() {
    let server = TestServer::start_args(&["--sqlite-busy-timeout", "100ms"]).await;
    let admin = token("o1", "ada", "admin");
    create_job(&server, &admin, "", "before").await;
    assert_eq!(healthz(&server).await, (200, "ok\n".into()));
    assert_eq!(grpc_health(&server).await, SERVING);
    // Another process takes the database's write lock and keeps it (SQLite), or the database
    // goes away (PostgreSQL).
    let outage = StoreOutage::start(&server.dir);
    let err = server
        .jobs(&admin)
        .await
        .create_job(orgpulse::proto::CreateJobRequest {
            title: "while locked".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let why = health_becomes(&server, NOT_SERVING).await;
    assert!(why.contains("store cannot write"), "{why:?}");
    // Released: both answers recover without a write of ours, and writes work again.
    drop(outage);
    assert_eq!(health_becomes(&server, SERVING).await, "ok\n");
    create_job(&server, &admin, "", "after").await;
    let titles: Vec<String> = server
        .jobs(&admin)
        .await
        .list_jobs(ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs
        .into_iter()
        .map(|j| j.title)
        .collect();
    assert_eq!(
        titles,
        ["after", "before"],
        "the refused write left nothing"
    );
}

#[tokio::test]
async fn sigterm_ends_100_streams_with_unavailable_and_exits_fast() {
    let mut server = TestServer::start().await;
    let t = token("acme", "alice", "viewer");
    let channel = server.channel().await;
    let mut subs = vec![];
    for _ in 0..100 {
        let mut s = Sub::open_on(channel.clone(), &t, "", "", &[])
            .await
            .unwrap();
        s.caught_up().await;
        subs.push(s);
    }
    let took = server.terminate().await;
    let status = server.child.try_wait().unwrap().expect("exited");
    assert!(status.success(), "clean exit: {status:?}");
    assert!(took < Duration::from_secs(2), "exit took {took:?}");
    for s in &mut subs {
        let err = s.error().await;
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    }
}
