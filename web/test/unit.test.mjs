// Unit tests of the page's pure logic (State's dedupe and version rules, token decoding, URL
// settings), run with node's test runner on an esbuild bundle of the TypeScript sources.
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { pathToFileURL } from "node:url";
import { build } from "esbuild";

const dir = mkdtempSync(join(tmpdir(), "orgpulse-web-unit-"));
after(() => rmSync(dir, { recursive: true, force: true }));
const modules = ["./src/state", "./src/token", "./src/config", "@orgpulse/client"];
const contents = modules.map((m) => `export * from "${m}";`).join("\n");
await build({
  stdin: { contents, resolveDir: process.cwd(), loader: "ts" },
  bundle: true,
  format: "esm",
  platform: "node",
  outfile: join(dir, "out.mjs"),
  logLevel: "warning",
});
const m = await import(pathToFileURL(join(dir, "out.mjs")).href);

const job = (id, version, extra = {}) => m.create(m.JobSchema, { id, version: BigInt(version), title: id, ...extra });
const ev = (seq, payloadCase, value) =>
  m.create(m.EventSchema, { seq: BigInt(seq), cursor: `c${seq}`, payload: { case: payloadCase, value } });
const fresh = () => {
  const s = new m.State();
  s.reset({ jobs: [job("a", 1)], notifications: [], unread: 0, online: new Map() });
  return s;
};

test("durable events apply once, by seq", () => {
  const s = fresh();
  assert.equal(s.apply(ev(5, "jobCreated", job("b", 1))), true);
  assert.equal(s.apply(ev(5, "jobCreated", job("b", 1))), false);
  assert.equal(s.apply(ev(4, "jobDeleted", m.create(m.JobDeletedSchema, { jobId: "b" }))), false);
  assert.deepEqual([...s.jobs.keys()].sort(), ["a", "b"]);
  assert.equal(s.ticker.length, 1);
});

test("a job never goes back to an older version", () => {
  const s = fresh();
  s.apply(ev(1, "jobUpdated", job("a", 3, { progress: 30 })));
  s.apply(ev(2, "jobUpdated", job("a", 2, { progress: 20 })));
  assert.equal(s.jobs.get("a").progress, 30);
  assert.equal(s.upsertJob(job("a", 3)), false);
});

test("deletion removes the job and the ticker keeps its title", () => {
  const s = fresh();
  s.apply(ev(1, "jobDeleted", m.create(m.JobDeletedSchema, { jobId: "a" })));
  assert.equal(s.jobs.size, 0);
  assert.equal(s.ticker[0].deletedTitle, "a");
});

test("notifications count once as unread; mark-read takes the server's count", () => {
  const s = fresh();
  const n = m.create(m.NotificationSchema, { id: "n1", title: "hi" });
  assert.equal(s.apply(ev(1, "notificationNew", n)), true);
  assert.equal(s.apply(ev(2, "notificationNew", n)), false);
  assert.equal(s.unread, 1);
  s.markRead(["n1"], 0);
  assert.equal(s.notifications[0].read, true);
  assert.equal(s.unread, 0);
});

test("presence and keep-alives: seq 0 is never deduped, heartbeats change nothing", () => {
  const s = fresh();
  const who = m.create(m.PresenceChangeSchema, { userId: "bob" });
  assert.equal(s.apply(ev(0, "userOnline", who)), true);
  assert.equal(s.apply(ev(0, "heartbeat", m.create(m.HeartbeatSchema))), false);
  assert.deepEqual([...s.online.keys()], ["bob"]);
  assert.equal(s.apply(ev(0, "userOffline", who)), true);
  assert.equal(s.online.size, 0);
});

test("a new snapshot starts seq over (a new log epoch may reuse numbers)", () => {
  const s = fresh();
  s.apply(ev(9, "jobCreated", job("b", 1)));
  s.reset({ jobs: [], notifications: [], unread: 0, online: new Map() });
  assert.equal(s.apply(ev(1, "jobCreated", job("c", 1))), true);
});

test("the ticker keeps the most recent events only", () => {
  const s = fresh();
  for (let i = 1; i <= 40; i++) s.apply(ev(i, "jobUpdated", job("a", i + 1)));
  assert.equal(s.ticker.length, 25);
  assert.equal(s.ticker[0].ev.seq, 40n);
});

const jwt = (claims) =>
  `e30.${Buffer.from(JSON.stringify(claims)).toString("base64url")}.sig`;

test("token payload: user, org, roles (default member), expiry", () => {
  const id = m.decode(jwt({ sub: "alice", org: "acme", exp: 10 }));
  assert.deepEqual([id.user, id.org, id.roles, id.exp], ["alice", "acme", ["member"], 10]);
  assert.equal(m.canCreate(id), true);
  assert.equal(m.isExpired(id, 10_000), true);
  assert.equal(m.isExpired(id, 9_999), false);
  assert.equal(m.canCreate(m.decode(jwt({ sub: "v", roles: ["viewer"] }))), false);
  assert.throws(() => m.decode("not-a-jwt"), /not a JWT/);
});

test("URL settings", () => {
  const c = m.readConfig("?heartbeat=2&transport=poll&streamRetry=3&org=x");
  assert.deepEqual(c, { heartbeatMs: 2000, forcePoll: true, streamRetryMs: 3000, org: "x" });
  assert.deepEqual(m.readConfig("?heartbeat=-1"), { heartbeatMs: 15000, forcePoll: false, streamRetryMs: 60000, org: "" });
});
