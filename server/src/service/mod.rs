//! The gRPC service implementations. They are thin: authorize -> validate -> Store (which commits
//! and publishes) -> answer. Delivery lives in the Hub and in `events`. The one place where store
//! and validation errors become gRPC statuses.
pub mod activity;
pub mod events;
pub mod jobs;
pub mod notifications;
pub mod publish;
pub mod stream_body;

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tonic::{Request, Status};

use crate::{
    activity::Activity,
    auth::{Claims, Need},
    bus::Bus,
    hub::Hub,
    presence::Presence,
    store::{Store, StoreError},
    user_slots::UserSlots,
    validate::Invalid,
};

/// What every service needs.
pub struct Ctx {
    pub store: Store,
    pub hub: Hub,
    pub presence: Arc<dyn Presence>,
    /// Presence state per topic and broadcasts.
    pub activity: Arc<Activity>,
    /// This node's id and its bus, for `/metrics`.
    pub node_id: String,
    pub bus: Arc<dyn Bus>,
    pub heartbeat: Duration,
    /// Open `Subscribe` streams per user, against `--max-streams-per-user`.
    pub streams: UserSlots,
    /// Waiting `Poll` calls per user, against `--max-polls-per-user`.
    pub polls: UserSlots,
    /// Cancelled when the server shuts down: a waiting Poll answers at once and background loops
    /// stop (open streams are ended by `Hub::shut_down`).
    pub shutdown: CancellationToken,
}

impl Ctx {
    /// The call's caller (verified by the request gate before its body was read), the org it
    /// acts in and the role check; records both in the RPC's log span.
    pub fn authorize<T>(
        &self,
        req: &Request<T>,
        org_id: &str,
        need: Need,
    ) -> Result<(Claims, String), Status> {
        let claims = crate::request_gate::caller(req.extensions())?;
        let span = tracing::Span::current();
        span.record("user", claims.user.as_str());
        let org = claims.org_for(org_id)?;
        span.record("org", org.as_str());
        claims.require(need)?;
        Ok((claims, org))
    }
}

/// A page token (the id to continue after), validated.
pub fn page_token(token: &str) -> Result<Option<String>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    crate::validate::object_id("page_token", token)
        .map_err(|_| Status::invalid_argument("page_token is not one this server returned"))?;
    Ok(Some(token.to_string()))
}

/// The gRPC status of a store error (the store speaks its own; only the services speak gRPC).
impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        match e {
            StoreError::NotFound(m) => Status::not_found(m),
            StoreError::FailedPrecondition(m) => Status::failed_precondition(m),
            StoreError::Aborted(m) => Status::aborted(m),
            StoreError::Unavailable(m) => Status::unavailable(m),
            StoreError::Internal(m) => {
                tracing::error!(error = %m, "storage error");
                Status::internal("storage error")
            }
        }
    }
}

/// Input that breaks a rule of docs/api.md is INVALID_ARGUMENT.
impl From<Invalid> for Status {
    fn from(e: Invalid) -> Status {
        Status::invalid_argument(e.0)
    }
}
