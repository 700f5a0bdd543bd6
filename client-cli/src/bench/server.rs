//! The server under test: either started here (fresh data directory and HS256 secret, pinned
//! with `taskset` like the socket.io peer, stopped at the end) or an already running one; in
//! cluster mode several started nodes sharing one secret. Its CPU time and resident memory are
//! read from its own `/metrics`, so both cases measure alike.
//!
//! The one file of the CLI with unsafe code: libc calls std does not offer (see Cargo.toml).
#![allow(unsafe_code)]
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
    process::{Child, Command},
};

use crate::error::CliError;

/// A server the bench talks to.
pub struct Target {
    pub addr: SocketAddr,
    pub secret_file: PathBuf,
    child: Option<Child>,
    data_dir: Option<PathBuf>,
    /// The kept-alive connection `/metrics` is read on: a monitoring scraper is one of the
    /// server's existing clients, not a new connection each time (which a storm's admission
    /// gate would hold in line with the storm).
    scraper: tokio::sync::Mutex<Option<BufReader<TcpStream>>>,
}

/// Process-wide CPU seconds (user+system) and resident bytes of the server, and its open
/// `Subscribe` streams (of all nodes: their sum).
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub cpu_s: f64,
    pub rss: u64,
    pub open_streams: u64,
    /// Write transactions its store committed.
    pub commits: u64,
}

pub fn fail(msg: impl Into<String>) -> CliError {
    CliError {
        class: orgpulse::client::ErrorClass::Other,
        message: msg.into(),
    }
}

impl Target {
    /// An already running server at `url` (`http://127.0.0.1:PORT`) whose HS256 secret is in
    /// `secret_file`.
    pub fn attach(url: &str, secret_file: &Path) -> Result<Target, CliError> {
        let hostport = url
            .strip_prefix("http://")
            .ok_or_else(|| CliError::usage(format!("--server {url:?}: expected http://IP:PORT")))?
            .trim_end_matches('/');
        let addr = hostport
            .parse()
            .map_err(|_| CliError::usage(format!("--server {url:?}: expected http://IP:PORT")))?;
        Ok(Target {
            addr,
            secret_file: secret_file.to_path_buf(),
            child: None,
            data_dir: None,
            scraper: Default::default(),
        })
    }

    /// Starts `bin` on 127.0.0.1 with a fresh data directory and the secret in `secret_file`
    /// (None: a fresh one), pinned to `cpus` (empty: not pinned), and waits for its
    /// `listening on` line.
    pub async fn start(
        bin: &Path,
        cpus: &str,
        extra: &[String],
        secret_file: Option<&Path>,
    ) -> Result<Target, CliError> {
        let dir = std::env::temp_dir().join(format!(
            "orgpulse-bench-{}-{:x}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).map_err(CliError::io(dir.display()))?;
        let secret_file = match secret_file {
            Some(f) => f.to_path_buf(),
            None => {
                let f = dir.join("jwt-secret");
                std::fs::write(&f, format!("bench-{:032x}\n", rand_suffix()))
                    .map_err(CliError::io(f.display()))?;
                f
            }
        };
        let mut cmd = if cpus.is_empty() {
            Command::new(bin)
        } else {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpus).arg(bin);
            c
        };
        // A `--server-arg=--database=postgres://...` replaces the fresh SQLite file.
        if !extra.iter().any(|a| a.starts_with("--database")) {
            cmd.arg("--database")
                .arg(format!("sqlite://{}", dir.join("orgpulse.db").display()));
        }
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--jwt-secret-file")
            .arg(&secret_file)
            .args(extra)
            // Per-connection info logs would be the server's main output at 20k streams.
            .env(
                "RUST_LOG",
                std::env::var("ORGPULSE_BENCH_SERVER_LOG").unwrap_or("warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| fail(format!("starting {}: {e}", bin.display())))?;
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let addr = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(a) = line.strip_prefix("listening on http://") {
                    return a.trim().parse().ok();
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| {
            fail(format!(
                "{} did not report listening within 30 s",
                bin.display()
            ))
        })?;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Target {
            addr,
            secret_file,
            child: Some(child),
            data_dir: Some(dir),
            scraper: Default::default(),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The server's `GET /metrics` text.
    async fn metrics(&self) -> Result<String, CliError> {
        tokio::time::timeout(Duration::from_secs(10), self.scrape())
            .await
            .map_err(|_| fail("GET /metrics timed out"))?
            .map_err(|e| fail(format!("GET /metrics: {e}")))
    }

    /// `GET /metrics` on the kept-alive connection; once more on a new one when it was closed
    /// meanwhile (the server closes a connection idle for 10 s) or broke.
    async fn scrape(&self) -> std::io::Result<String> {
        let mut conn = self.scraper.lock().await;
        loop {
            let fresh = conn.is_none();
            let s = match &mut *conn {
                Some(s) => s,
                None => conn.insert(BufReader::new(TcpStream::connect(self.addr).await?)),
            };
            match get_kept_alive(s, self.addr, "/metrics").await {
                Ok(body) => return Ok(body),
                Err(e) => {
                    *conn = None;
                    if fresh {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// One value of the server's `/metrics`, if it has it.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        metric_in(&self.metrics().await.ok()?, name)
    }

    /// The server's CPU seconds, RSS and open streams from `GET /metrics`.
    pub async fn usage(&self) -> Result<Usage, CliError> {
        let text = self.metrics().await?;
        let value = |name: &str| {
            metric_in(&text, name).ok_or_else(|| fail(format!("/metrics has no {name}")))
        };
        Ok(Usage {
            cpu_s: value("process_cpu_seconds_total")?,
            rss: value("process_resident_memory_bytes")? as u64,
            open_streams: value("orgpulse_open_streams")? as u64,
            commits: value("orgpulse_store_commits_total")? as u64,
        })
    }

    /// The sum of the nodes' usage, and each one's open streams.
    pub async fn usage_of(nodes: &[Target]) -> Result<(Usage, Vec<u64>), CliError> {
        let mut sum = Usage::default();
        let mut streams = Vec::with_capacity(nodes.len());
        for node in nodes {
            let u = node.usage().await?;
            sum.cpu_s += u.cpu_s;
            sum.rss += u.rss;
            sum.open_streams += u.open_streams;
            sum.commits += u.commits;
            streams.push(u.open_streams);
        }
        Ok((sum, streams))
    }

    /// Kills a server started here at once (SIGKILL), as a crash would.
    pub async fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill().await;
        }
    }

    /// Stops a server started here (SIGTERM, then SIGKILL after 5 s) and removes its data.
    pub async fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                // SAFETY: signalling our own child process by its pid.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
            if tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
        if let Some(dir) = self.data_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The value of metric `name` (without labels) in a `/metrics` text.
fn metric_in(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse::<f64>()
            .ok()
    })
}

fn rand_suffix() -> u128 {
    rand::random()
}

/// `GET path` on an HTTP/1.1 connection kept alive: the body, of its `content-length`.
async fn get_kept_alive(
    s: &mut BufReader<TcpStream>,
    addr: SocketAddr,
    path: &str,
) -> std::io::Result<String> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    s.get_mut()
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut len = None;
    loop {
        let mut line = String::new();
        if s.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = Some(v.trim().parse().map_err(|_| bad("bad content-length"))?);
        }
    }
    let mut body = vec![0; len.ok_or_else(|| bad("no content-length"))?];
    s.read_exact(&mut body).await?;
    String::from_utf8(body).map_err(|_| bad("a body not UTF-8"))
}

/// Pins this process (its current and future threads) to `cpus` (e.g. "1" or "1,3"); empty:
/// no change.
pub fn pin_self(cpus: &str) -> Result<(), CliError> {
    if cpus.is_empty() {
        return Ok(());
    }
    // SAFETY: cpu_set_t is plain data; sched_setaffinity(0) affects only the calling thread,
    // which is the only one at this point (threads created later inherit its mask).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in cpus.split(',') {
            let c: usize = c.trim().parse().map_err(|_| {
                CliError::usage(format!("--client-cpus {cpus:?}: expected N[,N...]"))
            })?;
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(fail(format!(
                "pinning to cpus {cpus}: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

/// Raises this process's open-file limit to at least `want` (the started server inherits it):
/// the soft limit up to the hard one, the hard one too when privileged.
pub fn raise_nofile(want: u64) -> Result<(), CliError> {
    // SAFETY: getrlimit/setrlimit on local structs.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur >= want {
            return Ok(());
        }
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: lim.rlim_max.max(want),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            return Err(fail(format!(
                "{want} open files needed, the hard limit is {} and cannot be raised here ({}); \
                 use fewer --subscribers",
                lim.rlim_max,
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

/// CPU seconds (user+system) this process used so far.
pub fn self_cpu_s() -> f64 {
    let (all, _) = cpu_s(libc::RUSAGE_SELF);
    all
}

/// CPU seconds the calling thread used so far: (user+system, user).
pub fn thread_cpu_s() -> (f64, f64) {
    cpu_s(libc::RUSAGE_THREAD)
}

/// getrusage(`who`): (user+system, user) CPU seconds.
fn cpu_s(who: libc::c_int) -> (f64, f64) {
    // SAFETY: getrusage on a local struct.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(who, &mut ru);
        ru
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(ru.ru_utime) + secs(ru.ru_stime), secs(ru.ru_utime))
}
