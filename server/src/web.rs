//! The HTTP face of the one port: gRPC services (native and grpc-web, binary and -text) behind the
//! request gate (`request_gate`: the token checked before the body is read) with the per-RPC log
//! span, the dashboard at `/`, `GET /healthz`, `GET /metrics`, gRPC health and server
//! reflection, and CORS for the configured browser origins (outermost, so preflights are answered
//! before anything else). Both health answers follow the store: not serving while it cannot write.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::{Request, State},
    http::{HeaderValue, Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use orgpulse::proto::{
    job_service_server::JobServiceServer, notification_service_server::NotificationServiceServer,
};
use tonic::service::Routes;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tracing::Instrument;

use crate::{
    auth::Authenticator,
    log_limit::LogLimit,
    metrics::METRICS,
    request_gate::Gate,
    service::{Ctx, events::EventServer, jobs::Jobs, notifications::Notifications},
    validate::MAX_REQUEST,
};

const INDEX_HTML: &[u8] = include_bytes!("../../web/dist/index.html");
const APP_JS: &[u8] = include_bytes!("../../web/dist/app.js");
const APP_CSS: &[u8] = include_bytes!("../../web/dist/app.css");
/// How often gRPC health follows the store's health.
const HEALTH_EVERY: Duration = Duration::from_millis(500);
/// The services gRPC health reports on ("" is the server as a whole).
const HEALTH_SERVICES: [&str; 4] = [
    "",
    "orgpulse.v1.JobService",
    "orgpulse.v1.NotificationService",
    "orgpulse.v1.EventService",
];

/// The whole HTTP service of the server.
pub async fn router(
    ctx: Arc<Ctx>,
    auth: Authenticator,
    cors_origins: &[String],
    max_request_buffer: usize,
) -> anyhow::Result<Router> {
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, tonic_health::ServingStatus::Serving).await;
    tokio::spawn(follow_store_health(ctx.clone(), health));
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(orgpulse::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let grpc = Routes::builder()
        .add_service(
            JobServiceServer::new(Jobs(ctx.clone())).max_decoding_message_size(MAX_REQUEST),
        )
        .add_service(
            NotificationServiceServer::new(Notifications(ctx.clone()))
                .max_decoding_message_size(MAX_REQUEST),
        )
        .add_service(EventServer(ctx.clone()))
        .add_service(health_service)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .clone()
        .routes()
        .into_axum_router()
        .layer(middleware::from_fn_with_state(
            Gate::new(auth, max_request_buffer),
            crate::request_gate::gate,
        ))
        .layer(middleware::from_fn(rpc_log))
        .layer(tonic_web::GrpcWebLayer::new());
    let app = grpc
        .route("/", get(|| asset("text/html; charset=utf-8", INDEX_HTML)))
        .route(
            "/index.html",
            get(|| asset("text/html; charset=utf-8", INDEX_HTML)),
        )
        .route(
            "/app.js",
            get(|| asset("text/javascript; charset=utf-8", APP_JS)),
        )
        .route(
            "/app.css",
            get(|| asset("text/css; charset=utf-8", APP_CSS)),
        )
        .route("/healthz", get(healthz).with_state(ctx.clone()))
        .route("/metrics", get(metrics).with_state(ctx.clone()))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") });
    Ok(match cors(cors_origins)? {
        Some(layer) => app.layer(layer),
        None => app,
    })
}

async fn asset(content_type: &'static str, body: &'static [u8]) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

/// `ok`, or 503 with the reason the store cannot write.
async fn healthz(State(ctx): State<Arc<Ctx>>) -> Response {
    match ctx.store.status.health() {
        Ok(()) => "ok\n".into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

async fn set_health(
    health: &tonic_health::server::HealthReporter,
    status: tonic_health::ServingStatus,
) {
    for service in HEALTH_SERVICES {
        health.set_service_status(service, status).await;
    }
}

/// Keeps gRPC health in step with the store's (a cheap read of its writer's last outcome).
async fn follow_store_health(ctx: Arc<Ctx>, health: tonic_health::server::HealthReporter) {
    let mut serving = true;
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(HEALTH_EVERY) => {}
        }
        let now = ctx.store.status.health().is_ok();
        if now != serving {
            serving = now;
            let status = if now {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            set_health(&health, status).await;
        }
    }
}

async fn metrics(State(ctx): State<Arc<Ctx>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(
            ctx.store.status.pool_stats(),
            crate::metrics::NodeState {
                id: &ctx.node_id,
                bus_connected: ctx.bus.connected(),
            },
        ),
    )
}

fn cors(origins: &[String]) -> anyhow::Result<Option<CorsLayer>> {
    if origins.is_empty() {
        return Ok(None);
    }
    let list = origins
        .iter()
        .map(|o| HeaderValue::from_str(o.trim_end_matches('/')))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("--cors-origin: {e}"))?;
    let h = |names: &[&'static str]| {
        names
            .iter()
            .map(|n| header::HeaderName::from_static(n))
            .collect::<Vec<_>>()
    };
    Ok(Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(list))
            .allow_methods([Method::POST, Method::GET, Method::OPTIONS])
            .allow_headers(h(&[
                "authorization",
                "content-type",
                "x-grpc-web",
                "x-user-agent",
                "grpc-timeout",
            ]))
            .expose_headers(h(&[
                "grpc-status",
                "grpc-message",
                "grpc-status-details-bin",
                orgpulse::error_marker::KEY,
            ]))
            .max_age(std::time::Duration::from_secs(600)),
    ))
}

/// Warnings about failed calls and about malformed requests: a stranger can repeat either in a
/// loop, so each is logged at most once a second.
static RPC_FAILED: LogLimit = LogLimit::new();
static MALFORMED: LogLimit = LogLimit::new();
/// The start (percent-encoded, as in `grpc-message`) of the messages of tonic's and tonic-web's
/// decoders for a request body that is not a gRPC message stream.
const FRAMING_ERRORS: [&str; 4] = [
    "protocol%20error",
    "Unexpected%20EOF",
    "tonic-web:",
    "Error%20decompressing",
];

/// One log span per RPC (method, org, user, status, duration). It also gives bad input that tonic
/// rejects before our handlers run the status docs/api.md asks for: an over-limit request message
/// (tonic: OUT_OF_RANGE) is RESOURCE_EXHAUSTED; an undecodable or missing message, or a body that
/// is not gRPC (or grpc-web) framing (tonic: INTERNAL), is INVALID_ARGUMENT. Those malformed
/// requests are counted in `/metrics` and logged at most once a second.
async fn rpc_log(req: Request, next: Next) -> Response {
    let method = req.uri().path().to_string();
    let span = tracing::info_span!(
        "rpc",
        method,
        org = tracing::field::Empty,
        user = tracing::field::Empty
    );
    let started = Instant::now();
    let mut res = next.run(req).instrument(span.clone()).await;
    let headers = res.headers_mut();
    let mut code = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .unwrap_or(0);
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let framing = FRAMING_ERRORS.iter().any(|m| message.starts_with(m));
    let malformed = code == tonic::Code::Internal as i32
        && (framing
            || message.starts_with("failed%20to%20decode")
            || message.starts_with("Missing%20request"));
    let remapped = if code == tonic::Code::OutOfRange as i32 {
        Some((
            tonic::Code::ResourceExhausted,
            Some("request%20larger%20than%201%20MiB"),
        ))
    } else if malformed {
        // A framing error keeps tonic's message, which says what is wrong with the stream.
        let message = (!framing).then_some("request%20message%20is%20not%20valid%20protobuf");
        Some((tonic::Code::InvalidArgument, message))
    } else {
        None
    };
    if let Some((new_code, new_message)) = remapped {
        code = new_code as i32;
        headers.insert("grpc-status", HeaderValue::from(code));
        if let Some(m) = new_message {
            headers.insert("grpc-message", HeaderValue::from_static(m));
        }
    }
    let status = tonic::Code::from_i32(code);
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    span.in_scope(|| {
        if malformed {
            METRICS.malformed_requests.inc();
            MALFORMED.log(|suppressed| {
                tracing::warn!(status = ?status, message, suppressed, "malformed request");
            });
        } else if matches!(status, tonic::Code::Internal | tonic::Code::Unknown) {
            RPC_FAILED.log(|suppressed| {
                tracing::warn!(status = ?status, duration_ms = ms, suppressed, "rpc failed");
            });
        } else {
            tracing::info!(status = ?status, duration_ms = ms, "rpc");
        }
    });
    res
}
