//! NotificationService: send to one member or the whole org, list with per-user read state, mark read.
use std::sync::Arc;

use orgpulse::proto::{
    ListNotificationsRequest, ListNotificationsResponse, MarkReadRequest, MarkReadResponse,
    Notification, SendNotificationRequest, Severity,
    notification_service_server::NotificationService,
};
use tonic::{Request, Response, Status};

use super::{Ctx, page_token};
use crate::{auth::Need, store::NewNotification, validate};

pub struct Notifications(pub Arc<Ctx>);

#[tonic::async_trait]
impl NotificationService for Notifications {
    async fn send_notification(
        &self,
        req: Request<SendNotificationRequest>,
    ) -> Result<Response<Notification>, Status> {
        let (claims, org) = self.0.authorize(&req, &req.get_ref().org_id, Need::Admin)?;
        let r = req.into_inner();
        if !r.user_id.is_empty() {
            validate::id("user_id", &r.user_id)?;
        }
        validate::text("title", &r.title, 1, validate::MAX_TITLE)?;
        validate::text("body", &r.body, 0, validate::MAX_BODY)?;
        validate::request_id(&r.request_id)?;
        let severity = match Severity::try_from(r.severity) {
            Ok(Severity::Unspecified) => Severity::Info,
            Ok(s) => s,
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "severity {} is not a severity",
                    r.severity
                )));
            }
        };
        let new = NewNotification {
            user_id: r.user_id,
            title: r.title,
            body: r.body,
            severity: severity as i32,
            request_id: r.request_id,
        };
        Ok(Response::new(
            self.0
                .store
                .entities
                .send_notification(&org, &claims.user, new)
                .await?,
        ))
    }

    async fn list_notifications(
        &self,
        req: Request<ListNotificationsRequest>,
    ) -> Result<Response<ListNotificationsResponse>, Status> {
        let (claims, org) = self.0.authorize(&req, &req.get_ref().org_id, Need::Read)?;
        let r = req.into_inner();
        let limit = validate::page_size(r.page_size)?;
        let after = page_token(&r.page_token)?;
        let page = self
            .0
            .store
            .entities
            .list_notifications(&org, &claims.user, r.unread_only, limit, after)
            .await?;
        Ok(Response::new(ListNotificationsResponse {
            notifications: page.notifications,
            next_page_token: page.next.unwrap_or_default(),
            unread_count: page.unread,
        }))
    }

    async fn mark_read(
        &self,
        req: Request<MarkReadRequest>,
    ) -> Result<Response<MarkReadResponse>, Status> {
        let (claims, org) = self.0.authorize(&req, &req.get_ref().org_id, Need::Write)?;
        let r = req.into_inner();
        if r.notification_ids.len() > validate::MAX_MARK {
            return Err(Status::invalid_argument(format!(
                "at most {} notification_ids per call",
                validate::MAX_MARK
            )));
        }
        for id in &r.notification_ids {
            validate::object_id("notification_id", id)?;
        }
        let unread = self
            .0
            .store
            .entities
            .mark_read(&org, &claims.user, r.notification_ids)
            .await?;
        Ok(Response::new(MarkReadResponse {
            unread_count: unread,
        }))
    }
}
