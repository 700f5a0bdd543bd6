// Unit tests of the page's pure logic (State's dedupe and version rules, the live-entities panel
// and the entity-type filter, token decoding, URL settings, compact JSON), run with node's test runner on an esbuild bundle of the TypeScript sources.
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, test } from "node:test";
import { pathToFileURL } from "node:url";
import { build } from "esbuild";

const dir = mkdtempSync(join(tmpdir(), "orgpulse-web-unit-"));
after(() => rmSync(dir, { recursive: true, force: true }));
const modules = ["./src/state", "./src/token", "./src/config", "./src/format", "@orgpulse/client"];
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

test("the notification list keeps the newest NOTIFICATION_ROWS, the unread count all", () => {
  const s = fresh();
  const n = (i) => m.create(m.NotificationSchema, { id: `n${i}`, title: `t${i}` });
  for (let i = 1; i <= m.NOTIFICATION_ROWS + 5; i++) assert.equal(s.apply(ev(i, "notificationNew", n(i))), true);
  assert.equal(s.notifications.length, m.NOTIFICATION_ROWS);
  assert.equal(s.notifications[0].id, `n${m.NOTIFICATION_ROWS + 5}`);
  assert.equal(s.unread, m.NOTIFICATION_ROWS + 5);
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

test("the ticker shows the most recent events only", () => {
  const s = fresh();
  for (let i = 1; i <= 40; i++) s.apply(ev(i, "jobUpdated", job("a", i + 1)));
  const shown = s.tickerOf("");
  assert.equal(shown.length, m.TICKER_LENGTH);
  assert.equal(shown[0].ev.seq, 40n);
});

const change = (seq, entityType, entityId, action, data = {}, actor = "alice") => {
  const e = ev(seq, "entityChanged", m.create(m.EntityChangedSchema, { entityType, entityId, action, data }));
  e.actor = actor;
  return e;
};
const keys = (rows) => rows.map((r) => `${r.entityType}/${r.entityId}`);

test("live entities: the latest change per (type, id), most recently changed first", () => {
  const s = fresh();
  s.apply(change(1, "invoice", "inv_1", "created", { amount: 12 }));
  s.apply(change(2, "project", "inv_1", "created")); // same id, other type: another entity
  s.apply(change(3, "invoice", "inv_2", "created"));
  s.apply(change(4, "invoice", "inv_1", "paid", { amount: 12, status: "paid" }, "bob"));
  assert.equal(s.apply(change(4, "invoice", "inv_1", "paid")), false, "a duplicate seq changes nothing");
  const rows = s.entitiesOf("");
  assert.deepEqual(keys(rows), ["invoice/inv_1", "invoice/inv_2", "project/inv_1"]);
  assert.deepEqual([rows[0].action, rows[0].actor, rows[0].data], ["paid", "bob", { amount: 12, status: "paid" }]);
  assert.ok(rows[0].revision > rows[1].revision);
  assert.deepEqual([...s.entityTypes].sort(), ["invoice", "project"]);
});

test("live entities: bounded, the least recently changed leave first", () => {
  const s = fresh();
  for (let i = 0; i < m.ENTITY_ROWS + 5; i++) s.apply(change(i + 1, "invoice", `inv_${i}`, "created"));
  assert.ok(!s.entities.has("invoice\u0000inv_4") && s.entities.has("invoice\u0000inv_5"));
  s.apply(change(m.ENTITY_ROWS + 6, "invoice", "inv_5", "paid")); // the oldest, changed again: stays
  s.apply(change(m.ENTITY_ROWS + 7, "invoice", "inv_new", "created"));
  const rows = s.entitiesOf("");
  assert.equal(rows.length, m.ENTITY_ROWS);
  assert.deepEqual(keys(rows.slice(0, 2)), ["invoice/inv_new", "invoice/inv_5"]);
  assert.ok(!s.entities.has("invoice\u0000inv_6"), "the least recently changed one left instead");
  assert.ok(s.entities.has("invoice\u0000inv_7"));
});

test("the entity-type filter narrows the panel and the ticker, which keeps enough history", () => {
  const s = fresh();
  s.apply(change(1, "invoice", "inv_1", "created"));
  s.apply(change(2, "project", "prj_1", "created"));
  for (let i = 3; i <= 60; i++) s.apply(ev(i, "jobUpdated", job("a", i)));
  assert.deepEqual(keys(s.entitiesOf("project")), ["project/prj_1"]);
  const invoices = s.tickerOf("invoice");
  assert.deepEqual(invoices.map((t) => t.ev.seq), [1n], "older than the last 25 lines, still there");
  assert.equal(s.tickerOf("").length, m.TICKER_LENGTH);
  assert.deepEqual(s.tickerOf("comment"), []);
});

test("an entity row keeps the topics of its latest change", () => {
  const s = fresh();
  const e = change(1, "task", "t1", "created");
  e.topics = ["project:42"];
  s.apply(e);
  s.apply(change(2, "task", "t1", "renamed"));
  assert.deepEqual(s.entitiesOf("").map((r) => r.topics), [[]]);
  e.seq = 3n;
  s.apply(e);
  assert.deepEqual(s.entitiesOf("").map((r) => r.topics), [["project:42"]]);
});

test("entities survive a new snapshot: there is none for them, the events are the record", () => {
  const s = fresh();
  s.apply(change(7, "invoice", "inv_1", "created"));
  const before = s.entities.get("invoice\u0000inv_1").revision;
  s.reset({ jobs: [], notifications: [], unread: 0, online: new Map() });
  s.apply(change(7, "invoice", "inv_1", "paid")); // a new epoch may reuse seq 7
  const row = s.entities.get("invoice\u0000inv_1");
  assert.equal(row.action, "paid");
  assert.ok(row.revision > before, "the revision grows even when seq does not");
});

test("compact JSON is cut with an ellipsis", () => {
  assert.equal(m.compactJson({ amount: 12 }), '{"amount":12}');
  const long = m.compactJson({ note: "x".repeat(500) }, 20);
  assert.equal(long.length, 20);
  assert.ok(long.endsWith("…"));
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
  const c = m.readConfig("?heartbeat=2&transport=poll&streamRetry=3&org=x&topic=project:42&presenceTtl=1.5");
  assert.deepEqual(c, { heartbeatMs: 2000, forcePoll: true, streamRetryMs: 3000, org: "x", topic: "project:42", presenceTtlMs: 1500 });
  const defaults = { heartbeatMs: 15000, forcePoll: false, streamRetryMs: 60000, org: "", topic: "", presenceTtlMs: 30000 };
  assert.deepEqual(m.readConfig("?heartbeat=-1"), defaults);
  assert.equal(m.readConfig("?presenceTtl=500").presenceTtlMs, 120_000, "at most the server's 120 s");
  assert.equal(m.readConfig("?presenceTtl=0.1").presenceTtlMs, 1_000, "at least its 1 s");
});

test("a topic is 1-128 characters of [A-Za-z0-9._:@/-]", () => {
  for (const t of ["project:42", "a", "team/web@x.y-z_1", "x".repeat(128)]) assert.ok(m.validTopic(t), t);
  for (const t of ["", "two words", "é", "x".repeat(129), "a,b"]) assert.ok(!m.validTopic(t), t);
});
