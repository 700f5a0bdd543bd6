//! Browser end-to-end tests of the dashboard (issue 4): the real `orgpulse-server`, Debian's
//! Chromium driven through playwright-core by `web/test/driver.mjs`, and native gRPC writes whose
//! effect the page must show, bounded in time. Under `CI=true` a missing Chromium or
//! `web/node_modules` fails the test; elsewhere it is skipped with the reason printed.

mod support;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use orgpulse::proto::{
    CreateJobRequest, DeleteJobRequest, GetJobRequest, Job, JobStatus, ListJobsRequest,
    ListNotificationsRequest, ListOnlineRequest, SendNotificationRequest, Severity,
    UpdateJobRequest,
};
use serde_json::{Value, json};
use support::{ServerOpts, TestServer, token};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStdin, ChildStdout, Command},
};

/// The server's heartbeat in these tests; the page is told the same with `?heartbeat=`.
const HEARTBEAT_SECS: u64 = 2;
/// Stream acceptance: a change shows within 1 s; with `?transport=poll` within 2 s.
const LIVE: Duration = Duration::from_secs(1);
const POLLED: Duration = Duration::from_secs(2);
/// Connection changes (start-up, reconnect with backoff, fallback) get more room.
const SETTLE: Duration = Duration::from_secs(30);

/// Browser tests share two cores with everything else: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn web_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("web")
}

/// The Chromium to drive, or None (test skipped) when this machine lacks what the test needs.
fn prerequisites() -> Option<PathBuf> {
    let chromium = PathBuf::from(std::env::var("CHROMIUM").unwrap_or("/usr/bin/chromium".into()));
    let node_ok = std::process::Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let missing = if !chromium.exists() {
        format!(
            "{} missing (apt-get install -y chromium)",
            chromium.display()
        )
    } else if !node_ok {
        "node missing".to_string()
    } else if !web_dir().join("node_modules/playwright-core").exists() {
        "web/node_modules missing (npm ci in web/)".to_string()
    } else {
        return Some(chromium);
    };
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "dashboard browser test: {missing}"
    );
    eprintln!("skipping the dashboard browser test: {missing}");
    None
}

/// `web/test/driver.mjs`: one JSON command per line in, one JSON answer per line out.
struct Browser {
    child: Child,
    stdin: ChildStdin,
    out: Lines<BufReader<ChildStdout>>,
}

impl Browser {
    async fn launch(chromium: &Path) -> Self {
        let mut child = Command::new("node")
            .arg("test/driver.mjs")
            .current_dir(web_dir())
            .env("CHROMIUM", chromium)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn node web/test/driver.mjs");
        let stdin = child.stdin.take().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut b = Browser { child, stdin, out };
        let version = b
            .answer(Duration::from_secs(60))
            .await
            .expect("chromium did not start");
        eprintln!("driving chromium {version}");
        b
    }

    async fn answer(&mut self, within: Duration) -> Result<Value, String> {
        let line = tokio::time::timeout(within, self.out.next_line())
            .await
            .map_err(|_| format!("no answer from the browser driver within {within:?}"))?
            .map_err(|e| e.to_string())?
            .ok_or("the browser driver exited")?;
        let v: Value = serde_json::from_str(&line).map_err(|e| format!("{e}: {line}"))?;
        if v["ok"] == true {
            Ok(v["value"].clone())
        } else {
            Err(v["error"].to_string())
        }
    }

    /// Sends a command; waits for its answer a little longer than the command's own timeout.
    async fn call(&mut self, cmd: Value) -> Result<Value, String> {
        self.stdin
            .write_all(format!("{cmd}\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let own = cmd["timeout"].as_u64().unwrap_or(10_000);
        self.answer(Duration::from_millis(own) + Duration::from_secs(15))
            .await
    }

    async fn must(&mut self, cmd: Value) -> Value {
        match self.call(cmd.clone()).await {
            Ok(v) => v,
            Err(e) => panic!("browser command {cmd} failed: {e}"),
        }
    }

    async fn open(&mut self, page: &str, url: &str) {
        self.must(json!({"cmd": "open", "page": page, "url": url}))
            .await;
    }

    async fn wait_for(&mut self, page: &str, selector: &str, state: &str, within: Duration) {
        let timeout = within.as_millis() as u64;
        self.must(json!({"cmd": "waitFor", "page": page, "selector": selector, "state": state, "timeout": timeout}))
            .await;
    }

    async fn wait_until(&mut self, page: &str, js: &str, arg: Value, within: Duration) -> Value {
        let timeout = within.as_millis() as u64;
        self.must(
            json!({"cmd": "waitUntil", "page": page, "js": js, "arg": arg, "timeout": timeout}),
        )
        .await
    }

    async fn eval(&mut self, page: &str, js: &str, arg: Value) -> Value {
        self.must(json!({"cmd": "eval", "page": page, "js": js, "arg": arg}))
            .await
    }

    async fn fill(&mut self, page: &str, selector: &str, value: &str) {
        self.must(json!({"cmd": "fill", "page": page, "selector": selector, "value": value}))
            .await;
    }

    async fn click(&mut self, page: &str, selector: &str) {
        self.must(json!({"cmd": "click", "page": page, "selector": selector}))
            .await;
    }

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

    async fn has(&mut self, page: &str, selector: &str) -> bool {
        self.eval(
            page,
            "(s) => document.querySelector(s) !== null",
            json!(selector),
        )
        .await
            == true
    }

    /// The job ids of the table's rows, in page order (duplicates kept).
    async fn row_ids(&mut self, page: &str) -> Vec<String> {
        let js = r#"() => [...document.querySelectorAll('[data-testid="job-row"]')].map((r) => r.dataset.jobId)"#;
        serde_json::from_value(self.eval(page, js, Value::Null).await).unwrap()
    }

    /// URL paths the page has requested.
    async fn requests(&mut self, page: &str) -> Vec<String> {
        serde_json::from_value(self.must(json!({"cmd": "requests", "page": page})).await).unwrap()
    }

    async fn quit(mut self) {
        let _ = self.stdin.write_all(b"{\"cmd\":\"quit\"}\n").await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

fn row(id: &str) -> String {
    format!(r#"[data-testid="job-row"][data-job-id="{id}"]"#)
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
    let Some(chromium) = prerequisites() else {
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
    // one stream per tab
    let online = s
        .events(&alice)
        .await
        .list_online(ListOnlineRequest::default())
        .await;
    let online = online.expect("ListOnline").into_inner().members;
    let streams: Vec<_> = online
        .iter()
        .map(|m| (m.user_id.as_str(), m.connections))
        .collect();
    assert!(
        streams.contains(&("alice", 1)) && streams.contains(&("victor", 1)),
        "{streams:?}"
    );

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
    let Some(chromium) = prerequisites() else {
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
    let Some(chromium) = prerequisites() else {
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
