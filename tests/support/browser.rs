//! Debian's Chromium driven through playwright-core by `web/test/driver.mjs`, for the browser
//! end-to-end tests (tests/dashboard.rs, tests/sdk_browser.rs): one JSON command per line in, one
//! JSON answer per line out. Under `CI=true` a missing Chromium or `node_modules` fails the test;
//! elsewhere it is skipped with the reason printed.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStdin, ChildStdout, Command},
};

/// Browser tests share two cores with everything else: one at a time.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub fn web_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("web")
}

/// Runs `node SCRIPT` in `dir` (e.g. a bundler for the pages a test opens) and asserts it succeeded.
pub fn run_node(dir: &Path, script: &str) {
    let status = std::process::Command::new("node")
        .arg(script)
        .current_dir(dir)
        .status()
        .unwrap_or_else(|e| panic!("node {script}: {e}"));
    assert!(
        status.success(),
        "node {script} in {} failed",
        dir.display()
    );
}

/// Bundles the SDK's test pages (`clients/web/e2e/build.mjs`); returns their directory.
pub fn sdk_pages() -> PathBuf {
    let sdk = web_dir().join("../clients/web");
    assert!(
        sdk.join("dist/index.js").exists(),
        "clients/web/dist missing: run `npm run build` at the repository root"
    );
    run_node(&sdk, "e2e/build.mjs");
    sdk.join("e2e/dist")
}

/// A server for the SDK's pages: a heartbeat every `heartbeat_secs`, and `extra` flags.
pub async fn sdk_server(heartbeat_secs: u64, extra: &[&str]) -> super::TestServer {
    let mut extra_args = vec![
        "--heartbeat-interval".to_string(),
        format!("{heartbeat_secs}s"),
    ];
    extra_args.extend(extra.iter().map(|s| s.to_string()));
    super::TestServer::start_with(super::ServerOpts {
        extra_args,
        ..Default::default()
    })
    .await
}

/// The Chromium to drive, or None (test skipped) when this machine lacks what the test needs.
pub fn prerequisites(what: &str) -> Option<PathBuf> {
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
    } else if !web_dir().join("../node_modules/playwright-core").exists() {
        "node_modules missing (npm ci at the repository root)".to_string()
    } else {
        return Some(chromium);
    };
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{what}: {missing}"
    );
    eprintln!("skipping {what}: {missing}");
    None
}

/// `web/test/driver.mjs`: one JSON command per line in, one JSON answer per line out.
pub struct Browser {
    child: Child,
    stdin: ChildStdin,
    out: Lines<BufReader<ChildStdout>>,
}

impl Browser {
    pub async fn launch(chromium: &Path) -> Self {
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

    pub async fn answer(&mut self, within: Duration) -> Result<Value, String> {
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
    pub async fn call(&mut self, cmd: Value) -> Result<Value, String> {
        self.stdin
            .write_all(format!("{cmd}\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let own = cmd["timeout"].as_u64().unwrap_or(10_000);
        self.answer(Duration::from_millis(own) + Duration::from_secs(15))
            .await
    }

    pub async fn must(&mut self, cmd: Value) -> Value {
        match self.call(cmd.clone()).await {
            Ok(v) => v,
            Err(e) => panic!("browser command {cmd} failed: {e}"),
        }
    }

    pub async fn open(&mut self, page: &str, url: &str) {
        self.must(json!({"cmd": "open", "page": page, "url": url}))
            .await;
    }

    pub async fn wait_for(&mut self, page: &str, selector: &str, state: &str, within: Duration) {
        let timeout = within.as_millis() as u64;
        self.must(json!({"cmd": "waitFor", "page": page, "selector": selector, "state": state, "timeout": timeout}))
            .await;
    }

    pub async fn wait_until(
        &mut self,
        page: &str,
        js: &str,
        arg: Value,
        within: Duration,
    ) -> Value {
        let timeout = within.as_millis() as u64;
        self.must(
            json!({"cmd": "waitUntil", "page": page, "js": js, "arg": arg, "timeout": timeout}),
        )
        .await
    }

    pub async fn eval(&mut self, page: &str, js: &str, arg: Value) -> Value {
        self.must(json!({"cmd": "eval", "page": page, "js": js, "arg": arg}))
            .await
    }

    pub async fn fill(&mut self, page: &str, selector: &str, value: &str) {
        self.must(json!({"cmd": "fill", "page": page, "selector": selector, "value": value}))
            .await;
    }

    pub async fn click(&mut self, page: &str, selector: &str) {
        self.must(json!({"cmd": "click", "page": page, "selector": selector}))
            .await;
    }

    /// Chooses the option with `value` in the `<select>` at `selector`, as a user would.
    pub async fn select(&mut self, page: &str, selector: &str, value: &str) {
        self.must(json!({"cmd": "select", "page": page, "selector": selector, "value": value}))
            .await;
    }

    pub async fn has(&mut self, page: &str, selector: &str) -> bool {
        self.eval(
            page,
            "(s) => document.querySelector(s) !== null",
            json!(selector),
        )
        .await
            == true
    }

    /// URL paths the page has requested.
    pub async fn requests(&mut self, page: &str) -> Vec<String> {
        serde_json::from_value(self.must(json!({"cmd": "requests", "page": page})).await).unwrap()
    }

    pub async fn quit(mut self) {
        let _ = self.stdin.write_all(b"{\"cmd\":\"quit\"}\n").await;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}
