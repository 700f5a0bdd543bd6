//! Audiences and topics through the SDK in Chromium (issue 18): two members of one org in
//! different groups (the `groups` claim of the tokens their pages mint), each with a page of every
//! event and a page of topic `project:42` only (`clients/web/e2e/page.ts`, behind the test proxy).
//! A private project's changes (audience group `project:42`, topic `project:42`) reach the member
//! of that group only: live, on replay after a server SIGKILL (written while the pages could not
//! connect), and through the SDK's polling fallback. Every page's events are checked against the
//! log and what was written: each event it may see exactly once, in seq order, nothing else; the
//! topic pages' Subscribe and Poll requests carry the topic. The dashboard's topic filter and
//! chips are checked on the same private project. Under `CI=true` a missing Chromium or
//! `node_modules` fails; else the tests are skipped with the reason printed.

mod support;

use std::time::Duration;

use orgpulse::proto::{Audience, CreateJobRequest, PublishRequest};
use serde_json::{Value, json};
use support::browser::{Browser, SERIAL, prerequisites, sdk_pages, sdk_server};
use support::{TestServer, log_of, token};

/// The server's heartbeat; the pages are told the same (`?heartbeat=`), so a stream that delivers
/// nothing for 2 s is taken for a buffering proxy.
const HEARTBEAT_SECS: u64 = 1;
/// Connection changes (start-up, reconnect with backoff, fallback) get this long.
const SETTLE: Duration = Duration::from_secs(30);
const ORG: &str = "acme";
/// The private project: its group (in the member's token and the events' audience) and topic.
const PROJECT: &str = "project:42";

/// A member of the org as a page signs in: user id and the groups of the token.
struct Member {
    user: &'static str,
    groups: &'static [&'static str],
}

const ANN: Member = Member {
    user: "ann",
    groups: &[PROJECT],
};
const BOB: Member = Member {
    user: "bob",
    groups: &["project:7"],
};

/// A page: whose, and the topics it subscribes to (empty = all).
struct Page {
    name: &'static str,
    member: &'static Member,
    topics: &'static [&'static str],
}

const PAGES: [Page; 4] = [
    Page {
        name: "ann",
        member: &ANN,
        topics: &[],
    },
    Page {
        name: "ann-42",
        member: &ANN,
        topics: &[PROJECT],
    },
    Page {
        name: "bob",
        member: &BOB,
        topics: &[],
    },
    Page {
        name: "bob-42",
        member: &BOB,
        topics: &[PROJECT],
    },
];

/// What the test wrote: an event's seq, whether it was private to the project, its topics.
struct Written {
    seq: u64,
    private: bool,
    topics: Vec<String>,
}

/// Opens `page` behind the proxy at `base`: its member's tokens (an hour) carry its groups.
async fn open(b: &mut Browser, base: &str, page: &Page) {
    let url = format!(
        "{base}/e2e/page.html?user={}&groups={}&topics={}&heartbeat={HEARTBEAT_SECS}&streamRetry=3&crossTab=0&wire=1",
        page.member.user,
        page.member.groups.join(","),
        page.topics.join(","),
    );
    let tokens = json!({"secret": support::SECRET, "org": ORG, "ttl": 3600});
    b.must(json!({"cmd": "open", "page": page.name, "url": url, "tokens": tokens}))
        .await;
}

/// Waits until every page's SDK reports `state` as its latest connection state.
async fn wait_state(b: &mut Browser, state: &str) {
    let js = "(s) => window.__states && window.__states.at(-1)?.[0] === s";
    for page in &PAGES {
        b.wait_until(page.name, js, json!(state), SETTLE).await;
    }
}

/// Publishes `n` changes of tasks as an admin, in turn: one of no project, one private to the
/// project (audience its group, its topic), one public with the project's topic. With `n` a
/// multiple of 3 the last one is seen by every page, so a page that got it got everything before.
async fn write(s: &TestServer, n: usize, tag: &str) -> Vec<Written> {
    assert_eq!(n % 3, 0, "batches end with a change every page sees");
    let mut events = s.events(&token(ORG, "boss", "admin")).await;
    let mut out = vec![];
    for i in 0..n {
        let private = i % 3 == 1;
        let topics = match i % 3 {
            0 => vec![],
            _ => vec![PROJECT.to_string()],
        };
        let audience = private.then(|| Audience {
            groups: vec![PROJECT.into()],
            ..Default::default()
        });
        let req = PublishRequest {
            entity_type: "task".into(),
            entity_id: format!("{tag}-{i}"),
            action: "updated".into(),
            audience,
            topics: topics.clone(),
            ..Default::default()
        };
        let seq = events.publish(req).await.expect("Publish").into_inner().seq;
        out.push(Written {
            seq,
            private,
            topics,
        });
    }
    out
}

/// Whether `member` may see an event with the stored audience `stored` (the log's column: none =
/// the whole org, else the audience's JSON object; this test writes only group audiences).
fn admits(stored: Option<&str>, member: &Member) -> bool {
    let Some(text) = stored else {
        return true;
    };
    let audience: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text}: {e}"));
    audience["groups"]
        .as_array()
        .unwrap_or_else(|| panic!("a group audience: {text}"))
        .iter()
        .any(|g| member.groups.contains(&g.as_str().unwrap()))
}

/// The seqs `page` must have received: the log's events its member may see (all written by this
/// test, private ones with an audience) that share a topic with it, in seq order.
fn expected(s: &TestServer, written: &[Written], page: &Page) -> Vec<u64> {
    let log = log_of(&s.dir, ORG);
    let seqs: Vec<u64> = log.iter().map(|(seq, _, _)| *seq).collect();
    let ours: Vec<u64> = written.iter().map(|w| w.seq).collect();
    assert_eq!(seqs, ours, "the log holds exactly what the test wrote");
    log.iter()
        .zip(written)
        .filter(|((_, _, aud), w)| {
            assert_eq!(aud.is_some(), w.private, "seq {}: stored {aud:?}", w.seq);
            admits(aud.as_deref(), page.member)
                && (page.topics.is_empty()
                    || w.topics.iter().any(|t| page.topics.contains(&t.as_str())))
        })
        .map(|((seq, _, _), _)| *seq)
        .collect()
}

/// Waits until each page has as many events as it may see, then checks they are exactly those,
/// once each, in seq order. The last write is one every page sees, and the SDK delivers in seq
/// order, so an event a page must not see would have arrived before the wait ended.
async fn assert_pages_have_log(b: &mut Browser, s: &TestServer, written: &[Written]) {
    for page in &PAGES {
        let want = expected(s, written, page);
        let js = "(n) => window.__seqs.length >= n";
        b.wait_until(page.name, js, json!(want.len()), SETTLE).await;
        let got: Vec<u64> =
            serde_json::from_value(b.eval(page.name, "() => window.__seqs", Value::Null).await)
                .unwrap();
        assert_eq!(
            got, want,
            "page {}: received seqs (left) != the log's seqs it may see (right)",
            page.name
        );
    }
}

#[tokio::test]
async fn a_private_project_reaches_only_its_member_live_after_a_kill_and_by_polling() {
    let Some(chromium) = prerequisites("the SDK audience browser test") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let pages = sdk_pages();
    let mut s = sdk_server(HEARTBEAT_SECS, &[]).await;
    let mut b = Browser::launch(&chromium).await;
    let base = b
        .must(json!({"cmd": "proxy", "target": s.url, "mode": "pass", "static": pages}))
        .await;
    let base = base.as_str().unwrap().to_string();
    for page in &PAGES {
        open(&mut b, &base, page).await;
    }
    wait_state(&mut b, "live").await;

    // live
    let mut written = write(&s, 9, "live").await;
    assert_pages_have_log(&mut b, &s, &written).await;

    // SIGKILL; the private changes are written while no page can reach the server: replay
    s.kill().await;
    wait_state(&mut b, "reconnecting").await;
    b.must(json!({"cmd": "proxyMode", "url": base, "mode": "down"}))
        .await;
    s.restart().await;
    written.extend(write(&s, 9, "down").await);
    b.must(json!({"cmd": "proxyMode", "url": base, "mode": "pass"}))
        .await;
    wait_state(&mut b, "live").await;
    assert_pages_have_log(&mut b, &s, &written).await;

    // a buffering proxy (the pages reconnect through it after another kill): their streams
    // deliver nothing, so the SDK falls back to Poll, which must narrow the same way
    b.must(json!({"cmd": "proxyMode", "url": base, "mode": "buffer"}))
        .await;
    s.kill().await;
    s.restart().await;
    wait_state(&mut b, "polling").await;
    written.extend(write(&s, 9, "polled").await);
    assert_pages_have_log(&mut b, &s, &written).await;

    for page in &PAGES {
        let resyncs = b
            .eval(page.name, "() => window.__resyncs", Value::Null)
            .await;
        assert_eq!(resyncs, json!([]), "page {}: nothing was lost", page.name);
        // what the page's requests asked for: its topics, on every Subscribe and every Poll
        let wire: Vec<(String, Vec<String>)> =
            serde_json::from_value(b.eval(page.name, "() => window.__wire", Value::Null).await)
                .unwrap();
        let polls = wire.iter().filter(|(m, _)| m == "Poll").count();
        let streams = wire.iter().filter(|(m, _)| m == "Subscribe").count();
        assert!(
            streams >= 2 && polls >= 1,
            "page {}: {streams} Subscribe, {polls} Poll",
            page.name
        );
        for (method, topics) in &wire {
            assert_eq!(
                topics, page.topics,
                "page {}: a {method} asked for",
                page.name
            );
        }
        eprintln!(
            "page {}: {} events, {streams} Subscribe and {polls} Poll requests",
            page.name,
            expected(&s, &written, page).len()
        );
    }
    b.quit().await;
}

/// An hour's HS256 token of `member` (role member) with its groups claim.
fn member_token(member: &Member) -> String {
    let claims = json!({
        "sub": member.user,
        "org": ORG,
        "roles": ["member"],
        "groups": member.groups,
        "exp": support::now_secs() + 3600,
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(support::SECRET.as_bytes()),
    )
    .unwrap()
}

/// Creates a job as an admin: private to the project (its group) or not, with `topics`.
async fn create_job(s: &TestServer, title: &str, private: bool, topics: &[&str]) -> String {
    let req = CreateJobRequest {
        title: title.into(),
        audience: private.then(|| Audience {
            groups: vec![PROJECT.into()],
            ..Default::default()
        }),
        topics: topics.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    };
    let mut jobs = s.jobs(&token(ORG, "boss", "admin")).await;
    jobs.create_job(req)
        .await
        .expect("CreateJob")
        .into_inner()
        .id
}

/// Waits until `page`'s table shows exactly the jobs `want` (in any order). Rows only come, in
/// seq order, so a job that must not show and came before the last of `want` fails this.
async fn wait_rows(b: &mut Browser, page: &str, want: &[&String]) {
    let mut want: Vec<&String> = want.to_vec();
    want.sort();
    let js = r#"(want) => JSON.stringify([...document.querySelectorAll('[data-testid="job-row"]')]
        .map((r) => r.dataset.jobId).sort()) === JSON.stringify(want)"#;
    b.wait_until(page, js, json!(want), SETTLE).await;
}

fn row(id: &str) -> String {
    format!(r#"[data-testid="job-row"][data-job-id="{id}"]"#)
}

#[tokio::test]
async fn the_dashboard_filters_by_topic_and_shows_a_private_project_to_its_member_only() {
    let Some(chromium) = prerequisites("the dashboard topic test") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let s = sdk_server(HEARTBEAT_SECS, &[]).await;
    let secret = create_job(&s, "secret plan", true, &[PROJECT]).await;
    let kickoff = create_job(&s, "kickoff", false, &[PROJECT, "team:web"]).await;
    let lunch = create_job(&s, "lunch", false, &[]).await;
    let mut b = Browser::launch(&chromium).await;
    let live = r#"() => document.querySelector('[data-testid="connection-badge"]').dataset.state === "live""#;
    for m in [&ANN, &BOB] {
        let url = format!(
            "{}/?heartbeat={HEARTBEAT_SECS}&topic={PROJECT}#token={}",
            s.url,
            member_token(m)
        );
        b.open(m.user, &url).await;
        b.wait_until(m.user, live, Value::Null, SETTLE).await;
    }
    // the snapshot: the project's jobs the member may see, each with its topic chips
    wait_rows(&mut b, "ann", &[&secret, &kickoff]).await;
    wait_rows(&mut b, "bob", &[&kickoff]).await;
    let chips = r#"(sel) => [...document.querySelectorAll(sel + ' [data-testid="topic"]')].map((c) => c.dataset.topic)"#;
    let shown = b.eval("ann", chips, json!(row(&kickoff))).await;
    assert_eq!(shown, json!([PROJECT, "team:web"]));

    // live: a private change of the project, one of another project, a public one of the project
    let later = create_job(&s, "private follow-up", true, &[PROJECT]).await;
    let other = create_job(&s, "elsewhere", false, &["project:7"]).await;
    let public = create_job(&s, "public follow-up", false, &[PROJECT]).await;
    wait_rows(&mut b, "ann", &[&secret, &kickoff, &later, &public]).await;
    wait_rows(&mut b, "bob", &[&kickoff, &public]).await;
    let durable = r#"() => [...document.querySelectorAll('[data-testid="ticker-item"][data-seq]')]
        .map((li) => [li.dataset.kind, [...li.querySelectorAll('[data-testid="topic"]')].map((c) => c.dataset.topic)])"#;
    let lines = b.eval("bob", durable, Value::Null).await;
    assert_eq!(lines, json!([["jobCreated", [PROJECT]]]), "bob's events");

    // all topics: every job the member may see; a chip narrows to its topic again
    b.click("ann", r#"[data-testid="topic-clear"]"#).await;
    let all = [&secret, &kickoff, &lunch, &later, &other, &public];
    wait_rows(&mut b, "ann", &all).await;
    b.click("bob", r#"[data-testid="topic-clear"]"#).await;
    wait_rows(&mut b, "bob", &[&kickoff, &lunch, &other, &public]).await;
    let chip = format!(r#"{} [data-topic="team:web"]"#, row(&kickoff));
    b.click("ann", &chip).await;
    wait_rows(&mut b, "ann", &[&kickoff]).await;
    let address = b.eval("ann", "() => location.search", Value::Null).await;
    assert!(
        address.as_str().unwrap().contains("topic=team%3Aweb"),
        "{address}"
    );
    b.quit().await;
}
