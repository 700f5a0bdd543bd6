//! The gate in front of every gRPC service, native and grpc-web alike (docs/api.md "Limits before
//! authentication"). A call's bearer token is verified on its head, before a byte of its body is
//! read: a call without a valid token is answered UNAUTHENTICATED at once and its body is never
//! buffered; the verified [`Claims`] ride in the request's extensions, so the handler does not
//! verify again. gRPC health and reflection are open without a token. Every admitted body then
//! counts against the node's `--max-request-buffer` while it is being received (beyond it:
//! RESOURCE_EXHAUSTED) and must be complete within [`BODY_TIMEOUT`]; either way a refused body is
//! dropped, its memory released.
use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use axum::{
    body::Body,
    extract::{Request, State},
    middleware::Next,
    response::Response,
};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tonic::Status;

use crate::{
    auth::{Authenticator, Claims},
    metrics::METRICS,
};

/// How long a request body may take to arrive in full.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Services a caller without a token may use (their requests are bounded like any other).
const OPEN_SERVICES: [&str; 3] = [
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// What the gate needs: the authenticator and the node's body budget.
pub struct Gate {
    auth: Authenticator,
    budget: Arc<Budget>,
}

impl Gate {
    pub fn new(auth: Authenticator, max_request_buffer: usize) -> Arc<Self> {
        Arc::new(Gate {
            auth,
            budget: Arc::new(Budget {
                max: max_request_buffer,
                held: AtomicUsize::new(0),
            }),
        })
    }
}

/// The gate, as an axum middleware.
pub async fn gate(State(gate): State<Arc<Gate>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if !OPEN_SERVICES.iter().any(|open| path.starts_with(open)) {
        match gate.auth.authenticate(req.headers()).await {
            Ok(claims) => {
                req.extensions_mut().insert(claims);
            }
            Err(status) => {
                METRICS.unauthenticated_refusals.inc();
                return refuse(status);
            }
        }
    }
    if gate.budget.held.load(Relaxed) >= gate.budget.max {
        METRICS.request_buffer_refusals.inc();
        return refuse(Budget::exhausted());
    }
    let budget = gate.budget.clone();
    next.run(req.map(|body| Body::new(GatedBody::new(body, budget))))
        .await
}

/// The verified caller the gate put in a call's extensions.
pub fn caller(extensions: &http::Extensions) -> Result<Claims, Status> {
    extensions
        .get::<Claims>()
        .cloned()
        .ok_or_else(|| Status::internal("the call did not pass the authentication gate"))
}

/// A trailers-only gRPC answer (tonic-web turns it into grpc-web for grpc-web callers).
fn refuse(status: Status) -> Response {
    status.into_http::<Body>()
}

/// Bytes of request bodies being received on this node, against `--max-request-buffer`.
struct Budget {
    max: usize,
    held: AtomicUsize,
}

impl Budget {
    fn exhausted() -> Status {
        Status::resource_exhausted(
            "the server is receiving too many request bodies (--max-request-buffer); retry later",
        )
    }

    /// Takes `n` more bytes for a body; false (nothing taken) when that would exceed the budget.
    fn take(&self, n: usize) -> bool {
        self.held
            .fetch_update(Relaxed, Relaxed, |held| {
                held.checked_add(n).filter(|&after| after <= self.max)
            })
            .is_ok()
    }
}

/// A request body counted against the budget until it ends or is dropped, and failed when it is
/// not complete within [`BODY_TIMEOUT`] of the call's start.
struct GatedBody {
    inner: Body,
    budget: Arc<Budget>,
    /// Bytes of this body taken from the budget.
    held: usize,
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// The body ended (or failed): nothing more is read from it.
    done: bool,
}

impl GatedBody {
    fn new(inner: Body, budget: Arc<Budget>) -> Self {
        GatedBody {
            inner,
            budget,
            held: 0,
            deadline: Box::pin(tokio::time::sleep(BODY_TIMEOUT)),
            done: false,
        }
    }

    /// Gives this body's bytes back to the budget and stops reading it.
    fn end(&mut self) {
        self.budget.held.fetch_sub(self.held, Relaxed);
        self.held = 0;
        self.done = true;
    }

    fn fail(&mut self, status: Status) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.end();
        Poll::Ready(Some(Err(status)))
    }
}

impl http_body::Body for GatedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => {
                ready!(this.deadline.as_mut().poll(cx));
                METRICS.body_timeouts.inc();
                return this.fail(Status::deadline_exceeded(format!(
                    "the request body was not complete within {} s",
                    BODY_TIMEOUT.as_secs()
                )));
            }
            Poll::Ready(None) => {
                this.end();
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(e))) => return this.fail(Status::from_error(e.into())),
            Poll::Ready(Some(Ok(frame))) => frame,
        };
        if let Some(data) = frame.data_ref() {
            if !this.budget.take(data.len()) {
                METRICS.request_buffer_refusals.inc();
                return this.fail(Budget::exhausted());
            }
            this.held += data.len();
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for GatedBody {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.held, Relaxed);
    }
}
