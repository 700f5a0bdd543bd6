//! Test support shared by the end-to-end tests: starts the real `orgpulse-server` binary on an
//! ephemeral port with a fresh store and HS256 secret, mints tokens, and opens gRPC clients.
//!
//! The store is a SQLite file in the server's data directory, or with
//! `ORGPULSE_TEST_STORE=postgres` a fresh PostgreSQL database `orgpulse_test_<random>` on the
//! server at `ORGPULSE_TEST_POSTGRES` (default the local one), named in the data directory (so a
//! restart on the same directory keeps the data) and dropped with it. The same suite runs on both.
#![allow(dead_code)]

pub mod browser;
pub mod grpc_web;
pub mod keys;
pub mod pg;
pub mod readme;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use orgpulse::proto::{
    event_service_client::EventServiceClient, job_service_client::JobServiceClient,
    notification_service_client::NotificationServiceClient,
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};
use tonic::{
    metadata::MetadataValue,
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint},
};

pub const SECRET: &str = "e2e-test-secret-0123456789abcdef";

/// Path of a binary built by this workspace. `cargo test --workspace` builds them before any test
/// runs because their packages have integration tests of their own (`server/tests`,
/// `client-cli/tests`); `ORGPULSE_SERVER_BIN` / `ORGPULSE_BIN` override the path.
pub fn workspace_bin(name: &str) -> PathBuf {
    let var = format!("{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Ok(p) = std::env::var(&var) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} not built at {}; run the tests with `cargo test --workspace` or set {var}",
        name,
        bin.display()
    );
    bin
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let n: u64 = rand::random();
        let p = std::env::temp_dir().join(format!("orgpulse-{tag}-{}-{n:x}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(url) = recorded_database(&self.0) {
            drop_database(&url);
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The file in a data directory that names its PostgreSQL database.
const DATABASE_URL_FILE: &str = "database-url";

/// Whether this run's servers use PostgreSQL (`ORGPULSE_TEST_STORE=postgres`) or SQLite (unset or
/// `sqlite`).
pub fn on_postgres() -> bool {
    match std::env::var("ORGPULSE_TEST_STORE").as_deref() {
        Err(_) | Ok("") | Ok("sqlite") => false,
        Ok("postgres") => true,
        Ok(other) => panic!("ORGPULSE_TEST_STORE={other:?}: expected sqlite or postgres"),
    }
}

/// For a test that only makes sense on SQLite: true (after saying why it is skipped) on PostgreSQL.
pub fn skip_on_postgres(why: &str) -> bool {
    let skip = on_postgres();
    if skip {
        eprintln!("skipped with ORGPULSE_TEST_STORE=postgres: {why}");
    }
    skip
}

/// For a test of the PostgreSQL store alone: true (after saying why it is skipped) on SQLite.
pub fn skip_unless_postgres() -> bool {
    let skip = !on_postgres();
    if skip {
        eprintln!(
            "skipped: a test of the PostgreSQL store; run it with ORGPULSE_TEST_STORE=postgres"
        );
    }
    skip
}

/// A self-signed certificate for `localhost` and 127.0.0.1 (made by `openssl`) and its key, in
/// `dir`: `(cert.pem, key.pem)`. Servers use it with `--tls-cert`; clients trust it as a root.
pub fn self_signed_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let ok = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl")
        .success();
    assert!(ok, "openssl made no certificate");
    (cert, key)
}

/// The `--database` of the data directory `dir`: its SQLite file, or on PostgreSQL its database,
/// created on first use.
pub fn database_url(dir: &Path) -> String {
    if let Some(url) = recorded_database(dir) {
        return url;
    }
    if !on_postgres() {
        return format!("sqlite://{}", dir.join("orgpulse.db").display());
    }
    new_postgres_database(dir)
}

/// Creates a fresh PostgreSQL database for the data directory `dir` (whatever
/// `ORGPULSE_TEST_STORE` says) and records it there: servers started on `dir`, or on a directory
/// given the same record with `share_database`, use it.
pub fn new_postgres_database(dir: &Path) -> String {
    let name = format!("orgpulse_test_{:016x}", rand::random::<u64>());
    let admin = admin_url();
    let create = format!("CREATE DATABASE {name}");
    on_admin_connection(move |c| async move { c.batch_execute(&create).await });
    let url = with_database(&admin, &name);
    std::fs::write(dir.join(DATABASE_URL_FILE), &url).unwrap();
    url
}

/// `url` with database `name` in place of its own (query options kept).
fn with_database(url: &str, name: &str) -> String {
    let (base, tail) = url.rsplit_once('/').expect("URL with a database");
    match tail.split_once('?') {
        Some((_, query)) => format!("{base}/{name}?{query}"),
        None => format!("{base}/{name}"),
    }
}

/// The PostgreSQL server tests create their databases on (its `test` database).
fn admin_url() -> String {
    std::env::var("ORGPULSE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Records the PostgreSQL database `url` (made by someone else) for `dir`: `log_of` reads it and
/// dropping the `TempDir` drops it.
pub fn record_database(dir: &Path, url: &str) {
    std::fs::write(dir.join(DATABASE_URL_FILE), url).unwrap();
}

/// Makes servers started on `other` use the database recorded for `dir` (cluster nodes).
pub fn share_database(dir: &Path, other: &Path) {
    std::fs::copy(dir.join(DATABASE_URL_FILE), other.join(DATABASE_URL_FILE)).unwrap();
}

/// Makes the connections of servers started on `dir` show as `name` in `pg_stat_activity`.
pub fn name_connections(dir: &Path, name: &str) {
    let url = recorded_database(dir).expect("a data directory with a PostgreSQL database");
    let sep = if url.contains('?') { '&' } else { '?' };
    std::fs::write(
        dir.join(DATABASE_URL_FILE),
        format!("{url}{sep}application_name={name}"),
    )
    .unwrap();
}

fn recorded_database(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join(DATABASE_URL_FILE)).ok()
}

/// The name of the PostgreSQL database of data directory `dir`.
fn database_name(dir: &Path) -> String {
    let url = recorded_database(dir).expect("a data directory with a PostgreSQL database");
    name_in(&url)
}

fn name_in(url: &str) -> String {
    let name = url.rsplit_once('/').expect("URL with a database").1;
    name.split('?').next().unwrap_or(name).to_string()
}

fn drop_database(url: &str) {
    let name = name_in(url);
    on_admin_connection(move |c| async move {
        c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
    });
}

/// Runs `f` on a connection to the database `url`, on a thread of its own (callable from sync and
/// async code alike); panics when the database cannot be reached.
fn on_connection<T, F, Fut>(url: String, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce(tokio_postgres::Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
{
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "ORGPULSE_TEST_STORE=postgres, but PostgreSQL at {url} is unreachable: {e}"
                    )
                });
            tokio::spawn(conn);
            f(client)
                .await
                .unwrap_or_else(|e| panic!("PostgreSQL at {url}: {e}"))
        })
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Runs `f` on a connection to the PostgreSQL database of data directory `dir`.
pub fn on_database<T, F, Fut>(dir: &Path, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce(tokio_postgres::Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
{
    on_connection(
        recorded_database(dir).expect("a data directory with a PostgreSQL database"),
        f,
    )
}

/// Makes the store of a server's data directory unable to write until dropped. SQLite: another
/// connection holds the file's write lock. PostgreSQL: the database refuses new connections and
/// the server's are ended (so reads fail too).
pub enum StoreOutage {
    Sqlite(rusqlite::Connection),
    Postgres(String),
}

impl StoreOutage {
    pub fn start(dir: &Path) -> StoreOutage {
        if !on_postgres() {
            let lock = rusqlite::Connection::open(dir.join("orgpulse.db")).unwrap();
            lock.execute_batch("BEGIN IMMEDIATE").unwrap();
            return StoreOutage::Sqlite(lock);
        }
        let name = database_name(dir);
        set_connections(&name, false);
        StoreOutage::Postgres(name)
    }
}

impl Drop for StoreOutage {
    fn drop(&mut self) {
        match self {
            StoreOutage::Sqlite(lock) => lock.execute_batch("ROLLBACK").unwrap(),
            StoreOutage::Postgres(name) => set_connections(name, true),
        }
    }
}

/// Lets database `name` take connections, or refuses them and ends the open ones.
fn set_connections(name: &str, allowed: bool) {
    let name = name.to_string();
    on_admin_connection(move |c| async move {
        c.batch_execute(&format!(
            "ALTER DATABASE {name} WITH ALLOW_CONNECTIONS {allowed}"
        ))
        .await?;
        if !allowed {
            terminate(&c, &name).await?;
        }
        Ok(())
    })
}

/// Ends every connection to the PostgreSQL database of data directory `dir` (the server's pool
/// and writer) but this one; returns how many.
pub fn terminate_backends(dir: &Path) -> u64 {
    let name = database_name(dir);
    on_admin_connection(move |c| async move { terminate(&c, &name).await })
}

async fn terminate(c: &tokio_postgres::Client, name: &str) -> Result<u64, tokio_postgres::Error> {
    c.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = $1 AND pid <> pg_backend_pid()",
        &[&name],
    )
    .await
}

/// Runs `f` on a connection to the database the test databases are created from.
fn on_admin_connection<T, F, Fut>(f: F) -> T
where
    T: Send + 'static,
    F: FnOnce(tokio_postgres::Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
{
    on_connection(admin_url(), f)
}

/// A running `orgpulse-server` child process.
pub struct TestServer {
    pub child: Child,
    /// `127.0.0.1:PORT`
    pub addr: String,
    /// `http://127.0.0.1:PORT` (`https://` when the server was started with TLS)
    pub url: String,
    pub dir: PathBuf,
    pub args: Vec<String>,
    /// Extra environment of the process.
    pub env: Vec<(String, String)>,
    /// The open-file limit (soft and hard) the process starts with, when not inherited.
    pub open_files: Option<u64>,
    /// Server stderr lines (logs) are forwarded to the test's stderr; with
    /// `ServerOpts::capture_stderr` they are also kept (see `stop_and_read_stderr`).
    stderr: Option<CapturedStderr>,
    /// Set when the server printed a panic: the test fails when the server is dropped, since a
    /// panicking task can leave the rest of the server running and the test passing.
    panicked: std::sync::Arc<std::sync::atomic::AtomicBool>,
    _keep: Option<TempDir>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if self.panicked.load(std::sync::atomic::Ordering::SeqCst) && !std::thread::panicking() {
            panic!("orgpulse-server panicked (its stderr above says where)");
        }
    }
}

/// The server's stderr, collected by a task that reads it until the process exits.
struct CapturedStderr {
    text: std::sync::Arc<std::sync::Mutex<String>>,
    reader: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
pub struct ServerOpts {
    pub extra_args: Vec<String>,
    /// Data directory to reuse (for restarts); a fresh one when None.
    pub dir: Option<PathBuf>,
    /// Address to listen on; `127.0.0.1:0` when None.
    pub listen: Option<String>,
    /// Keep the server's stderr (still forwarded to the test's stderr) for `stop_and_read_stderr`.
    pub capture_stderr: bool,
    /// A PostgreSQL database (URL) the store uses instead of one of its own; recorded in the data
    /// directory, so restarts keep it.
    pub database: Option<String>,
    /// Start the server with this open-file limit, soft and hard (through `prlimit`).
    pub open_files: Option<u64>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(ServerOpts::default()).await
    }

    pub async fn start_args(extra: &[&str]) -> Self {
        Self::start_with(ServerOpts {
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        })
        .await
    }

    pub async fn start_with(opts: ServerOpts) -> Self {
        let (dir, keep) = match opts.dir {
            Some(d) => (d, None),
            None => {
                let t = TempDir::new("server");
                (t.0.clone(), Some(t))
            }
        };
        if let Some(url) = &opts.database {
            std::fs::write(dir.join(DATABASE_URL_FILE), url).unwrap();
        }
        let secret = dir.join("jwt-secret");
        if !secret.exists() {
            std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
        }
        let mut args = vec![
            "--listen".to_string(),
            opts.listen.unwrap_or_else(|| "127.0.0.1:0".into()),
            "--database".into(),
            database_url(&dir),
            "--jwt-secret-file".into(),
            secret.display().to_string(),
        ];
        args.extend(opts.extra_args);
        let mut s = Self::launch(args, dir, opts.capture_stderr, vec![], opts.open_files).await;
        s._keep = keep;
        s
    }

    /// Starts the server with exactly `args` (no default flags); `dir` is its data directory.
    pub async fn spawn(args: Vec<String>, dir: PathBuf) -> Self {
        Self::spawn_capturing(args, dir, false).await
    }

    /// Like `spawn`; with `capture_stderr` the server's stderr is also kept.
    pub async fn spawn_capturing(args: Vec<String>, dir: PathBuf, capture_stderr: bool) -> Self {
        Self::spawn_in_env(args, dir, capture_stderr, vec![]).await
    }

    /// Like `spawn_capturing`, with extra environment variables (kept across `restart`; a
    /// `RUST_LOG` among them beats the tests' default).
    pub async fn spawn_in_env(
        args: Vec<String>,
        dir: PathBuf,
        capture_stderr: bool,
        env: Vec<(String, String)>,
    ) -> Self {
        Self::launch(args, dir, capture_stderr, env, None).await
    }

    async fn launch(
        args: Vec<String>,
        dir: PathBuf,
        capture_stderr: bool,
        env: Vec<(String, String)>,
        open_files: Option<u64>,
    ) -> Self {
        let server = workspace_bin("orgpulse-server");
        let mut command = match open_files {
            None => Command::new(server),
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(server);
                c
            }
        };
        let mut child = command
            .args(&args)
            .env(
                "RUST_LOG",
                std::env::var("ORGPULSE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env.iter().cloned())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn orgpulse-server");
        let pipe = child.stderr.take().unwrap();
        let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let panicked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (kept, seen) = (text.clone(), panicked.clone());
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(pipe).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("{line}");
                if line.contains("panicked at") {
                    seen.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                if capture_stderr {
                    let mut kept = kept.lock().unwrap();
                    kept.push_str(&line);
                    kept.push('\n');
                }
            }
        });
        let stderr = capture_stderr.then_some(CapturedStderr { text, reader });
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let url = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(url) = line.strip_prefix("listening on ") {
                    return url.trim().to_string();
                }
            }
            panic!("orgpulse-server exited before listening");
        })
        .await
        .expect("server did not report its address within 30 s");
        // keep draining stdout so the server never blocks on a full pipe
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let addr = url.split_once("://").expect("scheme").1.to_string();
        TestServer {
            child,
            url,
            addr,
            dir,
            args,
            env,
            open_files,
            stderr,
            panicked,
            _keep: None,
        }
    }

    /// SIGTERM, then everything the server wrote to stderr until it exited. Needs
    /// `ServerOpts::capture_stderr`.
    pub async fn stop_and_read_stderr(&mut self) -> String {
        let captured = self
            .stderr
            .take()
            .expect("start the server with capture_stderr");
        self.terminate().await;
        tokio::time::timeout(WAIT, captured.reader)
            .await
            .expect("stderr closes when the server exits")
            .expect("stderr reader");
        std::mem::take(&mut *captured.text.lock().unwrap())
    }

    /// Restart on the same address and data directory (after `kill` or `terminate`).
    pub async fn restart(&mut self) {
        let _ = self.child.wait().await;
        let mut args = self.args.clone();
        let i = args.iter().position(|a| a == "--listen").unwrap();
        args[i + 1] = self.addr.clone();
        let keep = self._keep.take();
        let capture = self.stderr.is_some();
        let mut fresh = Self::launch(
            args,
            self.dir.clone(),
            capture,
            self.env.clone(),
            self.open_files,
        )
        .await;
        fresh._keep = keep;
        *self = fresh;
    }

    /// SIGKILL.
    pub async fn kill(&mut self) {
        self.child.start_kill().unwrap();
        let _ = self.child.wait().await;
    }

    /// SIGTERM, then wait for exit; returns how long the exit took.
    pub async fn terminate(&mut self) -> Duration {
        let pid = self.child.id().expect("running") as i32;
        let t0 = std::time::Instant::now();
        unsafe_kill(pid, 15);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        t0.elapsed()
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// SIGSTOP: the process hangs with its sockets open (the kernel still completes TCP
    /// handshakes on its listener). It runs again (SIGCONT) when the returned guard is dropped,
    /// also when the test panics.
    pub fn pause(&self) -> Paused {
        let pid = self.pid() as i32;
        unsafe_kill(pid, 19);
        Paused(pid)
    }

    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(self.url.clone())
            .unwrap()
            .connect()
            .await
            .expect("connect")
    }

    pub async fn jobs(&self, token: &str) -> JobServiceClient<InterceptedService<Channel, Auth>> {
        jobs_at(self.url.clone(), token).await
    }

    pub async fn notifications(
        &self,
        token: &str,
    ) -> NotificationServiceClient<InterceptedService<Channel, Auth>> {
        NotificationServiceClient::with_interceptor(self.channel().await, Auth::new(token))
    }

    pub async fn events(
        &self,
        token: &str,
    ) -> EventServiceClient<InterceptedService<Channel, Auth>> {
        EventServiceClient::with_interceptor(self.channel().await, Auth::new(token))
    }
}

/// A JobService client for the server at `url` (for tasks that outlive a borrow of the server).
pub async fn jobs_at(
    url: String,
    token: &str,
) -> JobServiceClient<InterceptedService<Channel, Auth>> {
    let channel = Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .expect("connect");
    JobServiceClient::with_interceptor(channel, Auth::new(token))
}

/// A SIGSTOPped server (see [`TestServer::pause`]); dropping it sends SIGCONT.
pub struct Paused(i32);

impl Drop for Paused {
    fn drop(&mut self) {
        unsafe_kill(self.0, 18);
    }
}

pub fn unsafe_kill(pid: i32, sig: i32) {
    // `kill` from coreutils keeps the tests free of libc bindings.
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Clone)]
pub struct Auth(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Auth {
    pub fn new(token: &str) -> Self {
        if token.is_empty() {
            return Auth(None);
        }
        Auth(Some(
            format!("Bearer {token}").parse().expect("ascii token"),
        ))
    }
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims for `mint`; `exp` is absolute seconds since the epoch.
#[derive(serde::Serialize, Clone)]
pub struct Claims {
    pub sub: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub org: Option<String>,
    pub roles: Vec<String>,
    pub exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
}

pub fn mint_claims(c: &Claims) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        c,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// An HS256 token for `user`, valid for an hour, with `extra` claims (roles, groups, ...); in
/// `org` unless its roles include service.
pub fn token_with(org: &str, user: &str, extra: serde_json::Value) -> String {
    let mut claims = serde_json::json!({ "sub": user, "exp": now_secs() + 3600 });
    let service = extra["roles"]
        .as_array()
        .is_some_and(|r| r.contains(&serde_json::json!("service")));
    if !service {
        claims["org"] = org.into();
    }
    for (k, v) in extra.as_object().expect("claims are an object") {
        claims[k] = v.clone();
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// An HS256 token for `user` in `org` with `role`, valid for an hour.
pub fn token(org: &str, user: &str, role: &str) -> String {
    token_ttl(org, user, role, 3600)
}

pub fn token_ttl(org: &str, user: &str, role: &str, ttl_secs: u64) -> String {
    mint_claims(&Claims {
        sub: user.into(),
        org: if role == "service" {
            None
        } else {
            Some(org.into())
        },
        roles: vec![role.into()],
        exp: now_secs() + ttl_secs,
        nbf: None,
    })
}

/// Every durable event in `org`'s log, read straight from the `events` table of the server with
/// data directory `dir` (SQLite or PostgreSQL): (seq, kind, audience). Tests compare what
/// subscribers received against this.
pub fn log_of(dir: &Path, org: &str) -> Vec<(u64, i32, Option<String>)> {
    log_rows(dir, org)
        .into_iter()
        .map(|r| (r.seq, r.kind, r.audience))
        .collect()
}

/// A row of an org's `events` table.
pub struct LogRow {
    pub seq: u64,
    pub kind: i32,
    /// As stored: a user id, or an audience's JSON object.
    pub audience: Option<String>,
    /// The encoded `Event`.
    pub data: Vec<u8>,
}

/// Every row of `org`'s log, in seq order (see `log_of`).
pub fn log_rows(dir: &Path, org: &str) -> Vec<LogRow> {
    const SQL: &str = "SELECT seq, kind, audience, data FROM events WHERE org_id = $1 ORDER BY seq";
    if let Some(url) = recorded_database(dir) {
        let org = org.to_string();
        return on_connection(url, move |c| async move {
            let rows = c.query(SQL, &[&org]).await?;
            Ok(rows
                .iter()
                .map(|r| LogRow {
                    seq: r.get::<_, i64>(0) as u64,
                    kind: r.get(1),
                    audience: r.get(2),
                    data: r.get(3),
                })
                .collect())
        });
    }
    let conn = rusqlite::Connection::open(dir.join("orgpulse.db")).expect("open db");
    let mut st = conn.prepare(&SQL.replace('$', "?")).unwrap();
    st.query_map([org], |r| {
        Ok(LogRow {
            seq: r.get(0)?,
            kind: r.get(1)?,
            audience: r.get(2)?,
            data: r.get(3)?,
        })
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// Asserts the invariant: `received` holds every durable event of `log` with seq in `range` that
/// `user` may see (with `kinds`, empty = all), each exactly once, in seq order, and nothing else.
pub fn assert_exactly_once(
    received: &[orgpulse::proto::Event],
    log: &[(u64, i32, Option<String>)],
    range: std::ops::RangeInclusive<u64>,
    user: &str,
    kinds: &[i32],
) {
    let got: Vec<u64> = received
        .iter()
        .filter(|e| e.seq > 0)
        .map(|e| e.seq)
        .collect();
    let want: Vec<u64> = log
        .iter()
        .filter(|(seq, kind, aud)| {
            range.contains(seq)
                && (kinds.is_empty() || kinds.contains(kind))
                && aud.as_deref().is_none_or(|a| a == user)
        })
        .map(|(seq, _, _)| *seq)
        .collect();
    assert_eq!(
        got, want,
        "received seqs (left) != the log's visible seqs (right)"
    );
}

/// A Subscribe stream with helpers to await what the tests expect.
pub struct Sub {
    pub stream: tonic::Streaming<orgpulse::proto::Event>,
    /// Everything received so far (durable and ephemeral).
    pub seen: Vec<orgpulse::proto::Event>,
}

/// Generous bound for any single await in a test; never a synchronization sleep.
pub const WAIT: Duration = Duration::from_secs(20);

impl Sub {
    pub async fn open(
        server: &TestServer,
        token: &str,
        org: &str,
        after: &str,
        kinds: &[i32],
    ) -> Result<Sub, tonic::Status> {
        Self::open_on(server.channel().await, token, org, after, kinds).await
    }

    /// Like `open`, on a channel the test configured.
    pub async fn open_on(
        channel: Channel,
        token: &str,
        org: &str,
        after: &str,
        kinds: &[i32],
    ) -> Result<Sub, tonic::Status> {
        let filter = orgpulse::proto::OrgFilter {
            org_id: org.into(),
            kinds: kinds.to_vec(),
            after_cursor: after.into(),
            ..Default::default()
        };
        Self::open_filter(channel, token, filter).await
    }

    /// A stream for any `OrgFilter` (entity types included).
    pub async fn open_filter(
        channel: Channel,
        token: &str,
        filter: orgpulse::proto::OrgFilter,
    ) -> Result<Sub, tonic::Status> {
        let mut c = EventServiceClient::with_interceptor(channel, Auth::new(token));
        let stream = c.subscribe(filter).await?.into_inner();
        Ok(Sub {
            stream,
            seen: vec![],
        })
    }

    /// The next message, or the stream's error; panics after WAIT or at a clean end.
    pub async fn next(&mut self) -> Result<orgpulse::proto::Event, tonic::Status> {
        match tokio::time::timeout(WAIT, self.stream.message()).await {
            Err(_) => panic!(
                "no message within {WAIT:?}; seen so far: {:?}",
                self.kinds_seen()
            ),
            Ok(Ok(Some(ev))) => {
                self.seen.push(ev.clone());
                Ok(ev)
            }
            Ok(Ok(None)) => panic!("stream ended without a status"),
            Ok(Err(status)) => Err(status),
        }
    }

    /// Reads until a message matches `pred`; returns it.
    pub async fn until(
        &mut self,
        pred: impl Fn(&orgpulse::proto::Event) -> bool,
    ) -> orgpulse::proto::Event {
        loop {
            let ev = self.next().await.expect("stream failed");
            if pred(&ev) {
                return ev;
            }
        }
    }

    pub async fn caught_up(&mut self) -> orgpulse::proto::Event {
        self.until(|e| matches!(e.payload, Some(Payload::CaughtUp(_))))
            .await
    }

    /// Reads until `n` durable events arrived in total; returns them.
    pub async fn durable(&mut self, n: usize) -> Vec<orgpulse::proto::Event> {
        while self.durable_seen().len() < n {
            self.next().await.expect("stream failed");
        }
        self.durable_seen()
    }

    pub fn durable_seen(&self) -> Vec<orgpulse::proto::Event> {
        self.seen.iter().filter(|e| e.seq > 0).cloned().collect()
    }

    /// Reads until the stream ends with an error status; returns it.
    pub async fn error(&mut self) -> tonic::Status {
        loop {
            if let Err(s) = self.next().await {
                return s;
            }
        }
    }

    fn kinds_seen(&self) -> Vec<String> {
        self.seen.iter().map(payload_name).collect()
    }
}

use orgpulse::proto::event::Payload;

/// (user, topic, the state's string field "v", or "" when the entry left) of a `presence_state`
/// event; `None` for any other event.
pub fn presence_state_of(e: &orgpulse::proto::Event) -> Option<(String, String, String)> {
    let Some(Payload::PresenceState(p)) = &e.payload else {
        return None;
    };
    let v = p
        .state
        .as_ref()
        .and_then(|s| s.fields.get("v"))
        .and_then(|v| match &v.kind {
            Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
            _ => None,
        })
        .unwrap_or_default();
    Some((p.user_id.clone(), p.topic.clone(), v))
}

/// A short name of an event's payload, for assertions and messages.
pub fn payload_name(e: &orgpulse::proto::Event) -> String {
    match &e.payload {
        Some(Payload::JobCreated(_)) => "job_created",
        Some(Payload::JobUpdated(_)) => "job_updated",
        Some(Payload::JobDeleted(_)) => "job_deleted",
        Some(Payload::NotificationNew(_)) => "notification_new",
        Some(Payload::UserOnline(_)) => "user_online",
        Some(Payload::UserOffline(_)) => "user_offline",
        Some(Payload::Heartbeat(_)) => "heartbeat",
        Some(Payload::CaughtUp(_)) => "caught_up",
        Some(Payload::Resync(_)) => "resync",
        Some(Payload::EntityChanged(_)) => "entity_changed",
        Some(Payload::PresenceState(_)) => "presence_state",
        Some(Payload::Broadcast(_)) => "broadcast",
        None => "none",
    }
    .to_string()
}

/// Creates a job titled `title` in `org`; panics on failure.
pub async fn create_job(
    server: &TestServer,
    token: &str,
    org: &str,
    title: &str,
) -> orgpulse::proto::Job {
    server
        .jobs(token)
        .await
        .create_job(orgpulse::proto::CreateJobRequest {
            org_id: org.into(),
            title: title.into(),
            ..Default::default()
        })
        .await
        .expect("create_job")
        .into_inner()
}

/// The cursor that points at `seq` in the same log as `cursor` (tests know the cursor layout:
/// base64url of 8 bytes epoch + 8 bytes seq).
pub fn cursor_at(cursor: &str, seq: u64) -> String {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    let mut b = URL_SAFE_NO_PAD.decode(cursor).expect("cursor");
    b[8..].copy_from_slice(&seq.to_be_bytes());
    URL_SAFE_NO_PAD.encode(b)
}

/// `GET path` on the server's port, as text.
pub async fn get_text(server: &TestServer, path: &str) -> String {
    reqwest::get(format!("{}{path}", server.url))
        .await
        .expect("GET")
        .text()
        .await
        .expect("body")
}

/// `ListJobs` of the token's org with default paging (its `cursor` is the snapshot position).
pub async fn snapshot(server: &TestServer, token: &str) -> orgpulse::proto::ListJobsResponse {
    server
        .jobs(token)
        .await
        .list_jobs(orgpulse::proto::ListJobsRequest::default())
        .await
        .expect("list_jobs")
        .into_inner()
}

/// `ListOnline` of the token's org.
pub async fn online(server: &TestServer, token: &str) -> Vec<orgpulse::proto::Member> {
    server
        .events(token)
        .await
        .list_online(orgpulse::proto::ListOnlineRequest::default())
        .await
        .expect("list_online")
        .into_inner()
        .members
}

/// Asserts UNAUTHENTICATED on a unary call and on Subscribe, with a message containing `says`
/// (and not echoing the token); returns both statuses.
pub async fn refused(server: &TestServer, token: &str, says: &str) -> [tonic::Status; 2] {
    let unary = server
        .jobs(token)
        .await
        .list_jobs(orgpulse::proto::ListJobsRequest {
            org_id: "acme".into(),
            ..Default::default()
        })
        .await
        .expect_err("unary call must be refused");
    let subscribe = Sub::open(server, token, "acme", "", &[])
        .await
        .err()
        .expect("subscribe must be refused");
    for err in [&unary, &subscribe] {
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
        assert!(
            err.message().contains(says),
            "message {:?} should say {says:?}",
            err.message()
        );
        assert!(
            token.len() < 20 || !err.message().contains(token),
            "token echoed"
        );
    }
    [unary, subscribe]
}

/// Asserts `status` is UNAUTHENTICATED with the `orgpulse-error: token-expired` trailer.
pub fn assert_token_expired_marker(status: &tonic::Status) {
    use orgpulse::error_marker::{KEY, TOKEN_EXPIRED};
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    assert_eq!(
        status.metadata().get(KEY).and_then(|v| v.to_str().ok()),
        Some(TOKEN_EXPIRED),
        "{status:?}"
    );
}

/// Sends a notification titled `title` to `user` ("" = everyone) in the token's org.
pub async fn notify(
    server: &TestServer,
    token: &str,
    user: &str,
    title: &str,
) -> orgpulse::proto::Notification {
    server
        .notifications(token)
        .await
        .send_notification(orgpulse::proto::SendNotificationRequest {
            user_id: user.into(),
            title: title.into(),
            ..Default::default()
        })
        .await
        .expect("send_notification")
        .into_inner()
}
