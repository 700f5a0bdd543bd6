//! The outbox (`--outbox postgres://...`) against a real PostgreSQL, each test in a database of
//! its own: every committed row becomes exactly one event (across SIGKILLs, with concurrent
//! product transactions, some rolled back), two nodes never deliver a row twice, invalid rows move
//! to `<table>_rejected` with their error, NOTIFY wakes the consumer within milliseconds and a
//! lost connection is reopened by itself. With the store in the outbox's own database a pass and
//! its events commit in one transaction: no snapshot ever sees a row both in the outbox and in the
//! log; the SIGKILL, two-node and NOTIFY tests run in both modes.
mod support;

use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use orgpulse::proto::{Event, EventKind, PollRequest, event::Payload};
use support::pg::{Db, connect};
use support::*;
use tokio_postgres::Client;

const ENTITY: i32 = EventKind::Entity as i32;

/// Rows still in the outbox table.
async fn pending(client: &Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM orgpulse_outbox", &[])
        .await
        .unwrap()
        .get(0)
}

/// Where the server's store is.
#[derive(Clone, Copy, Debug, PartialEq)]
enum StoreIn {
    /// A store of its own (SQLite, or with `ORGPULSE_TEST_STORE=postgres` a PostgreSQL database
    /// of its own): the events commit before the pass.
    OwnDatabase,
    /// `--database` is the outbox's database: a pass and its events are one transaction.
    OutboxDatabase,
}

async fn outbox_server(db: &Db, extra: &[&str]) -> TestServer {
    outbox_server_in(db, StoreIn::OwnDatabase, extra).await
}

async fn outbox_server_in(db: &Db, store: StoreIn, extra: &[&str]) -> TestServer {
    let url = db.url();
    let mut extra_args = vec!["--outbox".to_string(), url.clone()];
    extra_args.extend(extra.iter().map(|s| s.to_string()));
    TestServer::start_with(ServerOpts {
        extra_args,
        // Spelled another way: the server compares the databases, not the URLs.
        database: (store == StoreIn::OutboxDatabase)
            .then(|| url.replace("@127.0.0.1:", "@localhost:")),
        ..Default::default()
    })
    .await
}

/// The nodes whose logs are distinct: one log for all when they share the outbox's database.
fn distinct_logs<'a>(store: StoreIn, nodes: &[&'a TestServer]) -> Vec<&'a TestServer> {
    match store {
        StoreIn::OwnDatabase => nodes.to_vec(),
        StoreIn::OutboxDatabase => nodes[..1].to_vec(),
    }
}

/// Waits (bounded by WAIT) until `done` holds, checking every 20 ms: for conditions outside
/// orgpulse's streams (rows left in PostgreSQL, rows in the log).
async fn wait_until<F: std::future::Future<Output = bool>>(what: &str, done: impl Fn() -> F) {
    let deadline = Instant::now() + WAIT;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Inserts outbox rows for org acme, one per entity id, in one transaction; commits unless
/// `rollback`.
async fn insert(client: &mut Client, ids: &[String], rollback: bool) {
    let tx = client.transaction().await.unwrap();
    for id in ids {
        tx.execute(
            "INSERT INTO orgpulse_outbox (org_id, entity_type, entity_id, action, data)
             VALUES ('acme', 'invoice', $1, 'created', jsonb_build_object('id', $1::text))",
            &[id],
        )
        .await
        .unwrap();
    }
    if rollback {
        tx.rollback().await.unwrap();
    } else {
        tx.commit().await.unwrap();
    }
}

/// A cursor at the start of `org`'s log on `server`.
async fn log_start(server: &TestServer, org: &str) -> String {
    let head = server
        .jobs(&token("", "tester", "service"))
        .await
        .list_jobs(orgpulse::proto::ListJobsRequest {
            org_id: org.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .cursor;
    cursor_at(&head, 0)
}

/// Every durable event of `org` on `server`, replayed from the start of the log by Poll.
async fn replay(server: &TestServer, org: &str) -> Vec<Event> {
    replay_as(server, org, &token("", "tester", "service")).await
}

/// The durable events of `org` that `token`'s caller may see, from the start of the log by Poll.
async fn replay_as(server: &TestServer, org: &str, token: &str) -> Vec<Event> {
    let mut cursor = log_start(server, org).await;
    let mut events = Vec::new();
    loop {
        let page = server
            .events(token)
            .await
            .poll(PollRequest {
                org_id: org.into(),
                after_cursor: cursor,
                max_events: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!page.resync);
        if page.events.is_empty() {
            return events;
        }
        events.extend(page.events);
        cursor = page.cursor;
    }
}

fn entity_id(e: &Event) -> String {
    match &e.payload {
        Some(Payload::EntityChanged(c)) => c.entity_id.clone(),
        other => panic!("not an entity event: {other:?}"),
    }
}

/// Asserts the node's log holds exactly one entity event per id in `want` (checked against the
/// log itself) and returns those ids.
async fn delivered(server: &TestServer) -> Vec<String> {
    let log = log_of(&server.dir, "acme");
    let events = replay(server, "acme").await;
    if let Some(last) = log.last() {
        assert_exactly_once(&events, &log, 1..=last.0, "tester", &[ENTITY]);
    }
    assert!(log.iter().all(|(_, kind, _)| *kind == ENTITY));
    events.iter().map(entity_id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_committed_row_becomes_exactly_one_event_across_sigkills() {
    exactly_once_across_sigkills(StoreIn::OwnDatabase).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_committed_row_becomes_exactly_one_event_across_sigkills_in_the_store_database() {
    exactly_once_across_sigkills(StoreIn::OutboxDatabase).await;
}

async fn exactly_once_across_sigkills(store: StoreIn) {
    let db = Db::create().await;
    let mut server = outbox_server_in(&db, store, &["--outbox-poll", "100ms"]).await;
    let (progress, mut committed_so_far) = tokio::sync::watch::channel(0usize);
    let progress = Arc::new(progress);
    let mut producers = Vec::new();
    for p in 0..4 {
        let (url, progress) = (db.url(), progress.clone());
        producers.push(tokio::spawn(async move {
            let mut client = connect(&url).await;
            let (mut committed, mut rolled_back) = (Vec::new(), Vec::new());
            let mut n = 0;
            for t in 0.. {
                if committed.len() == 250 {
                    break;
                }
                let size = (1 + rand::random::<u32>() as usize % 8).min(250 - committed.len());
                let ids: Vec<String> = (n..n + size).map(|k| format!("p{p}_{k}")).collect();
                n += size;
                let rollback = t % 4 == 3;
                insert(&mut client, &ids, rollback).await;
                if rollback {
                    rolled_back.extend(ids);
                } else {
                    committed.extend(ids);
                    progress.send_modify(|c| *c += size);
                }
                // Pacing, so the kills below land while rows keep coming.
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            (committed, rolled_back)
        }));
    }
    let viewer = token("acme", "alice", "viewer");
    for threshold in [150, 450, 750] {
        committed_so_far
            .wait_for(|c| *c >= threshold)
            .await
            .unwrap();
        // Killed right as a pass appended its events: most likely before it deleted its rows.
        let mut sub = Sub::open(&server, &viewer, "acme", "", &[]).await.unwrap();
        sub.until(|e| e.seq > 0).await;
        server.kill().await;
        server.restart().await;
    }
    let (mut committed, mut rolled_back) = (BTreeSet::new(), BTreeSet::new());
    for p in producers {
        let (c, r) = p.await.unwrap();
        committed.extend(c);
        rolled_back.extend(r);
    }
    assert_eq!(committed.len(), 1000);
    assert!(!rolled_back.is_empty());
    let watch = db.client().await;
    wait_until(
        "the outbox is empty and every row is in the log",
        || async { pending(&watch).await == 0 && log_of(&server.dir, "acme").len() >= 1000 },
    )
    .await;
    let ids = delivered(&server).await;
    assert_eq!(ids.len(), 1000, "one event per committed row, none twice");
    let got: BTreeSet<String> = ids.into_iter().collect();
    assert_eq!(got, committed, "exactly the committed rows");
    assert!(got.is_disjoint(&rolled_back));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_outbox_never_deliver_a_row_twice() {
    two_nodes_never_deliver_a_row_twice(StoreIn::OwnDatabase).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_outbox_never_deliver_a_row_twice_in_the_store_database() {
    two_nodes_never_deliver_a_row_twice(StoreIn::OutboxDatabase).await;
}

async fn two_nodes_never_deliver_a_row_twice(store: StoreIn) {
    let db = Db::create().await;
    let a = outbox_server_in(&db, store, &["--outbox-poll", "50ms"]).await;
    let b = outbox_server_in(&db, store, &["--outbox-poll", "50ms"]).await;
    let logs = distinct_logs(store, &[&a, &b]);
    let mut all = BTreeSet::new();
    let mut client = db.client().await;
    for t in 0..60 {
        let ids: Vec<String> = (0..10).map(|k| format!("r{t}_{k}")).collect();
        all.extend(ids.iter().cloned());
        insert(&mut client, &ids, false).await;
    }
    wait_until("both nodes together delivered every row", || async {
        pending(&client).await == 0
            && logs
                .iter()
                .map(|n| log_of(&n.dir, "acme").len())
                .sum::<usize>()
                >= all.len()
    })
    .await;
    let mut union = Vec::new();
    for node in &logs {
        let ids = delivered(node).await;
        eprintln!("{store:?}: a log holds {}", ids.len());
        union.extend(ids);
    }
    union.sort();
    let distinct: Vec<String> = all.into_iter().collect();
    assert_eq!(union, distinct, "every row once, on one node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_the_store_database_no_snapshot_sees_a_row_both_pending_and_delivered() {
    const N: usize = 2000;
    let db = Db::create().await;
    // A first start creates the outbox table and the store's schema; the rows wait for the next.
    let mut server = outbox_server_in(&db, StoreIn::OutboxDatabase, &[]).await;
    server.terminate().await;
    let mut client = db.client().await;
    let ids: Vec<String> = (0..N).map(|k| format!("a{k:04}")).collect();
    for chunk in ids.chunks(50) {
        insert(&mut client, chunk, false).await;
    }
    server.restart().await;
    // One statement, so one snapshot: a row is either still pending or its event is in the log.
    let (mut samples, mut midway) = (0, 0);
    let deadline = Instant::now() + WAIT;
    loop {
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM orgpulse_outbox),
                        (SELECT count(*) FROM events WHERE org_id = 'acme' AND kind = $1)",
                &[&ENTITY],
            )
            .await
            .unwrap();
        let (pending, logged): (i64, i64) = (row.get(0), row.get(1));
        samples += 1;
        assert_eq!(
            pending + logged,
            N as i64,
            "sample {samples}: {pending} rows pending and {logged} events"
        );
        if pending == 0 {
            break;
        }
        midway += usize::from(logged > 0);
        assert!(Instant::now() < deadline, "the outbox did not drain");
    }
    eprintln!("{samples} snapshots, {midway} of them mid-drain, all adding up to {N}");
    assert!(midway > 0, "no snapshot caught the drain midway");
    let viewer = token("acme", "alice", "viewer");
    let from = log_start(&server, "acme").await;
    let mut sub = Sub::open(&server, &viewer, "acme", &from, &[ENTITY])
        .await
        .unwrap();
    let events = sub.durable(N).await;
    let log = log_of(&server.dir, "acme");
    assert_exactly_once(&events, &log, 1..=N as u64, "alice", &[ENTITY]);
    let got: Vec<String> = events.iter().map(entity_id).collect();
    assert_eq!(got, ids, "every row once, in the outbox's order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_rows_move_to_rejected_with_their_error_and_never_block_the_queue() {
    let db = Db::create().await;
    let server = outbox_server(&db, &[]).await;
    let client = db.client().await;
    let big = format!("{{\"x\": \"{}\"}}", "y".repeat(70 * 1024));
    let long_id = "i".repeat(129);
    // `{"a": {"a": ... 1}}`, `levels` objects deep (API.md: at most 32).
    let nested = |levels: usize| format!("{}1{}", "{\"a\": ".repeat(levels), "}".repeat(levels));
    let (deepest, too_deep) = (nested(32), nested(33));
    // (org_id, entity_type, entity_id, action, data, user_id, actor, what the error names)
    let invalid: Vec<[&str; 8]> = vec![
        ["a b", "invoice", "i1", "paid", "{}", "", "", "org_id"],
        ["", "invoice", "i2", "paid", "{}", "", "", "org_id"],
        ["acme", "Invoice", "i3", "paid", "{}", "", "", "entity_type"],
        ["acme", "invoice", "i 4", "paid", "{}", "", "", "entity_id"],
        [
            "acme",
            "invoice",
            &long_id,
            "paid",
            "{}",
            "",
            "",
            "entity_id",
        ],
        ["acme", "invoice", "i6", "", "{}", "", "", "action"],
        [
            "acme",
            "invoice",
            "i7",
            "paid",
            "[1]",
            "",
            "",
            "data must be a JSON object",
        ],
        [
            "acme",
            "invoice",
            "i8",
            "paid",
            &big,
            "",
            "",
            "at most 65536",
        ],
        [
            "acme", "invoice", "i9", "paid", "{}", "bad user", "", "user_id",
        ],
        [
            "acme",
            "invoice",
            "i10",
            "paid",
            "{}",
            "",
            "bad actor",
            "actor",
        ],
        [
            "acme",
            "invoice",
            "i11",
            "paid",
            &too_deep,
            "",
            "",
            "data nests deeper than 32 levels",
        ],
    ];
    let mut expected_errors = HashMap::new();
    let mut valid = Vec::new();
    client.batch_execute("BEGIN").await.unwrap();
    for i in 0..121usize {
        let ok_id = format!("ok_{i}");
        let data = if i == 0 { &deepest } else { "{\"n\": 1}" };
        let row: [&str; 8] = if i % 11 == 5 {
            invalid[i / 11]
        } else {
            valid.push(ok_id.clone());
            ["acme", "invoice", &ok_id, "paid", data, "", "", ""]
        };
        let nullable = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let id: i64 = client
            .query_one(
                "INSERT INTO orgpulse_outbox (org_id, entity_type, entity_id, action, data, user_id, actor)
                 VALUES ($1, $2, $3, $4, $5::text::jsonb, $6, $7) RETURNING id",
                &[&row[0], &row[1], &row[2], &row[3], &row[4], &nullable(row[5]), &nullable(row[6])],
            )
            .await
            .unwrap()
            .get(0);
        if !row[7].is_empty() {
            expected_errors.insert(id, row[7].to_string());
        }
    }
    client.batch_execute("COMMIT").await.unwrap();
    wait_until("the outbox is empty", || async {
        pending(&client).await == 0
    })
    .await;
    let ids = delivered(&server).await;
    assert_eq!(ids, valid, "the 110 valid rows, in id order");
    let rejected = client
        .query(
            "SELECT id, error FROM orgpulse_outbox_rejected ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rejected.len(), 11);
    // The counters move right after the COMMIT that emptied the table.
    wait_until("/metrics counts 121 rows, 11 rejected", || async {
        let metrics = get_text(&server, "/metrics").await;
        let has = |line: &str| metrics.lines().any(|l| l == line);
        has("orgpulse_outbox_rows_total 121") && has("orgpulse_outbox_rejected_total 11")
    })
    .await;
    for row in rejected {
        let (id, error): (i64, String) = (row.get(0), row.get(1));
        let names = &expected_errors[&id];
        assert!(
            error.contains(names),
            "row {id}: {error:?} should name {names:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_the_consumer_and_a_lost_connection_is_reopened() {
    notify_wakes_the_consumer(StoreIn::OwnDatabase).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_the_consumer_and_a_lost_connection_is_reopened_in_the_store_database() {
    notify_wakes_the_consumer(StoreIn::OutboxDatabase).await;
}

async fn notify_wakes_the_consumer(store: StoreIn) {
    let db = Db::create().await;
    // Polling every hour: only a NOTIFY can make a row arrive quickly.
    let server = outbox_server_in(&db, store, &["--outbox-poll", "1h"]).await;
    let viewer = token("acme", "alice", "viewer");
    let mut sub = Sub::open(&server, &viewer, "acme", "", &[ENTITY])
        .await
        .unwrap();
    sub.caught_up().await;
    let mut client = db.client().await;
    let mut latencies = Vec::new();
    for i in 0..30 {
        if i == 15 {
            // The consumer's connection is killed from the server side; it reconnects by itself
            // (and the row inserted meanwhile is picked up by its first pass).
            let killed: i64 = client
                .query_one(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                     WHERE datname = current_database() AND application_name = 'orgpulse-outbox'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(killed, 1);
        }
        let t0 = Instant::now();
        insert(&mut client, &[format!("n{i}")], false).await;
        let ev = sub.until(|e| e.seq > 0).await;
        latencies.push(t0.elapsed());
        assert_eq!(entity_id(&ev), format!("n{i}"));
    }
    let (first, after_reconnect) = (latencies[0], latencies[15]);
    latencies.sort();
    eprintln!(
        "{store:?}: outbox commit -> event: p50 {:?}, max {:?}; first {first:?}, after a reconnect {after_reconnect:?}",
        latencies[latencies.len() / 2],
        latencies.last().unwrap()
    );
    assert!(
        *latencies.last().unwrap() < Duration::from_secs(10),
        "woken by NOTIFY (and reconnects), not by the hourly poll"
    );
    let log = log_of(&server.dir, "acme");
    assert_exactly_once(
        &sub.seen,
        &log,
        1..=log.last().unwrap().0,
        "alice",
        &[ENTITY],
    );
}

#[tokio::test]
async fn a_table_without_the_outbox_columns_stops_the_start_with_one_line() {
    let db = Db::create().await;
    db.client()
        .await
        .batch_execute("CREATE TABLE orgpulse_outbox (id bigserial PRIMARY KEY, org_id text)")
        .await
        .unwrap();
    let dir = TempDir::new("outbox-misfit");
    std::fs::write(dir.0.join("secret"), SECRET).unwrap();
    let out = tokio::process::Command::new(workspace_bin("orgpulse-server"))
        .args(["--listen", "127.0.0.1:0", "--jwt-secret-file"])
        .arg(dir.0.join("secret"))
        .arg("--database")
        .arg(format!("sqlite://{}/orgpulse.db", dir.0.display()))
        .args(["--outbox", &db.url()])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("table orgpulse_outbox does not fit") && err.contains("entity_type"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

/// The table as orgpulse created it before audiences and topics (API.md's first outbox schema).
const OLD_OUTBOX: &str = "
CREATE TABLE orgpulse_outbox (
  id bigserial PRIMARY KEY, org_id text NOT NULL, entity_type text NOT NULL,
  entity_id text NOT NULL, action text NOT NULL, data jsonb NOT NULL DEFAULT '{}',
  user_id text, actor text, created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE orgpulse_outbox_rejected (
  id bigint PRIMARY KEY, org_id text, entity_type text, entity_id text, action text, data jsonb,
  user_id text, actor text, created_at timestamptz, error text NOT NULL,
  rejected_at timestamptz NOT NULL DEFAULT now());";

/// Entity ids of the events `user` (with `groups`) gets by Poll from the start of acme's log.
async fn seen_by(server: &TestServer, user: &str, groups: &[&str]) -> Vec<String> {
    let token = token_with(
        "acme",
        user,
        serde_json::json!({ "roles": ["member"], "groups": groups }),
    );
    let events = replay_as(server, "acme", &token).await;
    events.iter().map(entity_id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_table_gains_audience_and_topics_while_the_product_inserts_and_rows_reach_only_their_audience()
 {
    let db = Db::create().await;
    db.client().await.batch_execute(OLD_OUTBOX).await.unwrap();
    // The product goes on inserting (old columns only), one transaction per row, while a long
    // transaction of its own holds the table when orgpulse starts.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let inserter = {
        let (mut client, stop) = (db.client().await, stop.clone());
        tokio::spawn(async move {
            let (mut ids, mut slowest) = (vec![], Duration::ZERO);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = format!("old_{}", ids.len());
                let began = Instant::now();
                insert(&mut client, std::slice::from_ref(&id), false).await;
                slowest = slowest.max(began.elapsed());
                ids.push(id);
            }
            (ids, slowest)
        })
    };
    let holder = db.client().await;
    holder
        .batch_execute("BEGIN; INSERT INTO orgpulse_outbox (org_id, entity_type, entity_id, action) VALUES ('acme', 'invoice', 'held', 'created')")
        .await
        .unwrap();
    let held = tokio::spawn(async move {
        // Holding the lock is the point here, not waiting for something.
        tokio::time::sleep(Duration::from_secs(3)).await;
        holder.batch_execute("COMMIT").await.unwrap();
    });
    let server = outbox_server(&db, &[]).await;
    held.await.unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (old_ids, slowest) = inserter.await.unwrap();
    // The ALTER never queued the product's inserts behind the 3 s transaction.
    assert!(
        slowest < Duration::from_secs(2),
        "an insert waited {slowest:?}"
    );
    let client = db.client().await;
    let columns: i64 = client
        .query_one(
            "SELECT count(*) FROM information_schema.columns
             WHERE table_name IN ('orgpulse_outbox', 'orgpulse_outbox_rejected')
               AND column_name IN ('audience', 'topics')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(columns, 4);

    // (entity id, audience, topics, what a rejection names)
    let rows: [(&str, Option<&str>, Option<&str>, &str); 8] = [
        (
            "p42",
            Some(r#"{"groups": ["g42"]}"#),
            Some("{project:42}"),
            "",
        ),
        ("to-bob", Some(r#"{"user_ids": ["bob"]}"#), None, ""),
        ("public", None, Some("{project:7}"), ""),
        ("empty", Some("{}"), Some("{}"), ""),
        ("typo", Some(r#"{"group": ["g42"]}"#), None, "audience"),
        (
            "bad-group",
            Some(r#"{"groups": ["a b"]}"#),
            None,
            "audience.groups",
        ),
        ("bad-topic", None, Some("{\"a b\"}"), "topics"),
        ("nine", None, Some("{a,b,c,d,e,f,g,h,i}"), "topics"),
    ];
    for (id, audience, topics, _) in rows {
        client
            .execute(
                "INSERT INTO orgpulse_outbox (org_id, entity_type, entity_id, action, audience, topics)
                 VALUES ('acme', 'invoice', $1, 'created', $2::text::jsonb, $3::text::text[])",
                &[&id, &audience, &topics],
            )
            .await
            .unwrap();
    }
    wait_until("the outbox is empty", || async {
        pending(&client).await == 0
    })
    .await;
    let mut old = old_ids.clone();
    old.push("held".into());
    old.sort();
    let sorted = |mut ids: Vec<String>| {
        ids.sort();
        ids
    };
    let with = |extra: &[&str]| {
        sorted(
            old.iter()
                .cloned()
                .chain(extra.iter().map(|s| s.to_string()))
                .collect(),
        )
    };
    assert_eq!(
        sorted(seen_by(&server, "ann", &["g42"]).await),
        with(&["p42", "public", "empty"])
    );
    assert_eq!(
        sorted(seen_by(&server, "bob", &[]).await),
        with(&["to-bob", "public", "empty"])
    );
    assert_eq!(
        sorted(seen_by(&server, "cat", &["g7"]).await),
        with(&["public", "empty"])
    );
    // Exactly once, in seq order, for a service, which sees the whole log.
    let all: Vec<u64> = replay(&server, "acme")
        .await
        .iter()
        .map(|e| e.seq)
        .collect();
    let log: Vec<u64> = log_of(&server.dir, "acme").iter().map(|r| r.0).collect();
    assert_eq!((all.len(), &all), (old.len() + 4, &log));
    let rejected = client
        .query(
            "SELECT entity_id, error, audience::text, topics FROM orgpulse_outbox_rejected ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    let want: Vec<_> = rows.iter().filter(|r| !r.3.is_empty()).collect();
    assert_eq!(rejected.len(), want.len());
    for (row, (id, audience, _, names)) in rejected.iter().zip(want) {
        assert_eq!(row.get::<_, &str>(0), *id);
        let error: &str = row.get(1);
        assert!(
            error.starts_with(names),
            "{id}: {error:?} should name {names:?}"
        );
        // The rejected row keeps what the product wrote.
        assert_eq!(
            row.get::<_, Option<String>>(2).is_some(),
            audience.is_some(),
            "{id}"
        );
    }
}
