//! Who is doing what: `presence set` (once, or held until Ctrl-C and then cleared), `presence
//! clear`, `presence list` and `broadcast`. None of these is stored by the server: presence entries
//! expire after their TTL, broadcasts reach only the streams open at that moment.
use std::time::Duration;

use orgpulse::{
    client::{Client, ErrorClass},
    proto::{BroadcastRequest, ListPresenceRequest, SetPresenceRequest},
};
use tokio::{
    signal::unix::{Signal, SignalKind, signal},
    time::MissedTickBehavior,
};

use crate::{
    cli::{BroadcastArgs, PresenceCommand},
    error::CliError,
    output::{Printer, note, struct_from_json},
};

pub async fn run(client: &Client, cmd: PresenceCommand, out: &Printer) -> Result<(), CliError> {
    match cmd {
        PresenceCommand::Set {
            topic,
            state,
            ttl,
            audience,
            hold,
        } => {
            let state = struct_from_json(&state)
                .map_err(|e| CliError::usage(format!("--state must be a JSON object: {e}")))?;
            if state.fields.is_empty() {
                return Err(CliError::usage(
                    "--state is empty: give a JSON object with fields, or use `presence clear`",
                ));
            }
            // 0 would mean the server's default, not what was asked (the server takes 1s-120s).
            if ttl < Duration::from_millis(1) {
                return Err(CliError::usage("--ttl must be at least 1s"));
            }
            let req = SetPresenceRequest {
                org_id: topic.org.org,
                topic: topic.topic,
                state: Some(state),
                audience: audience.proto(),
                ttl_ms: u32::try_from(ttl.as_millis()).unwrap_or(u32::MAX),
            };
            if hold {
                return self::hold(client, req, ttl).await;
            }
            let topic = req.topic.clone();
            client.set_presence(req).await?;
            note(&format!(
                "presence set on {topic}; it expires in {}",
                humantime::format_duration(ttl)
            ));
            Ok(())
        }
        PresenceCommand::Clear { topic } => {
            clear(client, topic.org.org, topic.topic.clone()).await?;
            note(&format!("presence cleared on {}", topic.topic));
            Ok(())
        }
        PresenceCommand::List { org, topic } => {
            let resp = client
                .list_presence(ListPresenceRequest {
                    org_id: org.org,
                    topic,
                })
                .await?;
            for e in &resp.entries {
                out.presence_entry(e)?;
            }
            Ok(())
        }
    }
}

/// Removes the caller's entry on `topic` (an empty state).
async fn clear(client: &Client, org_id: String, topic: String) -> Result<(), CliError> {
    client
        .set_presence(SetPresenceRequest {
            org_id,
            topic,
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// Sets `req` every `ttl / 2` until SIGINT or SIGTERM, then clears it. A refresh that fails for
/// want of a server (or over the rate limit) is retried at the next tick; any other failure ends
/// the hold. A second signal while clearing gives up on the clear: the entry then expires by
/// itself within the TTL.
async fn hold(client: &Client, req: SetPresenceRequest, ttl: Duration) -> Result<(), CliError> {
    let mut stop = Stop::new()?;
    let mut ticks = tokio::time::interval(ttl / 2);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut held = false;
    loop {
        let refreshed = tokio::select! {
            _ = stop.signalled() => break,
            r = async {
                ticks.tick().await;
                client.set_presence(req.clone()).await
            } => r,
        };
        match refreshed {
            Ok(_) if !held => {
                held = true;
                note(&format!(
                    "presence held on {} (set again every {}); Ctrl-C clears it",
                    req.topic,
                    humantime::format_duration(ttl / 2)
                ));
            }
            Ok(_) => {}
            Err(e) if e.class() == ErrorClass::Unavailable => {
                note(&format!("could not set the presence ({e}); trying again"));
            }
            Err(e) => return Err(e.into()),
        }
    }
    tokio::select! {
        r = clear(client, req.org_id.clone(), req.topic.clone()) => r?,
        _ = stop.signalled() => {
            note("not cleared: the entry expires by itself within the TTL");
            return Ok(());
        }
    }
    note(&format!("presence cleared on {}", req.topic));
    Ok(())
}

/// SIGINT (Ctrl-C) or SIGTERM, caught from its creation on.
struct Stop {
    int: Signal,
    term: Signal,
}

impl Stop {
    fn new() -> Result<Stop, CliError> {
        Ok(Stop {
            int: signal(SignalKind::interrupt()).map_err(CliError::io("SIGINT handler"))?,
            term: signal(SignalKind::terminate()).map_err(CliError::io("SIGTERM handler"))?,
        })
    }

    /// Waits for the next of either signal.
    async fn signalled(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

/// Sends one broadcast.
pub async fn broadcast(client: &Client, args: BroadcastArgs) -> Result<(), CliError> {
    let data = struct_from_json(&args.data)
        .map_err(|e| CliError::usage(format!("--data must be a JSON object: {e}")))?;
    client
        .broadcast(BroadcastRequest {
            org_id: args.topic.org.org,
            topic: args.topic.topic,
            data: Some(data),
            audience: args.audience.proto(),
        })
        .await?;
    note("sent to the streams open now");
    Ok(())
}
