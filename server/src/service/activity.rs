//! `EventService.SetPresence`, `ListPresence` and `Broadcast`: validate -> authorize -> the
//! node's `Activity` engine (presence state and broadcast, never stored).
use std::{sync::Arc, time::Duration};

use orgpulse::proto::{
    BroadcastRequest, BroadcastResponse, ListPresenceRequest, ListPresenceResponse,
    SetPresenceRequest, SetPresenceResponse,
};
use prost::Message;
use prost_types::Struct;
use tonic::{Request, Response, Status};

use super::Ctx;
use crate::{
    activity::{DEFAULT_TTL, MAX_BROADCAST_DATA, MAX_STATE, MAX_TTL, MIN_TTL, Refused},
    audience::{self, Audience},
    auth::Need,
    validate::{self, Invalid},
};

impl From<Refused> for Status {
    fn from(r: Refused) -> Status {
        match r {
            Refused::Exhausted(m) => Status::resource_exhausted(m),
        }
    }
}

/// A presence state or broadcast data: at most `max` bytes encoded, 32 levels deep.
fn small_struct(field: &str, s: Option<Struct>, max: usize) -> Result<Struct, Invalid> {
    let s = s.unwrap_or_default();
    let len = s.encoded_len();
    if len > max {
        return Err(Invalid::new(format!(
            "{field} is {len} bytes encoded; at most {max} allowed"
        )));
    }
    validate::struct_depth(field, &s)?;
    Ok(s)
}

pub async fn set_presence(
    ctx: Arc<Ctx>,
    req: Request<SetPresenceRequest>,
) -> Result<Response<SetPresenceResponse>, Status> {
    let (claims, org) = ctx.authorize(&req, &req.get_ref().org_id, Need::Read)?;
    let r = req.into_inner();
    audience::name("topic", &r.topic)?;
    let state = small_struct("state", r.state, MAX_STATE)?;
    let ttl = match r.ttl_ms {
        0 => DEFAULT_TTL,
        ms => Duration::from_millis(ms.into()),
    };
    if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
        return Err(Status::invalid_argument(format!(
            "ttl_ms must be between {} and {} (0 = {})",
            MIN_TTL.as_millis(),
            MAX_TTL.as_millis(),
            DEFAULT_TTL.as_millis()
        )));
    }
    let audience = Audience::from_request(r.audience.as_ref(), "")?;
    ctx.activity
        .set_presence(&org, &claims.viewer(), &r.topic, state, audience, ttl)?;
    Ok(Response::new(SetPresenceResponse {}))
}

pub async fn list_presence(
    ctx: Arc<Ctx>,
    req: Request<ListPresenceRequest>,
) -> Result<Response<ListPresenceResponse>, Status> {
    let (claims, org) = ctx.authorize(&req, &req.get_ref().org_id, Need::Read)?;
    let topic = &req.get_ref().topic;
    if !topic.is_empty() {
        audience::name("topic", topic)?;
    }
    let entries = ctx.activity.list(&org, &claims.viewer(), topic);
    Ok(Response::new(ListPresenceResponse { entries }))
}

pub async fn broadcast(
    ctx: Arc<Ctx>,
    req: Request<BroadcastRequest>,
) -> Result<Response<BroadcastResponse>, Status> {
    let (claims, org) = ctx.authorize(&req, &req.get_ref().org_id, Need::Read)?;
    let r = req.into_inner();
    audience::name("topic", &r.topic)?;
    let data = small_struct("data", r.data, MAX_BROADCAST_DATA)?;
    let audience = Audience::from_request(r.audience.as_ref(), "")?;
    ctx.activity
        .broadcast(&org, &claims.viewer(), &r.topic, data, audience)?;
    Ok(Response::new(BroadcastResponse {}))
}
