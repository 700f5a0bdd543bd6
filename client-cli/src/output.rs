//! How results are printed: protobuf canonical JSON lines (`--json`), or one human-readable line
//! per item, colored when stdout is a terminal; and JSON input (`publish --data`) read with the
//! same mapping.
use std::{
    io::{IsTerminal, Write},
    sync::LazyLock,
};

use orgpulse::proto::{
    EntityChanged, Event, Job, JobStatus, Member, Notification, PresenceEntry, PublishResponse,
    Severity, event::Payload,
};
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
impl Named for PresenceEntry {
    const NAME: &'static str = "orgpulse.v1.PresenceEntry";
}
impl Named for PublishResponse {
    const NAME: &'static str = "orgpulse.v1.PublishResponse";
}
impl Named for prost_types::Struct {
    const NAME: &'static str = "google.protobuf.Struct";
}

/// A JSON object as a `google.protobuf.Struct` (protobuf's JSON mapping of Struct is the object
/// itself).
pub fn struct_from_json(text: &str) -> Result<prost_types::Struct, String> {
    let desc = POOL
        .get_message_by_name(prost_types::Struct::NAME)
        .expect("Struct in the descriptor set");
    let mut de = serde_json::Deserializer::from_str(text);
    let dynamic = DynamicMessage::deserialize(desc, &mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    dynamic.transcode_to().map_err(|e| e.to_string())
}

/// Longest entity data shown in a human-readable line.
const DATA_SHOWN: usize = 200;

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
        // These lines name their user (and the last two their topic) already.
        let activity = matches!(p, Payload::PresenceState(_) | Payload::Broadcast(_));
        let presence = matches!(p, Payload::UserOnline(_) | Payload::UserOffline(_)) || activity;
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
            Payload::EntityChanged(e) => ("entity", "34", entity_text(e)),
            Payload::PresenceState(p) => {
                match p.state.as_ref().is_some_and(|d| !d.fields.is_empty()) {
                    true => (
                        "presence",
                        "36",
                        format!(
                            "{} on {}{}",
                            p.user_id,
                            p.topic,
                            data_text(p.state.as_ref())
                        ),
                    ),
                    false => ("presence", "2", format!("{} left {}", p.user_id, p.topic)),
                }
            }
            Payload::Broadcast(b) => (
                "broadcast",
                "35",
                format!("{} on {}{}", b.user_id, b.topic, data_text(b.data.as_ref())),
            ),
        };
        let topics = if ev.topics.is_empty() || activity {
            String::new()
        } else {
            format!(" [{}]", ev.topics.join(","))
        };
        let line = format!(
            "{time} {seq:>6} {} {what}{by}{topics}",
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

    /// What `publish` prints: the event's seq and cursor.
    pub fn published(&self, p: &PublishResponse) -> Result<(), CliError> {
        if self.json {
            self.line(&json(p))
        } else {
            self.line(&format!("#{} cursor {}", p.seq, p.cursor))
        }
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

    /// `alice on job:1 {"viewing":true} (updated 14:03:09.564Z)`.
    pub fn presence_entry(&self, e: &PresenceEntry) -> Result<(), CliError> {
        if self.json {
            return self.line(&json(e));
        }
        let updated = e
            .updated_at
            .map(|t| format!(" (updated {})", clock(t)))
            .unwrap_or_default();
        self.line(&format!(
            "{} on {}{}{updated}",
            e.user_id,
            e.topic,
            data_text(e.state.as_ref())
        ))
    }
}

/// `invoice inv_1 paid {"amount":12} for bob`: type, id, action, compact data (cut at
/// DATA_SHOWN characters), and the addressee when there is one.
fn entity_text(e: &EntityChanged) -> String {
    let mut s = format!("{} {} {}", e.entity_type, e.entity_id, e.action);
    s += &data_text(e.data.as_ref());
    if !e.user_id.is_empty() {
        s += &format!(" for {}", e.user_id);
    }
    s
}

/// ` {json}` of a Struct with fields (cut after DATA_SHOWN characters), else nothing.
fn data_text(data: Option<&prost_types::Struct>) -> String {
    let Some(data) = data.filter(|d| !d.fields.is_empty()) else {
        return String::new();
    };
    let text = plain_json(data).to_string();
    match text.char_indices().nth(DATA_SHOWN) {
        Some((cut, _)) => format!(" {}…", &text[..cut]),
        None => format!(" {text}"),
    }
}

/// A Struct as plain JSON, whole numbers without a fraction (`12`, not `12.0`).
fn plain_json(s: &prost_types::Struct) -> serde_json::Value {
    use prost_types::value::Kind;
    fn value(v: &prost_types::Value) -> serde_json::Value {
        match &v.kind {
            None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
            Some(Kind::BoolValue(b)) => (*b).into(),
            Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() < 9e15 => (*n as i64).into(),
            Some(Kind::NumberValue(n)) => (*n).into(),
            Some(Kind::StringValue(s)) => s.as_str().into(),
            Some(Kind::ListValue(l)) => l.values.iter().map(value).collect(),
            Some(Kind::StructValue(s)) => plain_json(s),
        }
    }
    s.fields
        .iter()
        .map(|(k, v)| (k.clone(), value(v)))
        .collect()
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
            topics: vec![],
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

    #[test]
    fn entity_data_is_read_and_shown_as_json() {
        let data = struct_from_json(r#"{"amount": 12, "who": {"name": "bob"}}"#).unwrap();
        let e = EntityChanged {
            entity_type: "invoice".into(),
            entity_id: "inv_1".into(),
            action: "paid".into(),
            data: Some(data),
            user_id: "bob".into(),
        };
        assert_eq!(
            entity_text(&e),
            r#"invoice inv_1 paid {"amount":12,"who":{"name":"bob"}} for bob"#
        );
        assert!(struct_from_json("[1]").is_err());
        assert!(struct_from_json("{} x").is_err());
        let long = struct_from_json(&format!(r#"{{"x":"{}"}}"#, "y".repeat(500))).unwrap();
        let shown = entity_text(&EntityChanged {
            data: Some(long),
            ..Default::default()
        });
        assert!(
            shown.ends_with('…') && shown.chars().count() < 220,
            "{shown}"
        );
    }
}
