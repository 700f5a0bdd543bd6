//! The `notify` commands (NotificationService).
use orgpulse::{
    client::Client,
    proto::{ListNotificationsRequest, MarkReadRequest, SendNotificationRequest},
};

use crate::{
    cli::NotifyCommand,
    error::CliError,
    output::{Printer, note},
};

pub async fn run(client: &Client, cmd: NotifyCommand, out: &Printer) -> Result<(), CliError> {
    match cmd {
        NotifyCommand::Send {
            org,
            user,
            title,
            body,
            severity,
            request_id,
        } => {
            let n = client
                .send_notification(SendNotificationRequest {
                    org_id: org.org,
                    user_id: user,
                    title,
                    body,
                    severity: severity.proto() as i32,
                    request_id: request_id.unwrap_or_default(),
                })
                .await?;
            out.notification(&n)
        }
        NotifyCommand::List { org, unread } => {
            let mut req = ListNotificationsRequest {
                org_id: org.org,
                unread_only: unread,
                page_size: 0,
                page_token: String::new(),
            };
            loop {
                let page = client.list_notifications(req.clone()).await?;
                for n in &page.notifications {
                    out.notification(n)?;
                }
                if page.next_page_token.is_empty() {
                    note(&format!("{} unread", page.unread_count));
                    return Ok(());
                }
                req.page_token = page.next_page_token;
            }
        }
        NotifyCommand::Read { org, ids } => {
            let resp = client
                .mark_read(MarkReadRequest {
                    org_id: org.org,
                    notification_ids: ids,
                })
                .await?;
            if out.is_json() {
                out.line(&format!("{{\"unreadCount\":{}}}", resp.unread_count))
            } else {
                out.line(&format!("{} unread", resp.unread_count))
            }
        }
    }
}
