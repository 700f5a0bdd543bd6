//! Browser end-to-end tests of the SDK, `@orgpulse/client` (issue 11): pages built from the SDK
//! (`clients/web/e2e`, bundled by its build.mjs) in Debian's Chromium against the real server,
//! behind the test proxy (`web/test/proxy.mjs`, which also serves the pages on the API's origin).
//! Every page's event list is checked against the server's log: each durable event it may see,
//! exactly once, in seq order. The React page also holds presence and sends broadcasts through
//! usePresence and useBroadcast under StrictMode. Under `CI=true` a missing Chromium or
//! `node_modules` fails; else the tests are skipped with the reason printed.

mod support;

use std::time::{Duration, Instant};

use orgpulse::proto::{Event, ListOnlineRequest, SendNotificationRequest};
use serde_json::{Value, json};
use support::browser::{Browser, SERIAL, prerequisites, sdk_pages, sdk_server, web_dir};
use support::{TestServer, assert_exactly_once, create_job, log_of, token};
use tokio::sync::MutexGuard;

/// The server's heartbeat; the pages are told the same (`?heartbeat=`), so a stream that delivers
/// nothing for 2 s is taken for a buffering proxy.
const HEARTBEAT_SECS: u64 = 1;
/// Connection changes (start-up, reconnect with backoff, fallback, takeover) get this long.
const SETTLE: Duration = Duration::from_secs(30);
const ORG: &str = "acme";

/// What each browser test starts with (None: skipped): the browser-test lock, the bundled pages,
/// a server, Chromium, and the proxy serving the pages in front of the server (its URL).
async fn harness() -> Option<(MutexGuard<'static, ()>, TestServer, Browser, String)> {
    let chromium = prerequisites("the SDK browser test")?;
    let serial = SERIAL.lock().await;
    let pages = sdk_pages();
    let s = sdk_server(HEARTBEAT_SECS, &["--presence-grace", "1s"]).await;
    let mut b = Browser::launch(&chromium).await;
    let base = proxy(&mut b, &s, &pages).await;
    Some((serial, s, b, base))
}

/// A proxy in front of `s` (mode "pass") that also serves the test pages; returns its URL.
async fn proxy(b: &mut Browser, s: &TestServer, pages: &std::path::Path) -> String {
    let url = b
        .must(json!({"cmd": "proxy", "target": s.url, "mode": "pass", "static": pages}))
        .await;
    url.as_str().unwrap().to_string()
}

/// Opens a test page whose tokens (minted by the driver) live `ttl` seconds.
async fn open(b: &mut Browser, page: &str, url: &str, context: Option<&str>, ttl: u64) {
    let tokens = json!({"secret": support::SECRET, "org": ORG, "ttl": ttl});
    b.must(json!({"cmd": "open", "page": page, "url": url, "context": context, "tokens": tokens}))
        .await;
}

/// Waits until the page's SDK reports `state` as its latest connection state.
async fn wait_state(b: &mut Browser, page: &str, state: &str, within: Duration) {
    let js = "(s) => window.__states && window.__states.at(-1)?.[0] === s";
    b.wait_until(page, js, json!(state), within).await;
}

/// Writes `n` durable changes through native gRPC: jobs, and notifications for alice and for bob.
async fn write(s: &TestServer, n: usize, tag: &str) {
    let admin = token(ORG, "boss", "admin");
    for i in 0..n {
        if i % 3 == 2 {
            let user = if i % 2 == 0 { "alice" } else { "bob" };
            let req = SendNotificationRequest {
                user_id: user.into(),
                title: format!("{tag} {i}"),
                ..Default::default()
            };
            s.notifications(&admin)
                .await
                .send_notification(req)
                .await
                .expect("SendNotification");
        } else {
            create_job(s, &admin, "", &format!("{tag} {i}")).await;
        }
    }
}

/// The seqs of the org's log after `after` that alice may see.
fn visible(s: &TestServer, after: u64) -> Vec<u64> {
    log_of(&s.dir, ORG)
        .into_iter()
        .filter(|(seq, _, aud)| *seq > after && aud.as_deref().is_none_or(|a| a == "alice"))
        .map(|(seq, _, _)| seq)
        .collect()
}

/// Waits until the page has received as many durable events as alice may see in the log after
/// seq `after` (where the page started listening), then checks that they are exactly those, once
/// each, in seq order.
async fn assert_page_has_log(b: &mut Browser, page: &str, s: &TestServer, after: u64) {
    let want = visible(s, after);
    let js = "(n) => window.__seqs.length >= n";
    b.wait_until(page, js, json!(want.len()), SETTLE).await;
    let got: Vec<u64> =
        serde_json::from_value(b.eval(page, "() => window.__seqs", Value::Null).await).unwrap();
    let received: Vec<Event> = got
        .iter()
        .map(|&seq| Event {
            seq,
            ..Default::default()
        })
        .collect();
    let last = want.last().copied().unwrap_or(0);
    assert_exactly_once(
        &received,
        &log_of(&s.dir, ORG),
        after + 1..=last,
        "alice",
        &[],
    );
}

/// Open Subscribe streams of `user` per ListOnline.
async fn connections(s: &TestServer, user: &str) -> u32 {
    let res = s
        .events(&token(ORG, "boss", "admin"))
        .await
        .list_online(ListOnlineRequest::default())
        .await
        .expect("ListOnline")
        .into_inner();
    res.members
        .iter()
        .find(|m| m.user_id == user)
        .map_or(0, |m| m.connections)
}

/// Polls ListOnline until `user` holds `n` streams (the server notices a closed tab on its own time).
async fn wait_connections(s: &TestServer, user: &str, n: u32) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let now = connections(s, user).await;
        if now == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{user} holds {now} streams, want {n}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn sdk_page_gets_every_event_once_through_kills_token_expiry_and_polling() {
    let Some((_serial, mut s, mut b, base)) = harness().await else {
        return;
    };
    let url = format!(
        "{base}/e2e/page.html?user=alice&heartbeat={HEARTBEAT_SECS}&streamRetry=3&crossTab=0"
    );
    open(&mut b, "p", &url, None, 3).await;
    wait_state(&mut b, "p", "live", SETTLE).await;
    write(&s, 9, "live").await;

    let mut reconnects = vec![];
    for round in 1..=3 {
        s.kill().await;
        wait_state(&mut b, "p", "reconnecting", SETTLE).await;
        s.restart().await;
        let t0 = Instant::now();
        // written while the page is still reconnecting: it must get them from its cursor
        write(&s, 6, &format!("restart {round}")).await;
        wait_state(&mut b, "p", "live", SETTLE).await;
        reconnects.push(t0.elapsed());
        assert_page_has_log(&mut b, "p", &s, 0).await;
    }
    eprintln!("SDK page: server up -> live again: {reconnects:?}");

    // 3-second tokens: by now the page has asked for many, and the stream was ended for each
    let tokens = b.eval("p", "() => window.__tokenCalls", Value::Null).await;
    assert!(tokens.as_u64().unwrap() >= 4, "getToken calls: {tokens}");

    // a buffering proxy: streams deliver nothing, so the page polls; then streams get through again
    b.must(json!({"cmd": "proxyMode", "url": base, "mode": "buffer"}))
        .await;
    let t0 = Instant::now();
    wait_state(&mut b, "p", "polling", SETTLE).await;
    let to_polling = t0.elapsed();
    write(&s, 9, "polled").await;
    assert_page_has_log(&mut b, "p", &s, 0).await;
    b.must(json!({"cmd": "proxyMode", "url": base, "mode": "pass"}))
        .await;
    let t0 = Instant::now();
    wait_state(&mut b, "p", "live", SETTLE).await;
    eprintln!(
        "SDK page: buffering proxy -> polling in {to_polling:?}; streams pass again -> live in {:?}",
        t0.elapsed()
    );
    write(&s, 6, "streaming again").await;
    assert_page_has_log(&mut b, "p", &s, 0).await;
    let resyncs = b.eval("p", "() => window.__resyncs", Value::Null).await;
    assert_eq!(resyncs, json!([]), "nothing was ever lost: no resync");
    b.quit().await;
}

#[tokio::test]
async fn sdk_five_tabs_share_one_stream_and_a_new_leader_takes_over() {
    let Some((_serial, s, mut b, base)) = harness().await else {
        return;
    };
    let url = format!("{base}/e2e/page.html?user=alice&heartbeat={HEARTBEAT_SECS}");
    let tabs: Vec<String> = (1..=5).map(|i| format!("tab{i}")).collect();
    for tab in &tabs {
        open(&mut b, tab, &url, Some("alice"), 3600).await;
    }
    for tab in &tabs {
        wait_state(&mut b, tab, "live", SETTLE).await;
    }
    wait_connections(&s, "alice", 1).await;
    let streams = connections(&s, "alice").await;
    eprintln!("5 tabs of one user: {streams} Subscribe stream(s)");
    write(&s, 12, "shared").await;
    for tab in &tabs {
        assert_page_has_log(&mut b, tab, &s, 0).await;
    }

    // close the leader: another tab takes over from the last cursor, nothing lost or doubled
    let mut leader = None;
    for tab in &tabs {
        if b.eval(tab, "() => window.__role()", Value::Null).await == "leader" {
            assert!(leader.is_none(), "two leaders");
            leader = Some(tab.clone());
        }
    }
    let leader = leader.expect("one tab leads");
    let t0 = Instant::now();
    b.must(json!({"cmd": "close", "page": leader})).await;
    write(&s, 6, "after the leader left").await;
    let rest: Vec<&String> = tabs.iter().filter(|t| **t != leader).collect();
    for tab in &rest {
        assert_page_has_log(&mut b, tab, &s, 0).await;
    }
    eprintln!(
        "leader closed -> every other tab has the events written since: {:?}",
        t0.elapsed()
    );
    let mut leaders = 0;
    for tab in &rest {
        leaders += (b.eval(tab, "() => window.__role()", Value::Null).await == "leader") as u32;
    }
    assert_eq!(leaders, 1, "exactly one new leader");
    wait_connections(&s, "alice", 1).await;
    b.quit().await;
}

#[tokio::test]
async fn sdk_react_strict_mode_opens_one_stream_and_delivers_once() {
    let Some((_serial, s, mut b, base)) = harness().await else {
        return;
    };
    let admin = token(ORG, "boss", "admin");
    let before = create_job(&s, &admin, "", "before the page").await;
    let before_seq = log_of(&s.dir, ORG).last().unwrap().0;
    open(
        &mut b,
        "r",
        &format!("{base}/e2e/react.html?user=alice"),
        None,
        3600,
    )
    .await;
    let live = r#"() => document.querySelector('[data-testid="state"]')?.textContent === "live""#;
    b.wait_until("r", live, Value::Null, SETTLE).await;
    let row = |id: &str| format!(r#"[data-testid="job-row"][data-job-id="{id}"]"#);
    b.wait_for("r", &row(&before.id), "attached", SETTLE).await;
    let mounts = b.eval("r", "() => window.__mounts", Value::Null).await;
    assert_eq!(
        mounts, 2,
        "StrictMode ran the effect twice (a development build)"
    );
    write(&s, 9, "react").await;
    assert_page_has_log(&mut b, "r", &s, before_seq).await;
    let later = create_job(&s, &admin, "", "after").await;
    b.wait_for("r", &row(&later.id), "attached", SETTLE).await;
    let rows = b
        .eval(
            "r",
            r#"() => document.querySelectorAll('[data-testid="job-row"]').length"#,
            Value::Null,
        )
        .await;
    assert_eq!(rows, 8, "one row per job (7 written + 1 before)");
    // notifications: each of alice's (and the org-wide ones) once, none of bob's; alice is online
    let notes = r#"(n) => document.querySelectorAll('[data-testid="notification"]').length === n"#;
    b.wait_until("r", notes, json!(2), SETTLE).await;
    let unread = r#"() => document.querySelector('[data-testid="unread"]').textContent"#;
    assert_eq!(
        b.eval("r", unread, Value::Null).await,
        "2",
        "alice's two, not bob's"
    );
    let me = r#"[data-testid="online"][data-user-id="alice"]"#;
    b.wait_for("r", me, "attached", SETTLE).await;
    assert_eq!(
        connections(&s, "alice").await,
        1,
        "one stream under StrictMode"
    );
    let subscribe = "/orgpulse.v1.EventService/Subscribe".to_string();
    let opened = b
        .requests("r")
        .await
        .iter()
        .filter(|p| **p == subscribe)
        .count();
    assert_eq!(opened, 1, "Subscribe requests");
    b.quit().await;
}

/// How many requests of `method` (e.g. "SetPresence") page `page` has made.
async fn calls(b: &mut Browser, page: &str, method: &str) -> usize {
    let path = format!("/orgpulse.v1.EventService/{method}");
    b.requests(page)
        .await
        .iter()
        .filter(|p| **p == path)
        .count()
}

#[tokio::test]
async fn sdk_react_presence_and_broadcast_hooks_under_strict_mode() {
    let Some((_serial, _s, mut b, base)) = harness().await else {
        return;
    };
    for user in ["alice", "bob"] {
        let url = format!("{base}/e2e/react.html?user={user}");
        open(&mut b, user, &url, None, 3600).await;
    }
    // each sees both entries: usePresence's snapshot merged with the other's presence_state
    let entries = r#"(want) => JSON.stringify([...document.querySelectorAll('[data-testid="presence"]')]
        .map((p) => p.dataset.userId)) === JSON.stringify(want)"#;
    for user in ["alice", "bob"] {
        b.wait_until(user, entries, json!(["alice", "bob"]), SETTLE)
            .await;
    }
    // StrictMode mounted, unmounted and mounted again: still one SetPresence, no remove between
    assert_eq!(
        b.eval("alice", "() => window.__mounts", Value::Null).await,
        2
    );
    assert_eq!(calls(&mut b, "alice", "SetPresence").await, 1);
    assert_eq!(calls(&mut b, "alice", "Subscribe").await, 1);

    // a broadcast reaches both pages once (the sender's own too)
    b.click("bob", r#"[data-testid="wave"]"#).await;
    let heard = r#"(n) => window.__broadcasts.length === n"#;
    for user in ["alice", "bob"] {
        b.wait_until(user, heard, json!(1), SETTLE).await;
        let got = b.eval(user, "() => window.__broadcasts", Value::Null).await;
        assert_eq!(got, json!([["bob", {"wave": true}]]), "{user} heard");
    }

    // unmounting the hook removes alice's entry for bob
    b.click("alice", r#"[data-testid="leave"]"#).await;
    b.wait_until("bob", entries, json!(["bob"]), SETTLE).await;
    assert_eq!(
        calls(&mut b, "alice", "SetPresence").await,
        2,
        "the set, then the removal"
    );
    b.quit().await;
}

/// Runs `script` (in clients/web) with the SDK in Node against `s` as `token`; its one JSON line.
async fn sdk_in_node(s: &TestServer, script: &str, token: &str) -> Value {
    let out = tokio::process::Command::new("node")
        .arg(script)
        .current_dir(web_dir().join("../clients/web"))
        .env("ORGPULSE_URL", &s.url)
        .env("ORGPULSE_TOKEN", token)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(SETTLE, out)
        .await
        .unwrap_or_else(|_| panic!("node {script} ended within {SETTLE:?}"))
        .unwrap_or_else(|e| panic!("node {script}: {e}"));
    assert!(
        out.status.success(),
        "node {script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON line")
}

#[tokio::test]
async fn sdk_in_node_writes_jobs_and_receives_each_event_once() {
    if prerequisites("the SDK Node test").is_none() {
        return;
    }
    let _serial = SERIAL.lock().await;
    sdk_pages();
    let s = sdk_server(HEARTBEAT_SECS, &["--presence-grace", "1s"]).await;
    let v = sdk_in_node(&s, "e2e/node-worker.mjs", &token(ORG, "worker", "member")).await;
    let received: Vec<Event> = v["seqs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|seq| Event {
            seq: seq.as_u64().unwrap(),
            ..Default::default()
        })
        .collect();
    let log = log_of(&s.dir, ORG);
    assert_eq!(log.len(), 5, "one create and four updates");
    assert_exactly_once(&received, &log, 1..=5, "worker", &[]);
}

/// API.md "Input limits": the SDK's `publish` of `data` nested 33 levels is refused
/// (INVALID_ARGUMENT naming the limit); 32 levels (the most the server takes) reach the SDK
/// intact in Node, both by a stream and by polling (`forcePoll`).
#[tokio::test]
async fn sdk_in_node_receives_32_levels_of_data_by_stream_and_by_poll() {
    if prerequisites("the SDK Node test").is_none() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let s = sdk_server(HEARTBEAT_SECS, &["--presence-grace", "1s"]).await;
    let v = sdk_in_node(&s, "e2e/node-deep.mjs", &token(ORG, "ada", "admin")).await;
    let mut deepest = json!(1);
    for _ in 0..32 {
        deepest = json!({ "a": deepest });
    }
    assert_eq!(v["refused"]["code"], 3, "INVALID_ARGUMENT: {v}");
    assert_eq!(
        v["refused"]["message"],
        "data nests deeper than 32 levels; at most 32 allowed"
    );
    let log = log_of(&s.dir, ORG);
    assert_eq!(log.len(), 1, "one entity change");
    for how in ["stream", "poll"] {
        let received = [Event {
            seq: v[how]["seq"].as_u64().expect("a seq"),
            ..Default::default()
        }];
        assert_exactly_once(&received, &log, 1..=1, "ada", &[]);
        assert_eq!(v[how]["data"], deepest, "by {how}");
    }
}
