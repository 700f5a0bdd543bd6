//! The command line: global options, every subcommand and its flags, and the help texts.
use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use orgpulse::proto::{EventKind, JobStatus, Severity};

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  other error (server error, I/O)
  2  usage: bad flags or arguments, or the server rejected the request as invalid
  3  auth: missing, invalid or expired token, or not allowed
  4  not found
  5  conflict: version mismatch or illegal status transition
  6  unavailable: no server reachable";

const MAIN_EXAMPLES: &str = "\
Examples:
  export ORGPULSE_SERVER=http://127.0.0.1:8080
  export ORGPULSE_TOKEN=$(orgpulse token mint --secret-file ./jwt-secret --org acme --user alice --role admin)
  orgpulse watch
  orgpulse jobs create --title 'nightly build' --label team=ci
  orgpulse jobs update 01JD9X... --status running --progress 40
  orgpulse notify send --title 'deploy done' --severity success
  orgpulse publish --type invoice --id inv_1 --action paid --data '{\"amount\":12}'
  orgpulse presence set --topic job:01JD9X --state '{\"viewing\":true}' --hold
  orgpulse broadcast --topic job:01JD9X --data '{\"typing\":true}'
  orgpulse watch --json --cursor-file ~/.orgpulse-cursor | jq -c .";

/// The orgpulse command-line client: watch an org's events live, manage jobs and notifications.
///
/// The token comes from one of --token, --token-file and --token-command; without any of them,
/// from $ORGPULSE_TOKEN_FILE, else $ORGPULSE_TOKEN. A token file or command is read again
/// whenever the token expires, so a long-running `watch` survives token rotation.
#[derive(Parser, Debug)]
#[command(name = "orgpulse", version, after_help = format!("{MAIN_EXAMPLES}\n\n{EXIT_CODES}"))]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Args, Debug)]
#[command(next_help_heading = "Global options")]
pub struct Global {
    /// Server URL; repeat (or comma-separate) to fail over to the next one when one is down or hangs.
    #[arg(
        long = "server",
        env = "ORGPULSE_SERVER",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8080",
        value_parser = server_url,
        global = true
    )]
    pub servers: Vec<String>,
    /// PEM certificate to trust for https:// servers, besides the system's roots.
    #[arg(long, env = "ORGPULSE_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// Bearer token (JWT) [env: ORGPULSE_TOKEN].
    #[arg(long, global = true)]
    pub token: Option<String>,
    /// File holding the token; re-read whenever the token expires [env: ORGPULSE_TOKEN_FILE].
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
    /// Shell command printing the token on stdout; re-run whenever the token expires.
    #[arg(long, global = true)]
    pub token_command: Option<String>,
    /// Machine-readable output: one JSON object per line (protobuf's canonical JSON mapping).
    #[arg(long, global = true)]
    pub json: bool,
    /// First reconnect/retry delay bound (exponential backoff with full jitter).
    #[arg(long, default_value = "100ms", value_parser = duration, global = true)]
    pub backoff_initial: Duration,
    /// Largest reconnect/retry delay.
    #[arg(long, default_value = "10s", value_parser = duration, global = true)]
    pub backoff_max: Duration,
    /// Attempts of a read or idempotent write before giving up on an unreachable server.
    #[arg(long, default_value_t = 4, global = true)]
    pub attempts: u32,
    /// Deadline of one call.
    #[arg(long, default_value = "30s", value_parser = duration, global = true)]
    pub timeout: Duration,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Stream the org's events, reconnecting by itself, never losing or repeating one.
    #[command(after_help = format!("\
Examples:
  orgpulse watch                                  # live from now, human-readable
  orgpulse watch --kinds job --json               # NDJSON, jobs only
  orgpulse watch --kinds entity --types invoice,project   # only these entities' changes
  orgpulse watch --json --cursor-file ./cursor    # resume exactly where the last run stopped

Connection states (connected, reconnecting in N ms, resynced) go to stderr, events to stdout.
With --cursor-file the position is saved after each event; a missing file means live from now.

{EXIT_CODES}"))]
    Watch(WatchArgs),
    /// Fetch events with the Poll RPC (for networks where streaming fails).
    #[command(after_help = format!("\
Examples:
  orgpulse poll --cursor-file ./cursor            # events since the saved cursor, then exit
  orgpulse poll --follow --json --wait 25s        # long-poll forever

The next cursor is printed on stderr (and saved with --cursor-file).

{EXIT_CODES}"))]
    Poll(PollArgs),
    /// Broadcast a change of one of your own entities (admin or service); prints its seq and cursor.
    #[command(after_help = format!("\
Examples:
  orgpulse publish --type invoice --id inv_1 --action paid --data '{{\"amount\":12}}'
  orgpulse publish --type comment --id c_9 --action created --user bob --request-id c_9-created
  orgpulse publish --org acme --type deployment --id d/42 --action finished --json   # service token

Every subscriber of the org that may see it receives it exactly once, in seq order, as an
entity_changed event; --user addresses it to one member only. Retries (automatic, or yours
with the same --request-id) never append it twice.

{EXIT_CODES}"))]
    Publish(PublishArgs),
    /// Who is doing what: set, hold, clear and list presence states on topics.
    #[command(subcommand)]
    Presence(PresenceCommand),
    /// Send ephemeral data (typing, a cursor) to the open streams on a topic: never stored.
    #[command(after_help = format!("\
Examples:
  orgpulse broadcast --topic job:01JD9X --data '{{\"typing\":true}}'
  orgpulse broadcast --topic board:7 --data '{{\"x\":10,\"y\":42}}' --audience-groups team-a

Reaches the `watch` streams open at this moment whose --topics (if any) include the topic, as a
broadcast event: never stored, never replayed, at most once (never retried once a server may have
got it), in order per sender. At most 20 per second per user (exit 6 beyond).

{EXIT_CODES}"))]
    Broadcast(BroadcastArgs),
    /// Create, read, update and delete jobs.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Send, list and mark notifications read.
    #[command(subcommand)]
    Notify(NotifyCommand),
    /// List the org's online members.
    #[command(after_help = format!("Examples:\n  orgpulse online\n  orgpulse online --org acme --json\n\n{EXIT_CODES}"))]
    Online(OrgArg),
    /// Development helpers for tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Measure fan-out: subscribers, deliveries/s, latency, server CPU and memory (one JSON line).
    #[command(after_help = "\
Examples:
  orgpulse bench --scenario a                     # start a pinned server, 1,000 subs x 1,000 events
  orgpulse bench --scenario e --server-cpus '' --client-cpus ''
  orgpulse bench --scenario b --server http://127.0.0.1:8080 --secret-file ./jwt-secret
  orgpulse bench --scenario ingest --subscribers 0 --postgres   # on a PostgreSQL database of its own
  orgpulse bench --scenario e --nodes 2           # two nodes on PostgreSQL + NATS: cross-node latency
  orgpulse bench --scenario presence              # 1,000 subs of a topic, 100 of them broadcasting 10/s

Scenarios and the comparison with socket.io: BENCHMARKS.md. Exit code 1 on any loss.")]
    Bench(crate::bench::BenchArgs),
}

/// `--org`.
#[derive(Args, Debug)]
pub struct OrgArg {
    /// Organization id (default: the token's org).
    #[arg(long, default_value = "", hide_default_value = true)]
    pub org: String,
}

/// Where an event stream starts.
#[derive(Args, Debug)]
pub struct From {
    /// Start after this cursor (default: live from now). A cursor may begin with `-`.
    #[arg(long, conflicts_with = "cursor_file", allow_hyphen_values = true)]
    pub cursor: Option<String>,
    /// Start after the cursor saved in this file and save the cursor after each event.
    #[arg(long)]
    pub cursor_file: Option<PathBuf>,
}

/// Which events `watch` and `poll` ask for, and from where.
#[derive(Args, Debug)]
pub struct EventFilterArgs {
    #[command(flatten)]
    pub org: OrgArg,
    /// Event kinds (default: all).
    #[arg(long, value_delimiter = ',')]
    pub kinds: Vec<Kind>,
    /// Only entity events of these entity types (other kinds are not narrowed; default: all).
    #[arg(long, value_delimiter = ',')]
    pub types: Vec<String>,
    /// Only durable events with at least one of these topics, and presence states and
    /// broadcasts on one of them (e.g. project:42; default: all).
    #[arg(long, value_delimiter = ',')]
    pub topics: Vec<String>,
    #[command(flatten)]
    pub from: From,
}

/// Who may see an event or a job (default: the whole org). A caller sees it when named in
/// --audience-users, or in one of --audience-groups (its token's groups), or having one of
/// --audience-roles; role service sees everything.
#[derive(Args, Debug, Clone)]
pub struct AudienceArgs {
    /// These users (token `sub`), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub audience_users: Vec<String>,
    /// Members of these groups (the token's `groups` claim), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub audience_groups: Vec<String>,
    /// Callers with one of these roles, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub audience_roles: Vec<String>,
}

impl AudienceArgs {
    /// The request's audience; `None` = the whole org.
    pub fn proto(self) -> Option<orgpulse::proto::Audience> {
        let a = orgpulse::proto::Audience {
            user_ids: self.audience_users,
            groups: self.audience_groups,
            roles: self.audience_roles,
        };
        (a != Default::default()).then_some(a)
    }
}

/// `publish` flags.
#[derive(Args, Debug)]
pub struct PublishArgs {
    #[command(flatten)]
    pub org: OrgArg,
    /// Entity type, 1-64 of [a-z0-9_.-] (invoice, project, ...).
    #[arg(long = "type")]
    pub entity_type: String,
    /// Entity id, 1-128 of [A-Za-z0-9._:@/-].
    #[arg(long)]
    pub id: String,
    /// What happened, 1-64 of [a-z0-9_.-] (created, updated, deleted, paid, ...).
    #[arg(long)]
    pub action: String,
    /// The entity's data: a JSON object, at most 64 KiB.
    #[arg(long, default_value = "{}")]
    pub data: String,
    /// Only this member's streams and polls see it (default: the whole org; with --audience-*,
    /// this member too).
    #[arg(long, default_value = "", hide_default_value = true)]
    pub user: String,
    #[command(flatten)]
    pub audience: AudienceArgs,
    /// Its topics (0-8, e.g. project:42), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub topics: Vec<String>,
    /// Idempotency key (default: a random one, reused by the automatic retries).
    #[arg(long)]
    pub request_id: Option<String>,
}

/// `watch` flags.
#[derive(Args, Debug)]
pub struct WatchArgs {
    #[command(flatten)]
    pub filter: EventFilterArgs,
    /// Move to the next server when nothing (not even a heartbeat) arrived for this long.
    #[arg(long, default_value = "45s", value_parser = duration)]
    pub idle_timeout: Duration,
}

/// `poll` flags.
#[derive(Args, Debug)]
pub struct PollArgs {
    #[command(flatten)]
    pub filter: EventFilterArgs,
    /// Most events per answer (server default 100, max 1000).
    #[arg(long, default_value_t = 0)]
    pub max: u32,
    /// How long the server may wait for a first event (max 30s; default 0 one-shot, 25s with
    /// --follow).
    #[arg(long, value_parser = duration)]
    pub wait: Option<Duration>,
    /// Keep polling forever, retrying when the server is unreachable.
    #[arg(long)]
    pub follow: bool,
}

/// An event kind on the command line.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum Kind {
    Job,
    Notification,
    /// Online and offline, and presence states (`presence set`).
    Presence,
    Entity,
    /// Ephemeral broadcasts (`orgpulse broadcast`): live streams only.
    Broadcast,
}

impl Kind {
    pub fn proto(self) -> EventKind {
        match self {
            Kind::Job => EventKind::Job,
            Kind::Notification => EventKind::Notification,
            Kind::Presence => EventKind::Presence,
            Kind::Entity => EventKind::Entity,
            Kind::Broadcast => EventKind::Broadcast,
        }
    }
}

/// `--topic` of the presence and broadcast commands.
#[derive(Args, Debug)]
pub struct TopicArg {
    #[command(flatten)]
    pub org: OrgArg,
    /// The topic, 1-128 of [A-Za-z0-9._:@/-] (e.g. job:01JD9X..., board:7).
    #[arg(long)]
    pub topic: String,
}

/// `broadcast` flags.
#[derive(Args, Debug)]
pub struct BroadcastArgs {
    #[command(flatten)]
    pub topic: TopicArg,
    /// The data: a JSON object, at most 4 KiB encoded.
    #[arg(long)]
    pub data: String,
    /// Who receives it (default: the whole org).
    #[command(flatten)]
    pub audience: AudienceArgs,
}

#[derive(Subcommand, Debug)]
pub enum PresenceCommand {
    /// Set your state on a topic; with --hold, keep it until Ctrl-C, then clear it.
    #[command(after_help = format!("\
Examples:
  orgpulse presence set --topic job:01JD9X --state '{{\"viewing\":true}}'
  orgpulse presence set --topic job:01JD9X --state '{{\"viewing\":true}}' --hold   # until Ctrl-C
  orgpulse presence set --topic doc:7 --state '{{\"typing\":true}}' --ttl 10s --audience-groups team-a

One entry per user and topic: setting again replaces it. Without --hold it expires after --ttl.
With --hold it is set again every ttl/2 until Ctrl-C (or SIGTERM), then cleared; if the server
is unreachable meanwhile it keeps trying. Subscribers see a presence_state event when the entry
is set, changed, removed or expired. At most 10 sets per second per user (exit 6 beyond).

{EXIT_CODES}"))]
    Set {
        #[command(flatten)]
        topic: TopicArg,
        /// The state: a non-empty JSON object, at most 1 KiB encoded.
        #[arg(long)]
        state: String,
        /// How long the entry lives unless set again (1s to 120s).
        #[arg(long, default_value = "30s", value_parser = duration)]
        ttl: Duration,
        /// Who may see it (default: the whole org).
        #[command(flatten)]
        audience: AudienceArgs,
        /// Keep the state set (refreshed every ttl/2) until Ctrl-C or SIGTERM, then clear it.
        #[arg(long)]
        hold: bool,
    },
    /// Remove your state on a topic (subscribers see it leave).
    #[command(after_help = format!("Example:\n  orgpulse presence clear --topic job:01JD9X\n\n{EXIT_CODES}"))]
    Clear {
        #[command(flatten)]
        topic: TopicArg,
    },
    /// List the presence entries you may see, on one topic or all.
    #[command(after_help = format!("\
Examples:
  orgpulse presence list --topic job:01JD9X
  orgpulse presence list --json

A snapshot: to miss nothing, start `orgpulse watch --kinds presence` first, then list.

{EXIT_CODES}"))]
    List {
        #[command(flatten)]
        org: OrgArg,
        /// Only this topic (default: every topic).
        #[arg(long, default_value = "", hide_default_value = true)]
        topic: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum JobsCommand {
    /// Create a job (QUEUED, progress 0); prints it.
    #[command(after_help = format!("Example:\n  orgpulse jobs create --title 'nightly build' --label team=ci --label env=prod\n\n{EXIT_CODES}"))]
    Create {
        #[command(flatten)]
        org: OrgArg,
        /// Title (1-200 characters).
        #[arg(long)]
        title: String,
        /// A label KEY=VALUE; repeatable.
        #[arg(long = "label", value_parser = label)]
        labels: Vec<(String, String)>,
        /// Who may see the job and its events (default: the whole org).
        #[command(flatten)]
        audience: AudienceArgs,
        /// The job's topics (0-8, e.g. project:42), comma-separated; all its events carry them.
        #[arg(long, value_delimiter = ',')]
        topics: Vec<String>,
        /// Idempotency key (default: a random one, reused by the automatic retries).
        #[arg(long)]
        request_id: Option<String>,
    },
    /// Show one job.
    #[command(after_help = format!("Example:\n  orgpulse jobs get 01JD9X4Q2V7K3M8N5P6R0S1T2U\n\n{EXIT_CODES}"))]
    Get {
        #[command(flatten)]
        org: OrgArg,
        /// Job id.
        id: String,
    },
    /// List jobs, newest pages followed to the end.
    #[command(after_help = format!("\
Examples:
  orgpulse jobs list --status queued,running
  orgpulse jobs list --json --cursor-file ./cursor && orgpulse watch --json --cursor-file ./cursor

{EXIT_CODES}"))]
    List {
        #[command(flatten)]
        org: OrgArg,
        /// Only these statuses (default: all).
        #[arg(long, value_delimiter = ',')]
        status: Vec<Status>,
        /// Only jobs with at least one of these topics (default: all).
        #[arg(long, value_delimiter = ',')]
        topics: Vec<String>,
        /// Jobs per request (max 500).
        #[arg(long, default_value_t = 0)]
        page_size: i32,
        /// Save the snapshot's cursor here, so `watch --cursor-file` continues right after it.
        #[arg(long)]
        cursor_file: Option<PathBuf>,
    },
    /// Change a job's status, progress, title or message; prints the new version.
    #[command(after_help = format!("\
Examples:
  orgpulse jobs update 01JD9X... --status running --progress 10
  orgpulse jobs update 01JD9X... --progress 80 --message 'linking' --expected-version 3

{EXIT_CODES}"))]
    Update {
        #[command(flatten)]
        org: OrgArg,
        /// Job id.
        id: String,
        /// New status (queued→running|cancelled, running→succeeded|failed|cancelled).
        #[arg(long)]
        status: Option<Status>,
        /// New progress, 0-100.
        #[arg(long)]
        progress: Option<u32>,
        /// New title.
        #[arg(long)]
        title: Option<String>,
        /// New message.
        #[arg(long)]
        message: Option<String>,
        /// Fail with exit code 5 unless the job is at this version.
        #[arg(long, default_value_t = 0)]
        expected_version: u64,
    },
    /// Delete a job (admin).
    #[command(after_help = format!("Example:\n  orgpulse jobs delete 01JD9X4Q2V7K3M8N5P6R0S1T2U\n\n{EXIT_CODES}"))]
    Delete {
        #[command(flatten)]
        org: OrgArg,
        /// Job id.
        id: String,
    },
}

/// A job status on the command line.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum Status {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl Status {
    pub fn proto(self) -> JobStatus {
        match self {
            Status::Queued => JobStatus::Queued,
            Status::Running => JobStatus::Running,
            Status::Succeeded => JobStatus::Succeeded,
            Status::Failed => JobStatus::Failed,
            Status::Cancelled => JobStatus::Cancelled,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum NotifyCommand {
    /// Send a notification to one member or to the whole org (admin).
    #[command(after_help = format!("\
Examples:
  orgpulse notify send --title 'deploy done' --severity success
  orgpulse notify send --user bob --title 'review please' --body 'PR 42'

{EXIT_CODES}"))]
    Send {
        #[command(flatten)]
        org: OrgArg,
        /// Recipient user id (default: every member of the org).
        #[arg(long, default_value = "", hide_default_value = true)]
        user: String,
        /// Title.
        #[arg(long)]
        title: String,
        /// Body text.
        #[arg(long, default_value = "", hide_default_value = true)]
        body: String,
        /// Severity.
        #[arg(long, default_value = "info")]
        severity: Level,
        /// Idempotency key (default: a random one, reused by the automatic retries).
        #[arg(long)]
        request_id: Option<String>,
    },
    /// List your notifications; the unread count goes to stderr.
    #[command(after_help = format!("Examples:\n  orgpulse notify list\n  orgpulse notify list --unread --json\n\n{EXIT_CODES}"))]
    List {
        #[command(flatten)]
        org: OrgArg,
        /// Only unread ones.
        #[arg(long)]
        unread: bool,
    },
    /// Mark notifications read; prints the remaining unread count.
    #[command(after_help = format!("Example:\n  orgpulse notify read 01JD9Y... 01JD9Z...\n\n{EXIT_CODES}"))]
    Read {
        #[command(flatten)]
        org: OrgArg,
        /// Notification ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

/// A severity on the command line.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum Level {
    Info,
    Success,
    Warning,
    Error,
}

impl Level {
    pub fn proto(self) -> Severity {
        match self {
            Level::Info => Severity::Info,
            Level::Success => Severity::Success,
            Level::Warning => Severity::Warning,
            Level::Error => Severity::Error,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Mint a token: HS256 with a shared secret, or RS256 / ES256 / EdDSA with a private key;
    /// prints it on stdout.
    #[command(after_help = format!("\
Examples:
  orgpulse token mint --secret-file ./jwt-secret --org acme --user alice
  orgpulse token mint --secret-file ./jwt-secret --org acme --user ci --role member --role admin --ttl 15m
  orgpulse token mint --secret-file ./jwt-secret --user backend --role service --ttl 24h
  orgpulse token mint --private-key ./jwt.key --org acme --user alice
  orgpulse token mint --secret-file ./jwt-secret --org acme --user ann --groups project:42

{EXIT_CODES}"))]
    Mint {
        /// File holding the HS256 secret (surrounding whitespace ignored); the server's
        /// --jwt-secret-file.
        #[arg(
            long,
            required_unless_present = "private_key",
            conflicts_with = "private_key"
        )]
        secret_file: Option<PathBuf>,
        /// PEM private key (RSA: RS256, EC P-256: ES256, Ed25519: EdDSA) whose public key is the
        /// server's --jwt-public-key.
        #[arg(long)]
        private_key: Option<PathBuf>,
        /// Org id (`org` claim); not needed for the service role.
        #[arg(long)]
        org: Option<String>,
        /// User id (`sub` claim).
        #[arg(long)]
        user: String,
        /// Role; repeatable (viewer, member, admin, service). Default: member.
        #[arg(long = "role")]
        roles: Vec<String>,
        /// Groups (`groups` claim), comma-separated: the events and jobs whose audience names
        /// one of them reach this token.
        #[arg(long, value_delimiter = ',')]
        groups: Vec<String>,
        /// Lifetime.
        #[arg(long, default_value = "1h", value_parser = duration)]
        ttl: Duration,
    },
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// A `--server` value: an `http://` or `https://` URL (an empty one, from a stray comma, is
/// skipped later).
fn server_url(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty() || s.starts_with("http://") || s.starts_with("https://") {
        Ok(s.to_string())
    } else {
        Err(format!(
            "the server URL needs a scheme: add http:// (or https:// for TLS), e.g. --server http://{s}"
        ))
    }
}

fn label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))
}
