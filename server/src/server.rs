//! Wires the engines together and serves the one port until shutdown.
//!
//! `run(config, listener, shutdown)`: opens the Store, starts the Hub, Bus and Presence, serves
//! HTTP/1.1 and HTTP/2 (h2c) connections through the connection door (`connections`), their
//! first requests through the admission gate (`admission`), trims the log on a timer, and on shutdown ends every open
//! stream at once with UNAVAILABLE, lets in-flight calls finish, tells the cluster it leaves, and
//! returns within 2 s.
use std::{future::Future, sync::Arc, time::Duration};

use hyper::server::conn::http2;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{
        conn::auto,
        graceful::{GracefulShutdown, Watcher},
    },
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;

use crate::{
    activity::Activity,
    admission::Admission,
    auth::Authenticator,
    bus::{Bus, MemoryBus, nats::NatsBus},
    config::{Config, Database},
    connections::{Connection, Connections, Door, H2_PREFACE, HEAD_TIMEOUT},
    hub::{Hub, Rooms},
    log_limit::LogLimit,
    metrics::METRICS,
    presence::{
        MemoryPresence, Presence,
        nats::{NatsPresence, Timing},
    },
    service::Ctx,
    store::Log,
    user_slots::UserSlots,
};

/// How long in-flight calls get to finish after the shutdown signal.
const DRAIN: Duration = Duration::from_millis(1500);
/// How long the accept loop pauses after a failed accept (out of descriptors: the pending
/// connection stays queued, and retrying at once would spin).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
static ACCEPT_FAILED: LogLimit = LogLimit::new();
/// How much later than the door's deadline hyper's own for an HTTP/1.1 request head falls.
const HYPER_HEAD_MARGIN: Duration = Duration::from_millis(50);

pub async fn run(
    cfg: Config,
    auth: Authenticator,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let database = cfg.database().map_err(anyhow::Error::msg)?;
    let node_id = cfg
        .node_id
        .clone()
        .unwrap_or_else(|| format!("{:08x}", rand::random::<u32>()));
    let nats = match &cfg.nats {
        None => None,
        Some(url) => {
            anyhow::ensure!(
                matches!(database, Database::Postgres(_)),
                "--nats needs a store the nodes share: use --database postgres://... (an SQLite file belongs to one node)"
            );
            crate::bus::nats::check_prefix(&cfg.nats_subject_prefix)?;
            Some(crate::bus::nats::connect(url, &node_id).await?)
        }
    };
    // One way: the rooms the Bus delivers to, the Bus, the Store publishing on it, the Hub.
    let rooms = Arc::new(Rooms::default());
    let bus: Arc<dyn Bus> = match &nats {
        Some(client) => Arc::new(NatsBus::new(
            client.clone(),
            &cfg.nats_subject_prefix,
            rooms.clone(),
        )),
        None => Arc::new(MemoryBus::new(rooms.clone())),
    };
    let store = crate::store::open(&cfg, crate::bus::committed_to(bus.clone())).await?;
    let hub = Hub::new(rooms, store.log.clone(), cfg.subscriber_queue, bus.clone());
    let pacer = hub.pacer();
    let cluster = nats.is_some();
    let stop = CancellationToken::new();
    if let Some(keys) = auth.remote_keys() {
        tokio::spawn(keys.clone().refresh_every(cfg.jwks_refresh, stop.clone()));
    }
    let activity = Activity::start(
        hub.clone(),
        &node_id,
        nats.clone().map(|c| (c, cfg.nats_subject_prefix.as_str())),
        stop.clone(),
    )
    .await?;
    let cluster_presence = match nats {
        Some(client) => Some(
            NatsPresence::start(
                client,
                &cfg.nats_subject_prefix,
                &node_id,
                hub.clone(),
                Timing {
                    grace: cfg.presence_grace,
                    heartbeat: cfg.presence_heartbeat,
                    node_timeout: cfg.presence_node_timeout,
                },
                stop.clone(),
            )
            .await?,
        ),
        None => None,
    };
    let presence: Arc<dyn Presence> = match &cluster_presence {
        Some(p) => p.clone(),
        None => MemoryPresence::new(hub.clone(), cfg.presence_grace),
    };
    let ctx = Arc::new(Ctx {
        store: store.clone(),
        hub,
        presence,
        activity,
        node_id: node_id.clone(),
        bus,
        heartbeat: cfg.heartbeat_interval,
        streams: UserSlots::streams(cfg.max_streams_per_user),
        polls: UserSlots::polls(cfg.max_polls_per_user),
        shutdown: stop.clone(),
    });
    if let Some(url) = &cfg.outbox {
        let outbox = crate::outbox::OutboxConfig {
            url: url.clone(),
            table: cfg.outbox_table.clone(),
            poll: cfg.outbox_poll,
        };
        crate::outbox::start(outbox, &store, stop.clone()).await?;
    }
    let app =
        crate::web::router(ctx.clone(), auth, &cfg.cors_origins, cfg.max_request_buffer).await?;
    tokio::spawn(trim_log(store.log.clone(), cfg.retention, stop.clone()));
    let demo = cfg.demo.then(|| {
        tokio::spawn(crate::dev::demo_workload(
            store.entities.clone(),
            stop.clone(),
        ))
    });

    let connections = Connections::new(
        crate::connections::open_file_budget(
            usize::try_from(cfg.max_connections).unwrap_or(usize::MAX),
        ),
        pacer,
    );
    let http = Arc::new(Http::new(cfg.max_concurrent_streams));
    let admission = Admission::start(stop.clone());
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => Some(crate::tls::acceptor(cert, key)?),
        _ => None,
    };
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    // Logged once everything has started, so a start-up failure is still the one line it prints.
    tracing::info!(node_id = %node_id, cluster, "engines ready");
    // Tests and scripts wait for this exact line.
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("listening on {scheme}://{}", listener.local_addr()?);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            () = connections.room() => {}
        }
        let (tcp, _) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    METRICS.accept_errors.inc();
                    ACCEPT_FAILED.log(|suppressed| {
                        tracing::warn!(error = %e, suppressed, "accept failed");
                    });
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        // At capacity with every connection past the door: this one is closed at once.
        let Some((slot, mut waiting)) = connections.admit() else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (http, watcher, tls) = (http.clone(), graceful.watcher(), tls.clone());
        let app = App {
            router: app.clone(),
            connection: slot.connection(),
            admission: admission.clone(),
        };
        tokio::spawn(async move {
            let served = match tls {
                None => {
                    // The door's deadline bounds the wait for the first bytes too.
                    let h2 = tokio::select! {
                        biased;
                        why = waiting.closed() => Err(why),
                        h2 = starts_with_preface(&tcp) => Ok(h2),
                    };
                    let door = Door::new(tcp, slot, waiting);
                    match h2 {
                        Err(why) => Err(why.into()),
                        Ok(true) => http.serve_h2(watcher, door, app).await,
                        // Boxed: a task is as large as its largest state, and the auto builder's
                        // connection (HTTP/1.1 and HTTP/2 states) would otherwise be paid by every
                        // HTTP/2 connection too.
                        Ok(false) => Box::pin(http.serve_auto(watcher, door, app)).await,
                    }
                }
                // Boxed too: the TLS state (handshake, session, buffers).
                Some(tls) => {
                    Box::pin(async move {
                        let stream = tokio::select! {
                            biased;
                            why = waiting.closed() => return Err(why.into()),
                            stream = tls.accept(tcp) => stream?,
                        };
                        http.serve_auto(watcher, Door::new(stream, slot, waiting), app)
                            .await
                    })
                    .await
                }
            };
            if let Err(e) = served {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    tracing::info!("shutting down: ending streams, finishing in-flight calls");
    stop.cancel();
    ctx.hub.shut_down();
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some connections did not close within {DRAIN:?}");
    }
    if let Some(p) = cluster_presence {
        p.leave().await;
    }
    if let Some(demo) = demo {
        // It finishes its jobs; the runtime ends with this function.
        let _ = tokio::time::timeout(DRAIN, demo).await;
    }
    Ok(())
}

type Served = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// The HTTP settings of every connection; the HTTP/2 ones set alike on both builders.
macro_rules! http2_settings {
    ($builder:expr, $max_concurrent_streams:expr) => {
        $builder
            .timer(TokioTimer::new())
            .initial_stream_window_size(256 * 1024)
            .initial_connection_window_size(1024 * 1024)
            .max_concurrent_streams($max_concurrent_streams)
            // What one stream may have buffered beyond the peer's window: a slow reader's queue
            // then fills soon and it is cut off, instead of the server holding megabytes for it.
            .max_send_buf_size(64 * 1024)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20))
    };
}

/// How connections are served: HTTP/2 alone for a plain connection that starts with the HTTP/2
/// preface (no HTTP/1.1 state in its task), else hyper-util's auto builder (HTTP/1.1 and grpc-web,
/// TLS, or a preface that came in pieces).
struct Http {
    auto: auto::Builder<TokioExecutor>,
    h2: http2::Builder<TokioExecutor>,
}

impl Http {
    fn new(max_concurrent_streams: u32) -> Http {
        let mut auto = auto::Builder::new(TokioExecutor::new());
        auto.http1()
            .timer(TokioTimer::new())
            // The head of each later request on a kept-alive connection. The first one's is the
            // door's: hyper checks its own deadline before it reads, so this one is a little
            // later, and the door's (set at accept) closes and counts a connection without a head.
            .header_read_timeout(HEAD_TIMEOUT + HYPER_HEAD_MARGIN);
        http2_settings!(auto.http2(), max_concurrent_streams);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        http2_settings!(&mut h2, max_concurrent_streams)
            // No HPACK dynamic table for what clients send, and (vendor/h2, PATCH.md) none for
            // the responses: an idle connection keeps neither its first request's headers (its
            // bearer token mostly) nor its response's; each header block goes in full instead.
            // (hyper-util's auto builder has no such setting.)
            .header_table_size(0);
        Http { auto, h2 }
    }

    /// Serves one connection (plain TCP or TLS) with HTTP/1.1 or HTTP/2, until it closes or the
    /// graceful shutdown ends it.
    async fn serve_auto<I>(&self, watcher: Watcher, io: I, app: App) -> Served
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let conn = self
            .auto
            .serve_connection_with_upgrades(TokioIo::new(io), app);
        watcher.watch(conn).await
    }

    /// Serves one connection that starts with the HTTP/2 preface.
    async fn serve_h2<I>(&self, watcher: Watcher, io: I, app: App) -> Served
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let conn = self.h2.serve_connection(TokioIo::new(io), app);
        Ok(watcher.watch(conn).await?)
    }
}

/// The router as hyper's service, its future boxed. hyper runs each HTTP/2 stream as a task of
/// its own, as large as the task's largest state, and the router's future (which holds the
/// request until it is routed) is that state: unboxed it made each stream's task 512 bytes for
/// the stream's whole life. Boxed, it is freed once the response head is out. Each request
/// carries its [`Connection`] (its id, and its count of streams); on a new connection it first
/// waits its turn at the admission gate.
#[derive(Clone)]
struct App {
    router: axum::Router,
    connection: Connection,
    admission: Arc<Admission>,
}

impl hyper::service::Service<http::Request<hyper::body::Incoming>> for App {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn call(&self, mut req: http::Request<hyper::body::Incoming>) -> Self::Future {
        let (router, admission) = (self.router.clone(), self.admission.clone());
        let connection = self.connection.clone();
        let waits = Admission::must_wait(&connection, req.uri().path());
        Box::pin(async move {
            if waits {
                admission.enter().await;
            }
            req.extensions_mut().insert(connection);
            tower::ServiceExt::oneshot(router, req).await
        })
    }
}

/// Whether the first bytes the connection sent are the whole HTTP/2 preface (they stay unread).
/// False as well for a preface not yet complete: the auto builder then reads it.
async fn starts_with_preface(tcp: &TcpStream) -> bool {
    let mut first = [0; H2_PREFACE.len()];
    tcp.peek(&mut first).await.ok() == Some(H2_PREFACE.len()) && first == *H2_PREFACE
}

/// Drops events older than `retention`, on a timer proportional to it.
async fn trim_log(store: Arc<dyn Log>, retention: Duration, stop: CancellationToken) {
    let every = (retention / 10).clamp(Duration::from_millis(100), Duration::from_secs(60));
    loop {
        if let Some(before) = std::time::SystemTime::now().checked_sub(retention) {
            match store.trim(before).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(events = n, "trimmed events past retention"),
                Err(e) => tracing::warn!(error = %e, "trimming the log failed"),
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
