//! Wires the engines together and serves the one port until shutdown.
//!
//! `run(config, listener, shutdown)`: opens the Store, starts the Hub, Bus and Presence, serves
//! HTTP/1.1 and HTTP/2 (h2c) connections, trims the log on a timer, and on shutdown ends every open
//! stream at once with UNAVAILABLE, lets in-flight calls finish, tells the cluster it leaves, and
//! returns within 2 s.
use std::{future::Future, sync::Arc, time::Duration};

use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::{
        conn::auto,
        graceful::{GracefulShutdown, Watcher},
    },
    service::TowerToHyperService,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    auth::Authenticator,
    bus::{Bus, MemoryBus, nats::NatsBus},
    config::{Config, Database},
    hub::Hub,
    metrics::METRICS,
    presence::{
        MemoryPresence, Presence,
        nats::{NatsPresence, Timing},
    },
    service::Ctx,
    store::Store,
};

/// How long in-flight calls get to finish after the shutdown signal.
const DRAIN: Duration = Duration::from_millis(1500);
/// How long a client may take to complete the TLS handshake.
const TLS_HANDSHAKE: Duration = Duration::from_secs(10);

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
    let bus: Arc<dyn Bus> = match &nats {
        Some(client) => Arc::new(NatsBus::new(client.clone(), &cfg.nats_subject_prefix)),
        None => Arc::new(MemoryBus::default()),
    };
    let store = crate::store::open(&cfg, bus.clone()).await?;
    let hub = Hub::new(store.clone(), cfg.subscriber_queue, bus.clone());
    bus.attach(hub.clone());
    let _ = METRICS.node.set((node_id.clone(), bus.clone()));
    let cluster = nats.is_some();
    let stop = CancellationToken::new();
    if let Some(keys) = auth.remote_keys() {
        tokio::spawn(keys.clone().refresh_every(cfg.jwks_refresh, stop.clone()));
    }
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
        auth,
        store: store.clone(),
        hub,
        presence,
        heartbeat: cfg.heartbeat_interval,
        streams: crate::stream_limit::StreamSlots::new(cfg.max_streams_per_user),
        shutdown: stop.clone(),
    });
    if let Some(url) = &cfg.outbox {
        let outbox = crate::outbox::OutboxConfig {
            url: url.clone(),
            table: cfg.outbox_table.clone(),
            poll: cfg.outbox_poll,
        };
        crate::outbox::start(outbox, store.clone(), stop.clone()).await?;
    }
    let app = crate::web::router(ctx.clone(), &cfg.cors_origins).await?;
    tokio::spawn(trim_log(store.clone(), cfg.retention, stop.clone()));
    let demo = cfg
        .demo
        .then(|| tokio::spawn(crate::dev::demo_workload(store.clone(), stop.clone())));

    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1().timer(hyper_util::rt::TokioTimer::new());
    http.http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .initial_stream_window_size(256 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .max_concurrent_streams(1000)
        // What one stream may have buffered beyond the peer's window: a slow reader's queue then
        // fills soon and it is cut off, instead of the server holding megabytes for it.
        .max_send_buf_size(64 * 1024)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
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
        let (tcp, _) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (http, app, watcher, tls) =
            (http.clone(), app.clone(), graceful.watcher(), tls.clone());
        tokio::spawn(async move {
            let served = match tls {
                None => serve_connection(&http, watcher, tcp, app).await,
                // Boxed: a task is as large as its largest state, and the TLS one (handshake,
                // session, buffers) would otherwise be paid by every plain connection too.
                Some(tls) => {
                    Box::pin(async move {
                        match tokio::time::timeout(TLS_HANDSHAKE, tls.accept(tcp)).await {
                            Ok(Ok(stream)) => serve_connection(&http, watcher, stream, app).await,
                            Ok(Err(e)) => Err(e.into()),
                            Err(_) => Err("TLS handshake timed out".into()),
                        }
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

/// Serves one connection (plain TCP or TLS) with HTTP/1.1 or HTTP/2, until it closes or the
/// graceful shutdown ends it.
async fn serve_connection<I>(
    http: &auto::Builder<TokioExecutor>,
    watcher: Watcher,
    io: I,
    app: axum::Router,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = http.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(app));
    watcher.watch(conn.into_owned()).await
}

/// Drops events older than `retention`, on a timer proportional to it.
async fn trim_log(store: Arc<dyn Store>, retention: Duration, stop: CancellationToken) {
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
