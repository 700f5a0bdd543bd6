//! `EventService.Publish`: a change of one of the product's own entities, appended to the org's
//! log as an `entity_changed` event (validate -> authorize -> Store, which commits and publishes).
use std::sync::Arc;

use orgpulse::proto::{EntityChanged, PublishRequest, PublishResponse};
use tonic::{Request, Response, Status};

use super::Ctx;
use crate::{
    audience::{self, Audience},
    auth::Need,
    cursor::Cursor,
    store::{NewEntityChange, model::RequestKind},
    validate,
};

pub async fn publish(
    ctx: Arc<Ctx>,
    req: Request<PublishRequest>,
) -> Result<Response<PublishResponse>, Status> {
    let (claims, org) = ctx.authorize(&req, &req.get_ref().org_id, Need::Publish)?;
    let r = req.into_inner();
    let change = EntityChanged {
        entity_type: r.entity_type,
        entity_id: r.entity_id,
        action: r.action,
        data: r.data,
        user_id: r.user_id,
    };
    validate::entity_change(&change)?;
    validate::request_id(&r.request_id)?;
    audience::event_topics("topics", &r.topics)?;
    let audience = Audience::from_request(r.audience.as_ref(), &change.user_id)?;
    let appended = ctx
        .store
        .entities
        .append_entity_changes(vec![NewEntityChange {
            org: org.clone(),
            actor: claims.user,
            change,
            audience,
            topics: r.topics,
            request_kind: RequestKind::Publish,
            request_id: r.request_id,
        }])
        .await?;
    let seq = appended
        .first()
        .copied()
        .ok_or_else(|| Status::internal("the store appended nothing"))?;
    let cursor = Cursor {
        epoch: ctx.store.log.org_epoch(&org),
        seq,
    }
    .encode();
    Ok(Response::new(PublishResponse { seq, cursor }))
}
