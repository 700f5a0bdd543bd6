//! The EventService commands: `watch` (the reconnecting stream), `poll`, `online` and `publish`.
use std::time::Duration;

use futures::StreamExt;
use orgpulse::{
    client::{Client, WatchFilter, WatchItem},
    proto::{ListOnlineRequest, PollRequest, PublishRequest},
};

use crate::{
    cli::{Kind, OrgArg, PollArgs, PublishArgs, WatchArgs},
    cursor::Position,
    error::CliError,
    output::{Printer, note, struct_from_json},
};

fn kinds(kinds: &[Kind]) -> Vec<i32> {
    kinds.iter().map(|k| k.proto() as i32).collect()
}

/// Prints every event until an unrecoverable error (the watch itself never gives up otherwise).
pub async fn watch(client: &Client, args: WatchArgs, out: &Printer) -> Result<(), CliError> {
    let pos = Position::load(&args.filter.from)?;
    let filter = WatchFilter {
        org_id: args.filter.org.org,
        kinds: args.filter.kinds.iter().map(|k| k.proto()).collect(),
        entity_types: args.filter.types,
        topics: args.filter.topics,
    };
    let mut events = client.watch(filter, pos.start.clone());
    while let Some(item) = events.next().await {
        match item? {
            WatchItem::State(state) => note(&state.to_string()),
            WatchItem::Event(ev) => {
                // Printed before the cursor is saved: a crash in between repeats one event on
                // the next run rather than losing it.
                out.event(&ev)?;
                pos.save(&ev.cursor)?;
            }
        }
    }
    Ok(())
}

/// One `Poll`, or endless long-polling with `--follow`.
pub async fn poll(client: &Client, args: PollArgs, out: &Printer) -> Result<(), CliError> {
    let pos = Position::load(&args.filter.from)?;
    let mut cursor = pos.start.clone().unwrap_or_default();
    let default_wait = if args.follow {
        Duration::from_secs(25)
    } else {
        Duration::ZERO
    };
    let wait_ms = args.wait.unwrap_or(default_wait).as_millis().min(30_000) as u32;
    loop {
        let resp = client
            .poll(PollRequest {
                org_id: args.filter.org.org.clone(),
                kinds: kinds(&args.filter.kinds),
                after_cursor: cursor.clone(),
                max_events: args.max,
                wait_ms,
                entity_types: args.filter.types.clone(),
                topics: args.filter.topics.clone(),
            })
            .await?;
        if resp.resync {
            note("resync: the cursor could not be served; continuing from the current position");
        }
        for ev in &resp.events {
            out.event(ev)?;
        }
        cursor = resp.cursor;
        pos.save(&cursor)?;
        if !args.follow {
            note(&poll_summary(
                resp.events.len(),
                &cursor,
                pos.start.is_none(),
            ));
            return Ok(());
        }
    }
}

/// What a one-shot poll did, for stderr: how many events, the cursor to continue from and, when
/// it started without a cursor (so at the newest event) and found nothing, how to see some.
fn poll_summary(events: usize, cursor: &str, from_now: bool) -> String {
    if events == 0 && from_now {
        format!(
            "no events: without --cursor or --cursor-file a poll starts at the newest event. \
             Next cursor {cursor}: poll again with --cursor {cursor}, keep it with --cursor-file \
             FILE, or add --follow to wait for new events"
        )
    } else {
        format!("{events} event(s); next cursor {cursor}")
    }
}

/// Lists the online members.
pub async fn online(client: &Client, org: OrgArg, out: &Printer) -> Result<(), CliError> {
    let resp = client
        .list_online(ListOnlineRequest { org_id: org.org })
        .await?;
    for m in &resp.members {
        out.member(m)?;
    }
    Ok(())
}

/// Publishes one entity change; prints its seq and cursor.
pub async fn publish(client: &Client, args: PublishArgs, out: &Printer) -> Result<(), CliError> {
    let data = struct_from_json(&args.data)
        .map_err(|e| CliError::usage(format!("--data must be a JSON object: {e}")))?;
    let resp = client
        .publish(PublishRequest {
            org_id: args.org.org,
            entity_type: args.entity_type,
            entity_id: args.id,
            action: args.action,
            data: Some(data),
            user_id: args.user,
            request_id: args.request_id.unwrap_or_default(),
            audience: args.audience.proto(),
            topics: args.topics,
        })
        .await?;
    out.published(&resp)
}
