//! nginx and Caddy in front of orgpulse, each run from its snippet in README.md ("Behind nginx or
//! Caddy") as written: only the upstream address, the listen ports and Caddy's admin address are
//! replaced, each exactly where the snippet names them. Through the proxy, a grpc-web Subscribe
//! (HTTP/1.1, read incrementally) and a native gRPC Subscribe each get an event written after they
//! opened within 2 seconds (live, not buffered), stay open while idle past the 60 s read timeout
//! proxies default to, get the next event live again, and hold each durable event exactly once.
//!
//! Each proxy runs as a child process with its config, pid file, logs and temp paths in a temp dir,
//! on ephemeral ports. Under `CI=true` a missing nginx or caddy fails the test (`.ci/run` installs
//! both); elsewhere the test is skipped with the reason.
mod support;

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use bytes::BytesMut;
use futures::{Stream, StreamExt};
use orgpulse::proto::{Event, OrgFilter, event::Payload};
use prost::Message;
use support::{
    grpc_web::{frame, frames},
    *,
};
use tokio::{
    net::TcpStream,
    time::{Instant, timeout_at},
};
use tonic::transport::Endpoint;

/// A live event reaches the subscriber within this long after its write returned: far below any
/// buffer flush, and far above a local hop.
const LIVE: Duration = Duration::from_secs(2);

/// How long the streams stay idle: past nginx's default `proxy_read_timeout` and
/// `grpc_read_timeout` (60 s). The server's heartbeat interval is set above twice it (a stream's
/// heartbeat comes more than half an interval after its last message), so nothing flows meanwhile.
const IDLE: Duration = Duration::from_secs(62);
const HEARTBEAT: &str = "130s";

/// The snippet of README.md in its ```` ```info ```` fenced block (there must be exactly one).
fn readme_snippet(info: &str) -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("read README.md");
    let open = format!("```{info}\n");
    let blocks: Vec<&str> = readme.split(&open).skip(1).collect();
    assert_eq!(blocks.len(), 1, "README.md has one ```{info} block");
    let end = blocks[0].find("\n```").expect("the block is closed");
    format!("{}\n", &blocks[0][..end])
}

/// `text` with each `(from, to)` replaced; each `from` must occur exactly once, so the test
/// cannot drift from the snippet without failing.
fn substitute(text: &str, pairs: &[(&str, String)]) -> String {
    let mut out = text.to_string();
    for (from, to) in pairs {
        assert_eq!(out.matches(from).count(), 1, "{from:?} once in:\n{text}");
        out = out.replace(from, to);
    }
    out
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The proxy's binary, or None (after saying why) when it is missing outside CI.
fn proxy_binary(path: &str, package: &str) -> Option<PathBuf> {
    let bin = PathBuf::from(path);
    if bin.exists() {
        return Some(bin);
    }
    let missing = format!("{path} missing (apt-get install -y {package})");
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{missing}");
    eprintln!("skipping: {missing}");
    None
}

/// A running proxy: a grpc-web URL (HTTP/1.1) and a gRPC URL (HTTP/2 without TLS). Stopped with
/// `stop_signal` on drop and waited for; its log is printed when the test failed.
struct Proxy {
    child: Child,
    stop_signal: i32,
    log: PathBuf,
    web_url: String,
    grpc_url: String,
    _dir: TempDir,
}

impl Proxy {
    /// Runs `cmd` (stdout and stderr to `dir/proxy.log`) and waits until both ports accept.
    async fn spawn(
        mut cmd: Command,
        stop_signal: i32,
        dir: TempDir,
        web_port: u16,
        grpc_port: u16,
    ) -> Self {
        let log = dir.0.join("proxy.log");
        let out = std::fs::File::create(&log).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let mut proxy = Proxy {
            child: cmd.spawn().expect("start the proxy"),
            stop_signal,
            log,
            web_url: format!("http://127.0.0.1:{web_port}"),
            grpc_url: format!("http://127.0.0.1:{grpc_port}"),
            _dir: dir,
        };
        for port in [web_port, grpc_port] {
            proxy.listening(port).await;
        }
        proxy
    }

    /// Waits until `port` accepts connections; panics (with the log) if the proxy exits first.
    async fn listening(&mut self, port: u16) {
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the proxy exited ({status}) before listening on {port}");
            }
            assert!(
                Instant::now() < deadline,
                "the proxy is not listening on {port}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        unsafe_kill(self.child.id() as i32, self.stop_signal);
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("--- proxy log ({}):\n{log}", self.log.display());
        }
    }
}

/// nginx with README.md's snippet inside a minimal `nginx.conf` that only moves nginx's own
/// files (pid, logs, temp paths) into a temp dir.
async fn start_nginx(upstream: &str) -> Option<Proxy> {
    let bin = proxy_binary("/usr/sbin/nginx", "nginx")?;
    let dir = TempDir::new("nginx");
    let d = dir.0.display().to_string();
    let (web_port, grpc_port) = (free_port(), free_port());
    let snippet = substitute(
        &readme_snippet("nginx"),
        &[
            ("server 127.0.0.1:8080;", format!("server {upstream};")),
            ("listen 80;", format!("listen 127.0.0.1:{web_port};")),
            (
                "listen 50051 http2;",
                format!("listen 127.0.0.1:{grpc_port} http2;"),
            ),
        ],
    );
    std::fs::write(dir.0.join("orgpulse.conf"), snippet).unwrap();
    let main = format!(
        "pid {d}/nginx.pid;\n\
         error_log {d}/error.log info;\n\
         events {{}}\n\
         http {{\n\
         access_log {d}/access.log;\n\
         client_body_temp_path {d}/body;\n\
         proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n\
         uwsgi_temp_path {d}/uwsgi;\n\
         scgi_temp_path {d}/scgi;\n\
         include {d}/orgpulse.conf;\n\
         }}\n"
    );
    std::fs::write(dir.0.join("nginx.conf"), main).unwrap();
    let mut cmd = Command::new(bin);
    cmd.args(["-e", &format!("{d}/error.log"), "-p", &d]).args([
        "-c",
        &format!("{d}/nginx.conf"),
        "-g",
        "daemon off;",
    ]);
    // SIGTERM: nginx's fast shutdown, which ends its workers too (after a SIGKILL of the master
    // they would keep running).
    Some(Proxy::spawn(cmd, 15, dir, web_port, grpc_port).await)
}

/// Caddy with README.md's Caddyfile; its data and config dirs are in a temp dir. grpc-web and
/// gRPC share its one port.
async fn start_caddy(upstream: &str) -> Option<Proxy> {
    let bin = proxy_binary("/usr/bin/caddy", "caddy")?;
    let dir = TempDir::new("caddy");
    let (port, admin) = (free_port(), free_port());
    let caddyfile = substitute(
        &readme_snippet("caddyfile"),
        &[
            ("admin localhost:2019", format!("admin 127.0.0.1:{admin}")),
            ("\n:80 {", format!("\nhttp://127.0.0.1:{port} {{")),
            ("h2c://127.0.0.1:8080", format!("h2c://{upstream}")),
        ],
    );
    let file = dir.0.join("Caddyfile");
    std::fs::write(&file, caddyfile).unwrap();
    let mut cmd = Command::new(bin);
    cmd.args(["run", "--adapter", "caddyfile", "--config"])
        .arg(&file)
        .env("HOME", &dir.0)
        .env("XDG_DATA_HOME", dir.0.join("data"))
        .env("XDG_CONFIG_HOME", dir.0.join("config"));
    // SIGKILL: Caddy is one process, and on SIGTERM it waits for open connections to end, which
    // this thread (blocked in the drop) cannot end.
    Some(Proxy::spawn(cmd, 9, dir, port, port).await)
}

/// A grpc-web Subscribe over HTTP/1.1, its response body read frame by frame as it arrives.
struct WebSub {
    body: std::pin::Pin<Box<dyn Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: BytesMut,
    pending: std::collections::VecDeque<Vec<u8>>,
    seen: Vec<Event>,
}

impl WebSub {
    async fn open(url: &str, token: &str, filter: &OrgFilter) -> Self {
        let res = reqwest::Client::builder()
            .http1_only()
            .build()
            .unwrap()
            .post(format!("{url}/orgpulse.v1.EventService/Subscribe"))
            .header("content-type", "application/grpc-web+proto")
            .header("accept", "application/grpc-web+proto")
            .header("x-grpc-web", "1")
            .header("authorization", format!("Bearer {token}"))
            .body(frame(filter))
            .send()
            .await
            .expect("grpc-web Subscribe through the proxy");
        assert_eq!(res.version(), reqwest::Version::HTTP_11);
        assert!(res.status().is_success(), "{res:?}");
        WebSub {
            body: Box::pin(res.bytes_stream()),
            buf: BytesMut::new(),
            pending: Default::default(),
            seen: vec![],
        }
    }

    /// The next event, or a panic at `deadline`, at the end of the body or at a trailer.
    async fn next(&mut self, deadline: Instant) -> Event {
        while self.pending.is_empty() {
            let chunk = timeout_at(deadline, self.body.next())
                .await
                .expect("a grpc-web frame in time")
                .expect("the grpc-web response is still open")
                .expect("read the grpc-web response");
            self.buf.extend_from_slice(&chunk);
            for (trailer, data) in frames(&mut self.buf) {
                assert!(
                    !trailer,
                    "the stream ended: {}",
                    String::from_utf8_lossy(&data)
                );
                self.pending.push_back(data);
            }
        }
        let ev = Event::decode(&self.pending.pop_front().unwrap()[..]).unwrap();
        self.seen.push(ev.clone());
        ev
    }

    async fn until(&mut self, deadline: Instant, pred: impl Fn(&Event) -> bool) -> Event {
        loop {
            let ev = self.next(deadline).await;
            if pred(&ev) {
                return ev;
            }
        }
    }
}

/// The job stream (`kinds` = jobs) checked end to end through `proxy`.
async fn streams_live_through(server: &TestServer, proxy: &Proxy) {
    let t = token("acme", "alice", "member");
    let kinds = [1];
    let filter = OrgFilter {
        kinds: kinds.to_vec(),
        ..Default::default()
    };
    let mut web = WebSub::open(&proxy.web_url, &t, &filter).await;
    let channel = Endpoint::from_shared(proxy.grpc_url.clone())
        .unwrap()
        .connect()
        .await
        .expect("connect to the proxy's gRPC port");
    let mut grpc = Sub::open_on(channel, &t, "", "", &kinds)
        .await
        .expect("gRPC Subscribe through the proxy");
    let caught_up = |e: &Event| matches!(e.payload, Some(Payload::CaughtUp(_)));
    web.until(Instant::now() + WAIT, caught_up).await;
    grpc.caught_up().await;
    let mut jobs = jobs_at(proxy.grpc_url.clone(), &t).await;

    for round in ["fresh", "after idling"] {
        // A write now, and both streams have it within LIVE: no buffer held it back.
        let job = jobs
            .create_job(orgpulse::proto::CreateJobRequest {
                title: format!("through the proxy, {round}"),
                ..Default::default()
            })
            .await
            .expect("CreateJob through the proxy")
            .into_inner();
        let deadline = Instant::now() + LIVE;
        let is_job =
            |e: &Event| matches!(&e.payload, Some(Payload::JobCreated(j)) if j.id == job.id);
        web.until(deadline, is_job).await;
        timeout_at(deadline, grpc.until(is_job))
            .await
            .unwrap_or_else(|_| panic!("gRPC: the job {round} not live within {LIVE:?}"));
        if round == "fresh" {
            // Not synchronization: the idle time is what is being tested.
            tokio::time::sleep(IDLE).await;
        }
    }

    let log = log_of(&server.dir, "acme");
    let last = log.last().expect("the jobs are in the log").0;
    assert_exactly_once(&web.seen, &log, 1..=last, "alice", &kinds);
    assert_exactly_once(&grpc.seen, &log, 1..=last, "alice", &kinds);
}

#[tokio::test]
async fn nginx_snippet_streams_grpc_web_and_grpc_live() {
    let server = TestServer::start_args(&["--heartbeat-interval", HEARTBEAT]).await;
    let Some(proxy) = start_nginx(&server.addr).await else {
        return;
    };
    streams_live_through(&server, &proxy).await;
}

#[tokio::test]
async fn caddy_snippet_streams_grpc_web_and_grpc_live() {
    let server = TestServer::start_args(&["--heartbeat-interval", HEARTBEAT]).await;
    let Some(proxy) = start_caddy(&server.addr).await else {
        return;
    };
    streams_live_through(&server, &proxy).await;
}
