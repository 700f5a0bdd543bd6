//! Browser end-to-end tests of the dashboard (issues 4 and 10): the real `orgpulse-server`, Debian's
//! Chromium driven through playwright-core (`support::browser`), and native gRPC writes or outbox
//! rows committed in a PostgreSQL database of the test's own, whose effect the page must show,
//! bounded in time. Under `CI=true` a missing Chromium or the
//! workspace's `node_modules` fails the test; elsewhere it is skipped with the reason printed.

mod support;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use orgpulse::proto::{
    CreateJobRequest, DeleteJobRequest, EventKind, GetJobRequest, Job, JobStatus, ListJobsRequest,
    ListNotificationsRequest, ListOnlineRequest, SendNotificationRequest, Severity,
    UpdateJobRequest,
};
use serde_json::{Value, json};
use support::browser::{Browser, SERIAL, prerequisites};
use support::pg::Db;
use support::{ServerOpts, TestServer, log_of, token};

/// The server's heartbeat in these tests; the page is told the same with `?heartbeat=`.
const HEARTBEAT_SECS: u64 = 2;
/// Stream acceptance: a change shows within 1 s; with `?transport=poll` within 2 s.
const LIVE: Duration = Duration::from_secs(1);
const POLLED: Duration = Duration::from_secs(2);
/// Connection changes (start-up, reconnect with backoff, fallback) get more room.
const SETTLE: Duration = Duration::from_secs(30);

/// The dashboard's own commands on top of the generic driver.
impl Browser {
    /// Waits for the badge to be in `state`, saying so in its text too.
    async fn wait_badge(&mut self, page: &str, state: &str, within: Duration) {
        let js = r#"(state) => {
            const b = document.querySelector('[data-testid="connection-badge"]');
            return b.dataset.state === state && b.textContent.startsWith(state);
        }"#;
        self.wait_until(page, js, json!(state), within).await;
    }

    /// Every state the badge has shown since the page was opened, in order.
    async fn badge_history(&mut self, page: &str) -> Vec<String> {
        let v = self
            .eval(page, "() => window.__badgeStates", Value::Null)
            .await;
        serde_json::from_value(v).unwrap()
    }

    async fn wait_row(&mut self, page: &str, id: &str, within: Duration) {
        self.wait_for(page, &row(id), "attached", within).await;
    }

    async fn wait_row_gone(&mut self, page: &str, id: &str, within: Duration) {
        self.wait_for(page, &row(id), "detached", within).await;
    }

    async fn wait_row_state(
        &mut self,
        page: &str,
        id: &str,
        status: &str,
        progress: u32,
        within: Duration,
    ) {
        let js = r#"([id, status, pct]) => {
            const r = document.querySelector(`[data-testid="job-row"][data-job-id="${id}"]`);
            return !!r && r.dataset.status === status
                && r.querySelector('[data-testid="job-progress"]').textContent === pct;
        }"#;
        self.wait_until(
            page,
            js,
            json!([id, status, format!("{progress}%")]),
            within,
        )
        .await;
    }

    async fn wait_notification(&mut self, page: &str, id: &str, within: Duration) {
        let sel = format!(r#"[data-testid="notification"][data-notification-id="{id}"]"#);
        self.wait_for(page, &sel, "attached", within).await;
    }

    /// Waits for the ticker line of `entity` (type, id, action) and returns its text.
    async fn wait_ticker_line(
        &mut self,
        page: &str,
        entity: [&str; 3],
        within: Duration,
    ) -> String {
        let js = r#"([type, id, action]) => document.querySelector(`[data-testid="ticker-item"]`
            + `[data-entity-type="${type}"][data-entity-id="${id}"][data-action="${action}"]`)?.textContent"#;
        let text = self.wait_until(page, js, json!(entity), within).await;
        text.as_str().unwrap().to_string()
    }

    /// Waits until the live-entities row of (type, id) says `action`.
    async fn wait_entity(&mut self, page: &str, [kind, id, action]: [&str; 3], within: Duration) {
        let sel = format!(r#"{}[data-action="{action}"]"#, entity_row(kind, id));
        self.wait_for(page, &sel, "attached", within).await;
    }

    /// "type/id" of the live-entities rows and the entity ticker lines, in page order.
    async fn entities_shown(&mut self, page: &str) -> (Vec<String>, Vec<String>) {
        let js = r#"() => ['[data-testid="entity-row"]', '[data-testid="ticker-item"][data-kind="entityChanged"]']
            .map((sel) => [...document.querySelectorAll(sel)].map((e) => `${e.dataset.entityType}/${e.dataset.entityId}`))"#;
        serde_json::from_value(self.eval(page, js, Value::Null).await).unwrap()
    }

    /// The job ids of the table's rows, in page order (duplicates kept).
    async fn row_ids(&mut self, page: &str) -> Vec<String> {
        let js = r#"() => [...document.querySelectorAll('[data-testid="job-row"]')].map((r) => r.dataset.jobId)"#;
        serde_json::from_value(self.eval(page, js, Value::Null).await).unwrap()
    }
}

fn row(id: &str) -> String {
    format!(r#"[data-testid="job-row"][data-job-id="{id}"]"#)
}

fn entity_row(kind: &str, id: &str) -> String {
    format!(r#"[data-testid="entity-row"][data-entity-type="{kind}"][data-entity-id="{id}"]"#)
}

/// The dashboard of `base` (the server or a proxy in front of it) for `token`.
fn page_url(base: &str, query: &str, token: &str) -> String {
    format!("{base}/?heartbeat={HEARTBEAT_SECS}{query}#token={token}")
}

fn server_args() -> Vec<String> {
    let heartbeat = format!("{HEARTBEAT_SECS}s");
    ["--heartbeat-interval", &heartbeat, "--presence-grace", "1s"]
        .map(String::from)
        .to_vec()
}

/// A server on `listen` (any free port when None) using the data in `dir` (fresh when None).
async fn start_server_with(dir: Option<PathBuf>, listen: Option<String>) -> TestServer {
    TestServer::start_with(ServerOpts {
        extra_args: server_args(),
        dir,
        listen,
        ..Default::default()
    })
    .await
}

async fn start_server() -> TestServer {
    start_server_with(None, None).await
}

/// Native-gRPC writes as an org admin.
struct Writer {
    token: String,
}

impl Writer {
    fn admin(org: &str) -> Self {
        Writer {
            token: token(org, "boss", "admin"),
        }
    }

    async fn create(&self, s: &TestServer, title: &str) -> Job {
        let req = CreateJobRequest {
            title: title.into(),
            ..Default::default()
        };
        s.jobs(&self.token)
            .await
            .create_job(req)
            .await
            .expect("CreateJob")
            .into_inner()
    }

    async fn update(&self, s: &TestServer, id: &str, status: JobStatus, progress: u32) -> Job {
        let req = UpdateJobRequest {
            job_id: id.into(),
            status: Some(status as i32),
            progress: Some(progress),
            ..Default::default()
        };
        s.jobs(&self.token)
            .await
            .update_job(req)
            .await
            .expect("UpdateJob")
            .into_inner()
    }

    async fn delete(&self, s: &TestServer, id: &str) {
        let req = DeleteJobRequest {
            job_id: id.into(),
            ..Default::default()
        };
        s.jobs(&self.token)
            .await
            .delete_job(req)
            .await
            .expect("DeleteJob");
    }

    async fn notify(&self, s: &TestServer, user: &str, title: &str) -> String {
        let req = SendNotificationRequest {
            user_id: user.into(),
            title: title.into(),
            body: "Sent through native gRPC by the test.".into(),
            severity: Severity::Warning as i32,
            ..Default::default()
        };
        s.notifications(&self.token)
            .await
            .send_notification(req)
            .await
            .expect("SendNotification")
            .into_inner()
            .id
    }

    /// Every job id of the org per ListJobs, sorted.
    async fn job_ids(&self, s: &TestServer) -> Vec<String> {
        let mut client = s.jobs(&self.token).await;
        let (mut ids, mut page_token) = (vec![], String::new());
        loop {
            let req = ListJobsRequest {
                page_size: 500,
                page_token,
                ..Default::default()
            };
            let res = client.list_jobs(req).await.expect("ListJobs").into_inner();
            ids.extend(res.jobs.into_iter().map(|j| j.id));
            if res.next_page_token.is_empty() {
                break;
            }
            page_token = res.next_page_token;
        }
        ids.sort();
        ids
    }
}

/// Create, update and delete a job and notify the page's user and someone else, each through
/// native gRPC; the page must show exactly the right ones within `within`.
async fn changes_show_up(
    b: &mut Browser,
    page: &str,
    s: &TestServer,
    w: &Writer,
    within: Duration,
) -> String {
    let job = w.create(s, "resize images").await;
    b.wait_row(page, &job.id, within).await;
    w.update(s, &job.id, JobStatus::Running, 40).await;
    b.wait_row_state(page, &job.id, "running", 40, within).await;
    w.update(s, &job.id, JobStatus::Succeeded, 100).await;
    b.wait_row_state(page, &job.id, "succeeded", 100, within)
        .await;
    w.delete(s, &job.id).await;
    b.wait_row_gone(page, &job.id, within).await;

    // events arrive in seq order: once the later one shows, the earlier would have too
    let not_mine = w.notify(s, "bob", "for bob only").await;
    let mine = w.notify(s, "alice", "for alice").await;
    b.wait_notification(page, &mine, within).await;
    let sel = format!(r#"[data-notification-id="{not_mine}"]"#);
    assert!(
        !b.has(page, &sel).await,
        "a notification to another user appeared"
    );
    mine
}

#[tokio::test]
async fn dashboard_streams_live_changes() {
    let Some(chromium) = prerequisites("the dashboard browser test") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let s = start_server().await;
    let w = Writer::admin("acme");
    let mut b = Browser::launch(&chromium).await;

    let alice = token("acme", "alice", "member");
    b.open("alice", &page_url(&s.url, "", &alice)).await;
    b.wait_badge("alice", "live", SETTLE).await;
    let empty = r#"[data-testid="jobs-empty"]:not([hidden])"#;
    assert!(b.has("alice", empty).await, "empty state shown");
    let mine = changes_show_up(&mut b, "alice", &s, &w, LIVE).await;

    // mark-read: the page says so, and so does the server
    let note = format!(r#"[data-notification-id="{mine}"]"#);
    b.click("alice", &format!("{note} [data-testid=mark-read]"))
        .await;
    let read = format!(r#"{note}[data-read="true"]"#);
    b.wait_for("alice", &read, "attached", LIVE).await;
    let req = ListNotificationsRequest {
        unread_only: true,
        ..Default::default()
    };
    let unread = s.notifications(&alice).await.list_notifications(req).await;
    let unread = unread
        .expect("ListNotifications")
        .into_inner()
        .notifications;
    assert!(
        unread.iter().all(|n| n.id != mine),
        "marked read, still unread"
    );

    // another org's job never shows: create it first, then one of ours, and wait for ours
    let foreign = Writer::admin("globex").create(&s, "not yours").await;
    let ours = w.create(&s, "ours").await;
    b.wait_row("alice", &ours.id, LIVE).await;
    assert!(
        !b.has("alice", &row(&foreign.id)).await,
        "a job of another org appeared"
    );

    // the create-job form works for a member
    b.fill(
        "alice",
        "[data-testid=create-job-title]",
        "typed in the browser",
    )
    .await;
    b.fill("alice", "[data-testid=create-job-labels]", "team=web")
        .await;
    b.click("alice", "[data-testid=create-job-submit]").await;
    let js = r#"(title) => [...document.querySelectorAll('[data-testid="job-row"]')]
        .find((r) => r.textContent.includes(title))?.dataset.jobId"#;
    let id = b
        .wait_until("alice", js, json!("typed in the browser"), LIVE)
        .await;
    let req = GetJobRequest {
        job_id: id.as_str().unwrap().into(),
        ..Default::default()
    };
    let created = s
        .jobs(&w.token)
        .await
        .get_job(req)
        .await
        .expect("the browser's job exists");
    let created = created.into_inner();
    assert_eq!(
        (created.created_by.as_str(), created.labels["team"].as_str()),
        ("alice", "web")
    );

    // a viewer has no form; its presence shows on alice's page
    b.open(
        "victor",
        &page_url(&s.url, "", &token("acme", "victor", "viewer")),
    )
    .await;
    b.wait_badge("victor", "live", SETTLE).await;
    assert!(
        !b.has("victor", "[data-testid=create-job-form]").await,
        "viewer sees the create-job form"
    );
    b.wait_for(
        "alice",
        r#"[data-testid="online-member"][data-user-id="victor"]"#,
        "attached",
        SETTLE,
    )
    .await;
    // one stream per tab, once settled: a page that reconnected (its watchdog, under a loaded
    // CI) still counts its old stream until the server sees that connection close
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let online = s
            .events(&alice)
            .await
            .list_online(ListOnlineRequest::default())
            .await;
        let online = online.expect("ListOnline").into_inner().members;
        let streams: Vec<(String, u32)> = online
            .iter()
            .map(|m| (m.user_id.clone(), m.connections))
            .collect();
        let one_each = |user: &str| streams.iter().any(|(u, n)| u == user && *n == 1);
        if one_each("alice") && one_each("victor") {
            break;
        }
        eprintln!("not one stream per tab yet: {streams:?}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "not one stream per tab within {SETTLE:?}: {streams:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // naming an org the token does not belong to: the page says there is no permission
    b.open("intruder", &page_url(&s.url, "&org=globex", &alice))
        .await;
    let js = r#"() => document.querySelector('[data-testid="error"]:not([hidden])')?.textContent"#;
    let error = b.wait_until("intruder", js, Value::Null, SETTLE).await;
    assert!(error.as_str().unwrap().contains("No permission"), "{error}");

    // a screenshot with live data, for the README and for review
    let running = w.create(&s, "nightly export").await;
    w.update(&s, &running.id, JobStatus::Running, 65).await;
    let failed = w.create(&s, "sync billing").await;
    w.update(&s, &failed.id, JobStatus::Running, 10).await;
    w.update(&s, &failed.id, JobStatus::Failed, 10).await;
    w.create(&s, "rebuild search index").await;
    let last = w.notify(&s, "", "Deploy finished").await;
    b.wait_notification("alice", &last, LIVE).await;
    b.wait_row_state("alice", &running.id, "running", 65, LIVE)
        .await;
    let shot = std::env::var("ORGPULSE_SCREENSHOT")
        .unwrap_or_else(|_| format!("{}/dashboard.png", env!("CARGO_TARGET_TMPDIR")));
    b.must(json!({"cmd": "screenshot", "page": "alice", "path": shot}))
        .await;
    eprintln!("dashboard screenshot: {shot}");

    // the viewer leaves: after the presence grace alice's page shows it
    b.must(json!({"cmd": "close", "page": "victor"})).await;
    let victor = r#"[data-testid="online-member"][data-user-id="victor"]"#;
    b.wait_for("alice", victor, "detached", SETTLE).await;
    b.quit().await;
}

#[tokio::test]
async fn dashboard_survives_server_restart_and_token_expiry() {
    let Some(chromium) = prerequisites("the dashboard browser test") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let mut s = start_server().await;
    let w = Writer::admin("acme");
    let kept = w.create(&s, "kept").await;
    let doomed = w.create(&s, "doomed").await;
    let mut b = Browser::launch(&chromium).await;
    b.open(
        "alice",
        &page_url(&s.url, "", &token("acme", "alice", "member")),
    )
    .await;
    b.wait_badge("alice", "live", SETTLE).await;
    b.wait_row("alice", &doomed.id, LIVE).await;

    s.kill().await;
    b.wait_badge("alice", "reconnecting", SETTLE).await;
    // changes made while the page's server is down, through a second server on the same data
    let mut side = start_server_with(Some(s.dir.clone()), None).await;
    let born = w.create(&side, "born while down").await;
    w.update(&side, &kept.id, JobStatus::Running, 50).await;
    w.delete(&side, &doomed.id).await;
    let note = w.notify(&side, "alice", "sent while down").await;
    side.kill().await;

    s.restart().await;
    b.wait_badge("alice", "live", SETTLE).await;
    b.wait_row("alice", &born.id, LIVE).await;
    b.wait_row_gone("alice", &doomed.id, LIVE).await;
    b.wait_row_state("alice", &kept.id, "running", 50, LIVE)
        .await;
    b.wait_notification("alice", &note, LIVE).await;
    let mut rows = b.row_ids("alice").await;
    rows.sort();
    assert_eq!(
        rows,
        w.job_ids(&s).await,
        "page rows (duplicates kept) differ from ListJobs"
    );
    let history = b.badge_history("alice").await;
    assert!(
        !history.contains(&"polling".to_string()),
        "a down server is not a reason to poll: {history:?}"
    );
    changes_show_up(&mut b, "alice", &s, &w, LIVE).await;

    // a token that expires: the stream ends, the page asks for a new one and resumes with it
    let short = support::token_ttl("acme", "alice", "member", 6);
    b.open("brief", &page_url(&s.url, "", &short)).await;
    b.wait_badge("brief", "live", SETTLE).await;
    b.wait_for("brief", "[data-testid=token-form]", "visible", SETTLE)
        .await;
    let missed = w.create(&s, "created while signed out").await;
    let fresh = token("acme", "alice", "member");
    b.fill("brief", "[data-testid=token-input]", &fresh).await;
    b.click("brief", "[data-testid=token-form] button").await;
    b.wait_badge("brief", "live", SETTLE).await;
    b.wait_row("brief", &missed.id, LIVE).await;

    // a new database behind the same address: the old cursor gets resync, the page a new snapshot
    s.kill().await;
    let renewed = start_server_with(None, Some(s.addr.clone())).await;
    w.create(&renewed, "in the new database").await;
    let ids = w.job_ids(&renewed).await;
    b.wait_badge("alice", "live", SETTLE).await;
    let js = r#"(want) => JSON.stringify([...document.querySelectorAll('[data-testid="job-row"]')]
        .map((r) => r.dataset.jobId).sort()) === JSON.stringify(want)"#;
    b.wait_until("alice", js, json!(ids), SETTLE).await;
    b.quit().await;
}

#[tokio::test]
async fn dashboard_falls_back_to_polling() {
    let Some(chromium) = prerequisites("the dashboard browser test") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let s = start_server().await;
    let w = Writer::admin("acme");
    let alice = token("acme", "alice", "member");
    let mut b = Browser::launch(&chromium).await;

    // forced: never a stream, every change within 2 s
    b.open("forced", &page_url(&s.url, "&transport=poll", &alice))
        .await;
    b.wait_badge("forced", "polling", SETTLE).await;
    changes_show_up(&mut b, "forced", &s, &w, POLLED).await;
    let me = r#"[data-testid="online-member"][data-user-id="alice"]"#;
    b.wait_for("forced", me, "attached", SETTLE).await;
    let subscribe = "/orgpulse.v1.EventService/Subscribe".to_string();
    assert!(
        !b.requests("forced").await.contains(&subscribe),
        "?transport=poll opened a stream"
    );
    b.must(json!({"cmd": "close", "page": "forced"})).await;

    // a proxy that buffers responses: the stream opens but delivers nothing -> polling by itself
    let proxy = b
        .must(json!({"cmd": "proxy", "target": s.url, "mode": "buffer"}))
        .await;
    b.open("buffered", &page_url(proxy.as_str().unwrap(), "", &alice))
        .await;
    b.wait_badge("buffered", "polling", SETTLE).await;
    assert!(
        b.requests("buffered").await.contains(&subscribe),
        "never tried to stream"
    );
    changes_show_up(&mut b, "buffered", &s, &w, POLLED).await;
    b.must(json!({"cmd": "close", "page": "buffered"})).await;

    // a proxy that refuses streams: several answered failures in a row -> polling
    let proxy = b
        .must(json!({"cmd": "proxy", "target": s.url, "mode": "refuse-streams"}))
        .await;
    let proxy = proxy.as_str().unwrap();
    b.open("refused", &page_url(proxy, "&streamRetry=3", &alice))
        .await;
    b.wait_badge("refused", "polling", SETTLE).await;
    changes_show_up(&mut b, "refused", &s, &w, POLLED).await;
    // streams get through again: the page goes back to streaming by itself
    b.must(json!({"cmd": "proxyMode", "url": proxy, "mode": "pass"}))
        .await;
    b.wait_badge("refused", "live", SETTLE).await;
    changes_show_up(&mut b, "refused", &s, &w, LIVE).await;
    b.quit().await;
}

/// Commits one outbox row for org acme in a transaction of its own, as the product would with
/// its own change; `user` None = the whole org.
async fn commit_outbox_row(
    product: &mut tokio_postgres::Client,
    [kind, id, action]: [&str; 3],
    data: Value,
    actor: &str,
    user: Option<&str>,
) {
    let tx = product.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO orgpulse_outbox (org_id, entity_type, entity_id, action, data, actor, user_id)
         VALUES ('acme', $1, $2, $3, $4::text::jsonb, $5, $6)",
        &[&kind, &id, &action, &data.to_string(), &actor, &user],
    )
    .await
    .expect("INSERT INTO orgpulse_outbox");
    tx.commit().await.expect("COMMIT");
}

#[tokio::test]
async fn dashboard_shows_entity_events_from_the_outbox() {
    let Some(chromium) = prerequisites("the dashboard browser test") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let db = Db::create().await;
    let mut extra_args = server_args();
    extra_args.extend(["--outbox".to_string(), db.url()]);
    let s = TestServer::start_with(ServerOpts {
        extra_args,
        ..Default::default()
    })
    .await;
    let mut product = db.client().await;
    let mut b = Browser::launch(&chromium).await;
    let alice = token("acme", "alice", "member");
    b.open("alice", &page_url(&s.url, "", &alice)).await;
    b.wait_badge("alice", "live", SETTLE).await;
    let empty = r#"[data-testid="entities-empty"]:not([hidden])"#;
    // Waited for rather than looked up: the first wait of a page readies Playwright's selector
    // engine there (100-300 ms seen), which would otherwise count in the first row's time below.
    b.wait_for("alice", empty, "attached", LIVE).await;

    // a committed row shows in the ticker ("actor: type id action") and in the panel within 1 s
    let created = ["invoice", "inv_1", "created"];
    let start = Instant::now();
    commit_outbox_row(&mut product, created, json!({"amount": 12}), "alice", None).await;
    let line = b.wait_ticker_line("alice", created, LIVE).await;
    b.wait_entity("alice", created, LIVE).await;
    eprintln!("outbox COMMIT -> ticker and panel: {:?}", start.elapsed());
    assert!(line.contains("alice: invoice inv_1 created"), "{line:?}");

    // a second change of the same entity updates its row in place
    let mark = r#"(sel) => { document.querySelector(sel).__first = true; }"#;
    b.eval("alice", mark, json!(entity_row("invoice", "inv_1")))
        .await;
    let paid = ["invoice", "inv_1", "paid"];
    let start = Instant::now();
    let data = json!({"amount": 12, "status": "paid"});
    commit_outbox_row(&mut product, paid, data, "bob", None).await;
    b.wait_entity("alice", paid, LIVE).await;
    eprintln!("second row -> row updated: {:?}", start.elapsed());
    let js = r#"(sel) => [...document.querySelectorAll(sel)].map((r) => ({
        first: r.__first === true,
        data: r.querySelector('[data-testid="entity-data"]').textContent,
        by: r.children[4].textContent,
    }))"#;
    let rows = b
        .eval("alice", js, json!(entity_row("invoice", "inv_1")))
        .await;
    let want = json!([{"first": true, "data": r#"{"amount":12,"status":"paid"}"#, "by": "bob"}]);
    assert_eq!(rows, want, "one row for invoice inv_1, the same element");
    let line = b.wait_ticker_line("alice", paid, LIVE).await;
    assert!(line.contains("bob: invoice inv_1 paid"), "{line:?}");

    // a row for another user never shows; one for alice after it does (events arrive in seq
    // order: once the later one shows, the earlier would have too)
    let bobs = ["invoice", "inv_2", "created"];
    commit_outbox_row(&mut product, bobs, json!({}), "boss", Some("bob")).await;
    let hers = ["project", "prj_1", "created"];
    commit_outbox_row(
        &mut product,
        hers,
        json!({"name": "x"}),
        "boss",
        Some("alice"),
    )
    .await;
    b.wait_entity("alice", hers, LIVE).await;
    let (panel, ticker) = b.entities_shown("alice").await;
    assert_eq!(
        panel,
        ["project/prj_1", "invoice/inv_1"],
        "panel, newest first"
    );
    assert_eq!(
        ticker,
        ["project/prj_1", "invoice/inv_1", "invoice/inv_1"],
        "ticker"
    );

    // the page's entity lines are exactly the log's entity events alice may see, in seq order
    let js = r#"() => [...document.querySelectorAll('[data-testid="ticker-item"][data-kind="entityChanged"]')]
        .map((li) => Number(li.dataset.seq)).reverse()"#;
    let shown: Vec<u64> = serde_json::from_value(b.eval("alice", js, Value::Null).await).unwrap();
    let visible: Vec<u64> = log_of(&s.dir, "acme")
        .into_iter()
        .filter(|(_, kind, aud)| {
            *kind == EventKind::Entity as i32 && aud.as_deref().is_none_or(|a| a == "alice")
        })
        .map(|(seq, _, _)| seq)
        .collect();
    assert_eq!(
        shown, visible,
        "page's entity seqs (left) != the log's (right)"
    );
    assert_eq!(visible.len(), 3);

    // the type filter narrows the panel and the ticker (no job lines), also for changes after it
    let job = Writer::admin("acme").create(&s, "not an entity").await;
    b.wait_row("alice", &job.id, LIVE).await;
    let filter = "[data-testid=entity-type-filter]";
    b.select("alice", filter, "invoice").await;
    commit_outbox_row(
        &mut product,
        ["project", "prj_2", "created"],
        json!({}),
        "boss",
        None,
    )
    .await;
    let inv3 = ["invoice", "inv_3", "created"];
    commit_outbox_row(&mut product, inv3, json!({}), "boss", None).await;
    b.wait_entity("alice", inv3, LIVE).await;
    let (panel, ticker) = b.entities_shown("alice").await;
    assert_eq!(panel, ["invoice/inv_3", "invoice/inv_1"]);
    assert_eq!(ticker, ["invoice/inv_3", "invoice/inv_1", "invoice/inv_1"]);
    let jobs_line = r#"[data-testid="ticker-item"]:not([data-kind="entityChanged"])"#;
    assert!(
        !b.has("alice", jobs_line).await,
        "other lines shown while narrowed"
    );
    b.select("alice", filter, "").await;
    b.wait_for("alice", &entity_row("project", "prj_2"), "attached", LIVE)
        .await;
    let (panel, _) = b.entities_shown("alice").await;
    assert_eq!(
        panel,
        [
            "invoice/inv_3",
            "project/prj_2",
            "project/prj_1",
            "invoice/inv_1"
        ]
    );
    let shot = format!("{}/dashboard-entities.png", env!("CARGO_TARGET_TMPDIR"));
    b.must(json!({"cmd": "screenshot", "page": "alice", "path": shot}))
        .await;
    eprintln!("dashboard screenshot: {shot}");
    b.quit().await;
}

/// Whether the page at `width` px scrolls sideways (something wider than the window).
async fn overflows(b: &mut Browser, page: &str, width: u32) -> bool {
    b.must(json!({"cmd": "viewport", "page": page, "width": width, "height": 800}))
        .await;
    let js = "() => document.documentElement.scrollWidth > window.innerWidth";
    b.eval(page, js, Value::Null).await.as_bool().unwrap()
}

/// The first screen and small ones: no "connecting" before there is a token, nothing wider than a
/// 360 px phone, a notification list of bounded length and height. First, on the `--demo`
/// workload, the README's screenshot (written to docs/dashboard.png with ORGPULSE_UPDATE_DOCS=1).
#[tokio::test]
async fn dashboard_fits_small_screens_and_a_flood_of_notifications() {
    let Some(chromium) = prerequisites("the dashboard browser test") else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let mut args = server_args();
    args.push("--demo".into());
    let s = TestServer::start_with(ServerOpts {
        extra_args: args,
        ..Default::default()
    })
    .await;
    let mut b = Browser::launch(&chromium).await;

    // Without a token: the token form, and no connection badge.
    b.open("first", &format!("{}/", s.url)).await;
    b.wait_for("first", "[data-testid=token-form]", "visible", SETTLE)
        .await;
    assert!(
        !b.has("first", "[data-testid=connection-badge]:not([hidden])")
            .await,
        "a connection state shown before there is a token"
    );

    // The README's screenshot: the demo's live jobs, a notification of a finished one, who is
    // online.
    let bob = token("demo", "bob", "member");
    b.open("bob", &page_url(&s.url, "", &bob)).await;
    let alice = token("demo", "alice", "admin");
    b.open("alice", &page_url(&s.url, "", &alice)).await;
    b.wait_badge("alice", "live", SETTLE).await;
    let js = r#"() => document.querySelector('[data-testid="job-row"][data-status="running"]')
        && document.querySelector('[data-testid="notification"]')
        && document.querySelectorAll('[data-testid="online-member"]').length === 2"#;
    b.wait_until("alice", js, Value::Null, SETTLE).await;
    let shot = if std::env::var_os("ORGPULSE_UPDATE_DOCS").is_some() {
        format!("{}/docs/dashboard.png", env!("CARGO_MANIFEST_DIR"))
    } else {
        format!("{}/dashboard-demo.png", env!("CARGO_TARGET_TMPDIR"))
    };
    b.must(json!({"cmd": "screenshot", "page": "alice", "path": shot}))
        .await;
    eprintln!("dashboard screenshot: {shot}");

    // More notifications than the list keeps, each title one long word.
    let w = Writer::admin("demo");
    let mut last = String::new();
    for i in 0..60 {
        last = w
            .notify(
                &s,
                "",
                &format!("Nightly-export-{i}-finished-{}", "x".repeat(60)),
            )
            .await;
    }
    b.wait_notification("alice", &last, LIVE).await;
    let js = r#"() => {
        const list = document.querySelector('[data-testid="notification-list"]');
        return [list.children.length, list.getBoundingClientRect().height, window.innerHeight];
    }"#;
    let [shown, height, window]: [f64; 3] =
        serde_json::from_value(b.eval("alice", js, Value::Null).await).unwrap();
    assert!(shown <= 50.0, "{shown} notifications listed");
    assert!(
        height < window,
        "the list ({height} px) outgrows the window ({window} px)"
    );
    // A job with a long title, next to the demo's.
    let long = w
        .create(
            &s,
            &format!("Re-index-the-{}-catalogue", "search".repeat(12)),
        )
        .await;
    b.wait_row("alice", &long.id, LIVE).await;
    for width in [420, 360] {
        assert!(
            !overflows(&mut b, "alice", width).await,
            "the dashboard scrolls sideways at {width} px"
        );
    }
    b.quit().await;
}
