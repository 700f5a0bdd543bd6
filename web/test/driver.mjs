// Drives Debian's Chromium through playwright-core for tests/dashboard.rs: reads one JSON command
// per line on stdin, answers one JSON line on stdout ({ok, value} or {ok: false, error}). Every
// wait is bounded by its timeout. Logs (page console, errors) go to stderr.
import { createInterface } from "node:readline";
import { launchChromium, recordBadge } from "./browser.mjs";
import { startProxy } from "./proxy.mjs";

const browser = await launchChromium();
/** name -> { context, page, requests } */
const pages = new Map();
/** url -> proxy */
const proxies = new Map();

function page(name) {
  const p = pages.get(name);
  if (!p) throw new Error(`no page named ${name}`);
  return p;
}

const commands = {
  async open({ page: name, url, timeout = 10_000 }) {
    await pages.get(name)?.context.close();
    const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    const p = await context.newPage();
    const requests = [];
    p.on("request", (r) => requests.push(new URL(r.url()).pathname));
    p.on("console", (m) => console.error(`[${name}] ${m.type()}: ${m.text()}`));
    p.on("pageerror", (e) => console.error(`[${name}] page error: ${e.message}`));
    await p.addInitScript(recordBadge);
    pages.set(name, { context, page: p, requests });
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
  async screenshot({ page: name, path }) {
    await page(name).page.screenshot({ path, fullPage: true, animations: "disabled" });
  },
  async requests({ page: name }) {
    return page(name).requests;
  },
  async close({ page: name }) {
    await page(name).context.close();
    pages.delete(name);
  },
  async proxy({ target, mode }) {
    const p = await startProxy(target, mode);
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
