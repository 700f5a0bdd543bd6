//! Entity events (`EventService.Publish`): durable, delivered exactly once in seq order to the
//! subscribers whose kinds, entity types and user they match (live, on replay and by Poll),
//! published only by admins and services, every limit with its status, idempotent by request_id.
mod support;

use std::collections::{BTreeMap, HashMap};

use orgpulse::proto::{
    EntityChanged, EventKind, OrgFilter, PollRequest, PublishRequest, PublishResponse,
    event::Payload,
};
use prost_types::value::Kind;
use support::*;
use tonic::Code;

const ENTITY: i32 = EventKind::Entity as i32;
const TYPES: [&str; 3] = ["invoice", "project", "comment"];

/// A Struct of `fields`.
fn data(fields: Vec<(&str, Kind)>) -> prost_types::Struct {
    prost_types::Struct {
        fields: fields
            .into_iter()
            .map(|(k, kind)| (k.to_string(), prost_types::Value { kind: Some(kind) }))
            .collect(),
    }
}

/// `{"amount": 12, "tags": ["a"]}`
fn invoice_data() -> prost_types::Struct {
    let tags = prost_types::ListValue {
        values: vec![prost_types::Value {
            kind: Some(Kind::StringValue("a".into())),
        }],
    };
    data(vec![
        ("amount", Kind::NumberValue(12.0)),
        ("tags", Kind::ListValue(tags)),
    ])
}

fn change(entity_type: &str, id: &str, action: &str) -> PublishRequest {
    PublishRequest {
        entity_type: entity_type.into(),
        entity_id: id.into(),
        action: action.into(),
        data: Some(invoice_data()),
        ..Default::default()
    }
}

async fn publish(
    server: &TestServer,
    token: &str,
    req: PublishRequest,
) -> Result<PublishResponse, tonic::Status> {
    server
        .events(token)
        .await
        .publish(req)
        .await
        .map(|r| r.into_inner())
}

async fn open(server: &TestServer, token: &str, filter: OrgFilter) -> Sub {
    let mut sub = Sub::open_filter(server.channel().await, token, filter)
        .await
        .expect("subscribe");
    sub.caught_up().await;
    sub
}

fn entity_filter(types: &[&str]) -> OrgFilter {
    OrgFilter {
        entity_types: types.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    }
}

/// The log's entries a subscriber with entity type filter `types` may see (non-entity events
/// are not narrowed); `type_of` maps each published seq to its entity type.
fn narrowed(
    log: &[(u64, i32, Option<String>)],
    type_of: &HashMap<u64, &str>,
    types: &[&str],
) -> Vec<(u64, i32, Option<String>)> {
    log.iter()
        .filter(|(seq, kind, _)| *kind != ENTITY || types.contains(&type_of[seq]))
        .cloned()
        .collect()
}

#[tokio::test]
async fn published_changes_reach_exactly_the_subscribers_they_match_in_order() {
    let server = TestServer::start().await;
    let admin = token("acme", "alice", "admin");
    let service = token("", "backend", "service");
    let alice = token("acme", "alice", "viewer");
    let bob = token("acme", "bob", "viewer");
    let mut invoices = open(&server, &alice, entity_filter(&["invoice"])).await;
    let mut everything = open(&server, &alice, OrgFilter::default()).await;
    let mut bobs = open(&server, &bob, OrgFilter::default()).await;

    let mut type_of = HashMap::new();
    let mut last = 0;
    for i in 0..100 {
        let entity_type = TYPES[i % 3];
        let mut req = change(entity_type, &format!("{entity_type}_{i}"), "updated");
        // Every tenth change is for bob alone; a job now and then is not narrowed by types.
        if i % 10 == 9 {
            req.user_id = "bob".into();
        }
        let (publisher, actor) = if i % 2 == 0 {
            (&admin, "alice")
        } else {
            req.org_id = "acme".into();
            (&service, "backend")
        };
        let resp = publish(&server, publisher, req).await.expect("publish");
        assert!(resp.seq > last, "seqs increase: {} after {last}", resp.seq);
        last = resp.seq;
        type_of.insert(resp.seq, entity_type);
        if i == 0 {
            let ev = everything.until(|e| e.seq == resp.seq).await;
            assert_eq!(ev.cursor, resp.cursor);
            assert_eq!(ev.actor, actor);
            let Some(Payload::EntityChanged(e)) = ev.payload else {
                panic!("{ev:?}")
            };
            assert_eq!(
                e,
                EntityChanged {
                    entity_type: "invoice".into(),
                    entity_id: "invoice_0".into(),
                    action: "updated".into(),
                    data: Some(invoice_data()),
                    user_id: String::new(),
                }
            );
        }
        if i % 25 == 0 {
            create_job(&server, &admin, "acme", "between").await;
            last = last_seq(&server);
        }
    }
    // A last change everyone sees: once it arrived, nothing else can still be on the way.
    let end = publish(&server, &admin, change("invoice", "inv_end", "paid"))
        .await
        .unwrap();
    type_of.insert(end.seq, "invoice");
    for sub in [&mut invoices, &mut everything, &mut bobs] {
        sub.until(|e| e.seq == end.seq).await;
    }
    let log = log_of(&server.dir, "acme");
    assert_eq!(log.len(), 101 + 4, "100 changes, 4 jobs, the last change");
    assert_exactly_once(&everything.seen, &log, 1..=end.seq, "alice", &[]);
    assert_exactly_once(&bobs.seen, &log, 1..=end.seq, "bob", &[]);
    let invoice_log = narrowed(&log, &type_of, &["invoice"]);
    assert_exactly_once(&invoices.seen, &invoice_log, 1..=end.seq, "alice", &[]);
    assert!(
        invoices
            .seen
            .iter()
            .any(|e| payload_name(e) == "job_created"),
        "entity types do not narrow other kinds"
    );

    // Replay after a cursor, narrowed to projects of the entity kind.
    let from = cursor_at(&end.cursor, 0);
    let mut replay = Sub::open_filter(
        server.channel().await,
        &alice,
        OrgFilter {
            kinds: vec![ENTITY],
            after_cursor: from.clone(),
            entity_types: vec!["project".into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    replay.caught_up().await;
    let project_log = narrowed(&log, &type_of, &["project"]);
    assert_exactly_once(&replay.seen, &project_log, 1..=end.seq, "alice", &[ENTITY]);

    // Poll, narrowed to comments (and invoices, to check that several types combine).
    let polled = server
        .events(&alice)
        .await
        .poll(PollRequest {
            kinds: vec![ENTITY],
            after_cursor: from,
            max_events: 1000,
            entity_types: vec!["comment".into(), "invoice".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let comment_log = narrowed(&log, &type_of, &["comment", "invoice"]);
    assert_exactly_once(
        &polled.events,
        &comment_log,
        1..=end.seq,
        "alice",
        &[ENTITY],
    );
}

/// The org's last seq, read from the log.
fn last_seq(server: &TestServer) -> u64 {
    log_of(&server.dir, "acme").last().map_or(0, |e| e.0)
}

#[tokio::test]
async fn only_admins_and_services_publish_and_every_limit_has_its_status() {
    let server = TestServer::start().await;
    let admin = token("acme", "alice", "admin");
    for role in ["viewer", "member"] {
        let err = publish(
            &server,
            &token("acme", "u", role),
            change("invoice", "i", "paid"),
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{role}: {err:?}");
        assert!(err.message().contains("publish"), "{err:?}");
    }
    let big = |bytes: usize| {
        let mut r = change("invoice", "i", "paid");
        r.data = Some(data(vec![("x", Kind::StringValue("y".repeat(bytes)))]));
        r
    };
    let with = |f: &dyn Fn(&mut PublishRequest)| {
        let mut r = change("invoice", "inv_1", "paid");
        f(&mut r);
        r
    };
    let cases: Vec<(&str, PublishRequest, Code, &str)> = vec![
        (
            "no type",
            with(&|r| r.entity_type.clear()),
            Code::InvalidArgument,
            "entity_type must be 1-64",
        ),
        (
            "upper-case type",
            with(&|r| r.entity_type = "Invoice".into()),
            Code::InvalidArgument,
            "entity_type must be 1-64 characters of [a-z0-9_.-]",
        ),
        (
            "long type",
            with(&|r| r.entity_type = "a".repeat(65)),
            Code::InvalidArgument,
            "entity_type",
        ),
        (
            "no id",
            with(&|r| r.entity_id.clear()),
            Code::InvalidArgument,
            "entity_id must be 1-128",
        ),
        (
            "id with a space",
            with(&|r| r.entity_id = "inv 1".into()),
            Code::InvalidArgument,
            "entity_id",
        ),
        (
            "long id",
            with(&|r| r.entity_id = "i".repeat(129)),
            Code::InvalidArgument,
            "entity_id",
        ),
        (
            "no action",
            with(&|r| r.action.clear()),
            Code::InvalidArgument,
            "action must be 1-64",
        ),
        (
            "bad action",
            with(&|r| r.action = "paid!".into()),
            Code::InvalidArgument,
            "action",
        ),
        (
            "data over 64 KiB",
            big(64 * 1024),
            Code::InvalidArgument,
            "at most 65536",
        ),
        (
            "bad user",
            with(&|r| r.user_id = "a b".into()),
            Code::InvalidArgument,
            "user_id",
        ),
        (
            "long request id",
            with(&|r| r.request_id = "r".repeat(129)),
            Code::InvalidArgument,
            "request_id",
        ),
        (
            "other org",
            with(&|r| r.org_id = "globex".into()),
            Code::PermissionDenied,
            "may not access",
        ),
        (
            "request over 1 MiB",
            big(2 * 1024 * 1024),
            Code::ResourceExhausted,
            "",
        ),
    ];
    for (name, req, code, says) in cases {
        let err = publish(&server, &admin, req).await.unwrap_err();
        assert_eq!(err.code(), code, "{name}: {err:?}");
        assert!(err.message().contains(says), "{name}: {err:?}");
    }
    let err = publish(
        &server,
        &token("", "backend", "service"),
        change("invoice", "i", "paid"),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "a service names the org");
    assert!(
        log_of(&server.dir, "acme").is_empty(),
        "refused changes leave no event"
    );
    // The largest ids and data that fit are accepted.
    let mut fits = big(64 * 1024 - 100);
    fits.entity_id = format!("{}:@/-._", "I".repeat(121));
    fits.entity_type = "a".repeat(64);
    publish(&server, &admin, fits).await.expect("at the limits");

    // Filters name valid entity types.
    let err = Sub::open_filter(server.channel().await, &admin, entity_filter(&["Bad Type"]))
        .await
        .err()
        .expect("bad entity type refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = server
        .events(&admin)
        .await
        .poll(PollRequest {
            entity_types: vec![String::new()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

#[tokio::test]
async fn a_retried_request_id_returns_the_original_seq_and_adds_no_event() {
    let server = TestServer::start().await;
    let service = token("", "backend", "service");
    let req = |org: &str, id: &str| PublishRequest {
        org_id: org.into(),
        request_id: id.into(),
        ..change("invoice", "inv_1", "paid")
    };
    let first = publish(&server, &service, req("acme", "r1")).await.unwrap();
    let retry = publish(&server, &service, req("acme", "r1")).await.unwrap();
    assert_eq!((retry.seq, &retry.cursor), (first.seq, &first.cursor));
    let other = publish(&server, &service, req("acme", "r2")).await.unwrap();
    assert_eq!(other.seq, first.seq + 1);
    // Request ids are per org.
    publish(&server, &service, req("globex", "r1"))
        .await
        .unwrap();
    assert_eq!(log_of(&server.dir, "acme").len(), 2);
    assert_eq!(log_of(&server.dir, "globex").len(), 1);
    let seqs: BTreeMap<u64, ()> = log_of(&server.dir, "acme")
        .into_iter()
        .map(|(seq, kind, _)| {
            assert_eq!(kind, ENTITY);
            (seq, ())
        })
        .collect();
    assert_eq!(
        seqs.keys().copied().collect::<Vec<_>>(),
        [first.seq, other.seq]
    );
}

/// `{"a": {"a": ... 1}}`, `levels` levels deep; with `lists` every other level below the top is
/// a list (`{"a": [{"a": [...]}]}`), which counts as a level like an object.
fn nested(levels: usize, lists: bool) -> prost_types::Struct {
    let mut kind = Kind::NumberValue(1.0);
    for level in 1..levels {
        let value = prost_types::Value { kind: Some(kind) };
        kind = if lists && level % 2 == 1 {
            Kind::ListValue(prost_types::ListValue {
                values: vec![value],
            })
        } else {
            Kind::StructValue(prost_types::Struct {
                fields: [("a".to_string(), value)].into(),
            })
        };
    }
    data(vec![("a", kind)])
}

/// API.md "Input limits": `data` nests at most 32 levels. 33 (objects, or objects and lists) is
/// INVALID_ARGUMENT naming the limit; 32 levels of objects (the deepest messages) is published
/// and reaches the Rust client (`orgpulse::client`, prost's stock 100-level decoding limit)
/// intact through Subscribe and through Poll.
#[tokio::test]
async fn data_nests_at_most_32_levels_and_32_round_trips_through_subscribe_and_poll() {
    let server = TestServer::start().await;
    let admin = token("acme", "alice", "admin");
    let client = orgpulse::client::Client::new(orgpulse::client::ClientConfig {
        endpoints: vec![server.url.clone()],
        token: orgpulse::client::TokenSource::Static(token("acme", "vic", "viewer")),
        ..Default::default()
    })
    .unwrap();
    let filter = entity_filter(&[]);
    let mut stream = client.subscribe(filter.clone()).await.unwrap();
    let start = loop {
        let ev = tokio::time::timeout(WAIT, stream.message()).await.unwrap();
        let ev = ev.unwrap().expect("caught_up");
        if matches!(ev.payload, Some(Payload::CaughtUp(_))) {
            break ev.cursor;
        }
    };
    for lists in [false, true] {
        let mut req = change("invoice", "deep", "updated");
        req.data = Some(nested(33, lists));
        let err = publish(&server, &admin, req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert_eq!(
            err.message(),
            "data nests deeper than 32 levels; at most 32 allowed"
        );
    }
    let deepest = nested(32, false);
    let mut req = change("invoice", "deep", "updated");
    req.data = Some(deepest.clone());
    let published = publish(&server, &admin, req).await.expect("32 levels");
    let data_of = |e: &orgpulse::proto::Event| match &e.payload {
        Some(Payload::EntityChanged(c)) => c.data.clone(),
        other => panic!("not an entity change: {other:?}"),
    };
    let streamed = loop {
        let ev = tokio::time::timeout(WAIT, stream.message()).await.unwrap();
        let ev = ev.expect("the stream decodes the event").expect("open");
        if ev.seq > 0 {
            break ev;
        }
    };
    assert_eq!(streamed.seq, published.seq);
    assert_eq!(
        data_of(&streamed),
        Some(deepest.clone()),
        "intact by Subscribe"
    );
    let polled = client
        .poll(PollRequest {
            after_cursor: start,
            kinds: filter.kinds,
            ..Default::default()
        })
        .await
        .expect("the PollResponse decodes");
    let log = log_of(&server.dir, "acme");
    assert_exactly_once(&polled.events, &log, 1..=1, "vic", &[ENTITY]);
    assert_eq!(data_of(&polled.events[0]), Some(deepest), "intact by Poll");
}
