// Drives Debian's Chromium through playwright-core for tests/dashboard.rs and tests/sdk_browser.rs:
// reads one JSON command per line on stdin, answers one JSON line on stdout ({ok, value} or {ok:
// false, error}). Every wait is bounded by its timeout. Logs (page console, errors) go to stderr.
import { createHmac } from "node:crypto";
import { createInterface } from "node:readline";
import { launchChromium, recordBadge } from "./browser.mjs";
import { startProxy } from "./proxy.mjs";

const browser = await launchChromium();
/** name -> { context, page, requests } */
const pages = new Map();
/** name -> a browser context shared by several pages (tabs of one browser profile) */
const contexts = new Map();

/** An HS256 JWT the way orgpulse-server accepts it (tests pass the server's secret); `groups`, when given, as its claim. */
function mint({ secret, org, ttl }, sub, role, groups) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const now = Math.floor(Date.now() / 1000);
  const claims = { sub, org, roles: [role], iat: now, exp: now + ttl, ...(groups?.length ? { groups } : {}) };
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}
/** url -> proxy */
const proxies = new Map();

function page(name) {
  const p = pages.get(name);
  if (!p) throw new Error(`no page named ${name}`);
  return p;
}

const commands = {
  /**
   * Opens `url` in a new page. With `context`, the page joins that named context (created on first
   * use) as another tab; else it gets a context of its own. With `tokens` ({secret, org, ttl}), the
   * page can call window.orgpulseMintToken(user, role, groups?) for a fresh token.
   */
  async open({ page: name, url, context: shared, tokens, timeout = 10_000 }) {
    const old = pages.get(name);
    if (old) await (old.shared ? old.page.close() : old.context.close());
    let context = shared && contexts.get(shared);
    if (!context) {
      context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
      if (tokens) await context.exposeFunction("orgpulseMintToken", (sub, role, groups) => mint(tokens, sub, role, groups));
      if (shared) contexts.set(shared, context);
    }
    const p = await context.newPage();
    const requests = [];
    p.on("request", (r) => requests.push(new URL(r.url()).pathname));
    p.on("console", (m) => console.error(`[${name}] ${m.type()}: ${m.text()}`));
    p.on("pageerror", (e) => console.error(`[${name}] page error: ${e.message}`));
    await p.addInitScript(recordBadge);
    pages.set(name, { context, page: p, requests, shared: !!shared });
    await p.goto(url, { timeout });
  },
  async waitFor({ page: name, selector, state = "attached", timeout }) {
    await page(name).page.waitForSelector(selector, { state, timeout });
  },
  /** Waits until the expression `js` (a function of `arg`) returns truthy; returns its value. */
  async waitUntil({ page: name, js, arg = null, timeout }) {
    const h = await page(name).page.waitForFunction(`(${js})(${JSON.stringify(arg)})`, null, { timeout, polling: 25 });
    return h.jsonValue();
  },
  async eval({ page: name, js, arg = null }) {
    return page(name).page.evaluate(`(${js})(${JSON.stringify(arg)})`);
  },
  async fill({ page: name, selector, value, timeout = 5_000 }) {
    await page(name).page.fill(selector, value, { timeout });
  },
  async click({ page: name, selector, timeout = 5_000 }) {
    await page(name).page.click(selector, { timeout });
  },
  /** Presses `key` (e.g. "Enter") in the element at `selector`. */
  async press({ page: name, selector, key, timeout = 5_000 }) {
    await page(name).page.press(selector, key, { timeout });
  },
  /** Cuts the page's browser context off the network (`offline` true) or reconnects it. */
  async offline({ page: name, offline }) {
    await page(name).context.setOffline(offline);
  },
  /** Chooses the option with `value` in the <select> at `selector`, as a user would. */
  async select({ page: name, selector, value, timeout = 5_000 }) {
    await page(name).page.selectOption(selector, value, { timeout });
  },
  /** Resizes the page's viewport, as a narrower window or a phone would have it. */
  async viewport({ page: name, width, height }) {
    await page(name).page.setViewportSize({ width, height });
  },
  async screenshot({ page: name, path }) {
    await page(name).page.screenshot({ path, fullPage: true, animations: "disabled" });
  },
  async requests({ page: name }) {
    return page(name).requests;
  },
  async close({ page: name }) {
    const p = page(name);
    await (p.shared ? p.page.close({ runBeforeUnload: true }) : p.context.close());
    pages.delete(name);
  },
  async proxy({ target, mode, static: dir }) {
    const p = await startProxy(target, mode, dir);
    proxies.set(p.url, p);
    return p.url;
  },
  async proxyMode({ url, mode }) {
    proxies.get(url).setMode(mode);
  },
};

async function quit() {
  for (const p of proxies.values()) p.close();
  await browser.close().catch(() => {});
  process.exit(0);
}

const reply = (obj) => process.stdout.write(`${JSON.stringify(obj)}\n`);
reply({ ok: true, value: browser.version() });
const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  const cmd = JSON.parse(line);
  if (cmd.cmd === "quit") await quit();
  try {
    const fn = commands[cmd.cmd];
    if (!fn) throw new Error(`unknown command ${cmd.cmd}`);
    reply({ ok: true, value: (await fn(cmd)) ?? null });
  } catch (e) {
    reply({ ok: false, error: String(e && e.message ? e.message : e) });
  }
}
await quit(); // stdin closed: the test is gone
