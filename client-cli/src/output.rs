//! How results are printed: protobuf canonical JSON lines (`--json`), or one human-readable line
//! per item, colored when stdout is a terminal.
use std::{
    io::{IsTerminal, Write},
    sync::LazyLock,
};

use orgpulse::proto::{Event, Job, JobStatus, Member, Notification, Severity, event::Payload};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

use crate::error::CliError;

static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    DescriptorPool::decode(orgpulse::proto::FILE_DESCRIPTOR_SET).expect("valid descriptor set")
});

/// A message with its protobuf full name, so it can be printed in canonical JSON.
pub trait Named: Message + Sized {
    const NAME: &'static str;
}

impl Named for Event {
    const NAME: &'static str = "orgpulse.v1.Event";
}
impl Named for Job {
    const NAME: &'static str = "orgpulse.v1.Job";
}
impl Named for Notification {
    const NAME: &'static str = "orgpulse.v1.Notification";
}
impl Named for Member {
    const NAME: &'static str = "orgpulse.v1.Member";
}

/// `msg` in protobuf's canonical JSON mapping (lowerCamelCase, 64-bit integers as strings).
pub fn json<M: Named>(msg: &M) -> String {
    let desc = POOL
        .get_message_by_name(M::NAME)
        .expect("message in the descriptor set");
    let dynamic = DynamicMessage::decode(desc, msg.encode_to_vec().as_slice())
        .expect("a message re-decodes with its own descriptor");
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::new(&mut out);
    dynamic
        .serialize_with_options(&mut ser, &SerializeOptions::new())
        .expect("JSON serialization into memory");
    String::from_utf8(out).expect("JSON is UTF-8")
}

/// Where lines go, and how.
pub struct Printer {
    json: bool,
    color: bool,
}

impl Printer {
    pub fn new(json: bool) -> Self {
        let color =
            !json && std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        Printer { json, color }
    }

    pub fn is_json(&self) -> bool {
        self.json
    }

    /// One line on stdout, flushed (so a pipe sees each event at once).
    pub fn line(&self, s: &str) -> Result<(), CliError> {
        let mut out = std::io::stdout().lock();
        match writeln!(out, "{s}").and_then(|_| out.flush()) {
            // The reader is gone (`orgpulse watch | head`): nothing left to do.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
            result => result.map_err(CliError::io("stdout")),
        }
    }

    fn paint(&self, code: &str, s: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }

    /// Prints an event; in human mode heartbeats are skipped.
    pub fn event(&self, ev: &Event) -> Result<(), CliError> {
        if self.json {
            return self.line(&json(ev));
        }
        let Some(p) = &ev.payload else { return Ok(()) };
        let time = ev.time.map(clock).unwrap_or_default();
        let seq = if ev.seq > 0 {
            format!("#{}", ev.seq)
        } else {
            String::new()
        };
        let presence = matches!(p, Payload::UserOnline(_) | Payload::UserOffline(_));
        let by = if ev.actor.is_empty() || presence {
            String::new()
        } else {
            format!(" by {}", ev.actor)
        };
        let (kind, color, what) = match p {
            Payload::JobCreated(j) => ("job created", "32", self.job_text(j)),
            Payload::JobUpdated(j) => ("job updated", "36", self.job_text(j)),
            Payload::JobDeleted(d) => ("job deleted", "31", d.job_id.clone()),
            Payload::NotificationNew(n) => ("notification", "35", self.notification_text(n)),
            Payload::UserOnline(u) => ("online", "32", u.user_id.clone()),
            Payload::UserOffline(u) => ("offline", "2", u.user_id.clone()),
            Payload::Heartbeat(_) => return Ok(()),
            Payload::CaughtUp(_) => ("caught up", "2", String::new()),
            Payload::Resync(r) => ("resync", "33;1", r.reason.clone()),
            Payload::EntityChanged(e) => (
                "entity",
                "34",
                format!("{} {} {}", e.entity_type, e.entity_id, e.action),
            ),
        };
        let line = format!(
            "{time} {seq:>6} {} {what}{by}",
            self.paint(color, &format!("{kind:<12}"))
        );
        self.line(line.trim_end())
    }

    fn job_text(&self, j: &Job) -> String {
        let status = JobStatus::try_from(j.status)
            .map(|s| {
                s.as_str_name()
                    .trim_start_matches("JOB_STATUS_")
                    .to_string()
            })
            .unwrap_or_else(|_| j.status.to_string());
        let mut labels: Vec<_> = j.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let mut s = format!(
            "{} {status} {}% v{} {:?}",
            j.id, j.progress, j.version, j.title
        );
        if !j.message.is_empty() {
            s += &format!(" ({})", j.message);
        }
        if !labels.is_empty() {
            s += &format!(" [{}]", labels.join(","));
        }
        s
    }

    fn notification_text(&self, n: &Notification) -> String {
        let sev = Severity::try_from(n.severity)
            .map(|s| s.as_str_name().trim_start_matches("SEVERITY_").to_string())
            .unwrap_or_default();
        let to = if n.user_id.is_empty() {
            "everyone"
        } else {
            &n.user_id
        };
        let mut s = format!("{} {sev} to {to}: {:?}", n.id, n.title);
        if !n.body.is_empty() {
            s += &format!(" {:?}", n.body);
        }
        s
    }

    pub fn job(&self, j: &Job) -> Result<(), CliError> {
        if self.json {
            self.line(&json(j))
        } else {
            self.line(&self.job_text(j))
        }
    }

    pub fn notification(&self, n: &Notification) -> Result<(), CliError> {
        if self.json {
            return self.line(&json(n));
        }
        let mark = if n.read { " " } else { "*" };
        self.line(&format!("{mark} {}", self.notification_text(n)))
    }

    pub fn member(&self, m: &Member) -> Result<(), CliError> {
        if self.json {
            return self.line(&json(m));
        }
        let since = m.online_since.map(|t| t.to_string()).unwrap_or_default();
        let streams = if m.connections == 1 {
            "stream"
        } else {
            "streams"
        };
        self.line(&format!(
            "{} online since {since} ({} {streams})",
            m.user_id, m.connections
        ))
    }
}

/// The time of day (UTC) with milliseconds: `14:03:09.564Z`.
fn clock(t: prost_types::Timestamp) -> String {
    let secs = t.seconds.rem_euclid(86_400);
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    format!("{h:02}:{m:02}:{s:02}.{:03}Z", t.nanos / 1_000_000)
}

/// A status line on stderr (connection states, cursors, counts): never mixed into stdout.
pub fn note(s: &str) {
    eprintln!("orgpulse: {s}");
}

#[cfg(test)]
mod tests {
    use orgpulse::proto::CaughtUp;

    use super::*;

    #[test]
    fn events_print_as_canonical_json() {
        let ev = Event {
            cursor: "c1".into(),
            seq: 42,
            org_id: "acme".into(),
            time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            actor: "alice".into(),
            payload: Some(Payload::JobCreated(Job {
                id: "j1".into(),
                status: JobStatus::Queued as i32,
                ..Default::default()
            })),
        };
        let v: serde_json::Value = serde_json::from_str(&json(&ev)).unwrap();
        assert_eq!(v["seq"], "42");
        assert_eq!(v["orgId"], "acme");
        assert_eq!(v["time"], "2023-11-14T22:13:20Z");
        assert_eq!(v["jobCreated"]["status"], "JOB_STATUS_QUEUED");
        let caught_up = Event {
            payload: Some(Payload::CaughtUp(CaughtUp {})),
            ..Default::default()
        };
        assert_eq!(json(&caught_up), r#"{"caughtUp":{}}"#);
        let t = prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 564_000_000,
        };
        assert_eq!(clock(t), "22:13:20.564Z");
    }
}
