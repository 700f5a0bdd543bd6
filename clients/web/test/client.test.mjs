// Unit tests of the SDK's state machine against an in-memory server (fake-server.mjs): reconnect,
// dedupe, resync, token refresh (and its race), stream/poll switches, one shared stream, catch-up
// from a listener's own cursor, liveJobs. Every delivery check compares against the server's log:
// each durable event exactly once, in seq order.
import assert from "node:assert/strict";
import { afterEach, test as nodeTest } from "node:test";
import { backoffDelay, EventKind, OrgpulseClient } from "../dist/index.js";
import { FakeServer } from "./fake-server.mjs";

/** Every test is bounded: a broken state machine fails, it does not hang. */
const test = (name, fn) => nodeTest(name, { timeout: 15_000 }, fn);

/** Clients of the running test, closed after it even when it failed (no loop outlives its test). */
const clients = [];
afterEach(() => clients.splice(0).forEach((c) => c.close()));
const track = (c) => (clients.push(c), c);

const FAST = {
  heartbeatMs: 100, streamRetryMs: 400, backoffMinMs: 10, backoffMaxMs: 50, pollWaitMs: 150,
  rpcTimeoutMs: 2000, crossTab: false, lifecycle: false,
};

function setup(opts = {}) {
  const server = new FakeServer();
  let token = "t1";
  const client = track(new OrgpulseClient({ baseUrl: "", transport: server.transport(), getToken: () => token, ...FAST, ...opts }));
  return { server, client, setToken: (t) => (token = t) };
}

/** A listener recording seqs and states. */
function recorder() {
  const r = { seqs: [], states: [], resyncs: [], events: [] };
  r.handlers = {
    onEvent: (ev) => {
      r.events.push(ev);
      if (ev.seq > 0n) r.seqs.push(Number(ev.seq));
    },
    onState: (s) => r.states.at(-1) !== s && r.states.push(s),
    onResync: (reason) => r.resyncs.push(reason),
  };
  return r;
}

async function until(what, pred, ms = 5000) {
  const t0 = Date.now();
  while (!pred()) {
    if (Date.now() - t0 > ms) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** The seqs of the log's events a listener with `kinds` may see. */
const logSeqs = (server, kinds = []) =>
  server.log.filter((ev) => !kinds.length || kinds.includes(kindOfCase(ev.payload.case))).map((ev) => Number(ev.seq));
const kindOfCase = (c) => (c.startsWith("job") ? EventKind.JOB : c === "notificationNew" ? EventKind.NOTIFICATION : EventKind.ENTITY);

const note = (server, id) => server.append("notificationNew", { id, title: id });

test("states as emitted: connecting once, then live; close() ends with stopped", async () => {
  const { client } = setup();
  const states = [];
  client.subscribe({}, { onEvent: () => {}, onState: (s) => states.push(s) });
  await until("live", () => states.includes("live"));
  assert.deepEqual(states, ["connecting", "live"]);
  client.close();
  assert.equal(states.at(-1), "stopped");
});

test("several subscribe calls share one stream; the wire carries the union, each listener its own kinds", async () => {
  const { server, client } = setup();
  const jobs = recorder();
  const notes = recorder();
  const unsubJobs = client.subscribe({ kinds: [EventKind.JOB] }, jobs.handlers);
  client.subscribe({ kinds: [EventKind.NOTIFICATION] }, notes.handlers);
  await until("live", () => jobs.states.includes("live"));
  assert.equal(server.subscribes.length, 1);
  assert.deepEqual(server.subscribes[0].kinds, [EventKind.JOB, EventKind.NOTIFICATION]);
  server.job("a", 1);
  note(server, "n1");
  server.job("a", 2);
  await until("events", () => jobs.seqs.length === 2 && notes.seqs.length === 1);
  assert.deepEqual(jobs.seqs, logSeqs(server, [EventKind.JOB]));
  assert.deepEqual(notes.seqs, logSeqs(server, [EventKind.NOTIFICATION]));
  // one leaves: the wire narrows (a reopen from the cursor), the other loses nothing
  unsubJobs();
  await until("narrowed", () => server.subscribes.length === 2);
  assert.deepEqual(server.subscribes[1].kinds, [EventKind.NOTIFICATION]);
  assert.equal(server.subscribes[1].afterCursor, "e1:3");
  note(server, "n2");
  await until("n2", () => notes.seqs.length === 2);
  assert.deepEqual(notes.seqs, logSeqs(server, [EventKind.NOTIFICATION]));
  client.close();
});

test("a killed server: reconnecting with backoff, then resumes from the cursor; each event once", async () => {
  const { server, client } = setup();
  const r = recorder();
  client.subscribe({}, r.handlers);
  await until("live", () => r.states.includes("live"));
  server.job("a", 1);
  await until("first", () => r.seqs.length === 1);
  for (let round = 0; round < 3; round++) {
    server.down = true;
    server.kill();
    await until("reconnecting", () => r.states.at(-1) === "reconnecting");
    server.job("a", round + 2); // written while this client cannot connect
    server.down = false;
    await until("live again", () => r.states.at(-1) === "live");
  }
  server.job("b", 1);
  await until("all", () => r.seqs.length === server.log.length);
  assert.deepEqual(r.seqs, logSeqs(server));
  assert.deepEqual(r.states.slice(0, 4), ["connecting", "live", "reconnecting", "live"]);
  client.close();
});

test("a server that replays before the cursor: duplicates never reach a listener", async () => {
  const { server, client } = setup();
  server.replayOverlap = 3;
  const r = recorder();
  client.subscribe({}, r.handlers);
  await until("live", () => r.states.includes("live"));
  for (let i = 1; i <= 5; i++) server.job(`j${i}`, 1);
  await until("five", () => r.seqs.length === 5);
  server.kill();
  server.job("j6", 1);
  await until("six", () => r.seqs.length >= 6);
  await new Promise((res) => setTimeout(res, 50));
  assert.deepEqual(r.seqs, logSeqs(server));
  client.close();
});

test("resync: the listener is told, seq starts over, later events arrive", async () => {
  const { server, client } = setup();
  const r = recorder();
  client.subscribe({}, r.handlers);
  await until("live", () => r.states.includes("live"));
  server.job("a", 1);
  server.job("a", 2);
  await until("two", () => r.seqs.length === 2);
  server.newEpoch();
  server.kill();
  await until("resync", () => r.resyncs.length === 1);
  server.job("z", 1); // seq 1 of the new log: not a duplicate of the old seq 1
  await until("after resync", () => r.seqs.length === 3);
  assert.deepEqual(r.seqs, [1, 2, 1]);
  client.close();
});

for (const trailer of [true, false]) {
  test(`token expiry mid-stream (${trailer ? "orgpulse-error trailer" : "message only"}): getToken once, nothing lost`, async () => {
    const { server, client, setToken } = setup();
    server.trailer = trailer;
    const r = recorder();
    client.subscribe({}, r.handlers);
    await until("live", () => r.states.includes("live"));
    server.job("a", 1);
    await until("one", () => r.seqs.length === 1);
    const before = client.tokens.fetches;
    server.valid.add("t2");
    setToken("t2");
    server.expire("t1");
    server.job("a", 2);
    await until("two", () => r.seqs.length === 2);
    assert.equal(client.tokens.fetches - before, 1);
    assert.deepEqual(r.seqs, logSeqs(server));
    assert.ok(!r.states.includes("stopped"), `${r.states}`);
    client.close();
  });
}

test("token refresh race: two streams and two calls hit the expiry at once; one getToken call", async () => {
  const server = new FakeServer();
  let calls = 0;
  let token = "t1";
  const getToken = async () => {
    calls++;
    await new Promise((r) => setTimeout(r, 50)); // a slow refresh endpoint
    return token;
  };
  const client = track(new OrgpulseClient({ baseUrl: "", transport: server.transport(), getToken, ...FAST }));
  const a = recorder();
  const b = recorder();
  client.subscribe({ orgId: "acme" }, a.handlers);
  client.subscribe({ orgId: "other" }, b.handlers);
  await until("both live", () => a.states.includes("live") && b.states.includes("live"));
  assert.equal(calls, 1);
  server.valid.add("t2");
  token = "t2";
  server.expire("t1");
  const [x, y] = await Promise.all([client.jobs.listJobs({}), client.jobs.listJobs({})]);
  assert.ok(x.cursor && y.cursor);
  server.job("a", 1);
  await until("both got it", () => a.seqs.length === 1 && b.seqs.length === 1);
  assert.equal(calls, 2, "one getToken call for the refresh, however many needed it");
  client.close();
});

test("getToken has nothing newer: stopped with the error; reconnect() with a new token resumes at the cursor", async () => {
  const { server, client, setToken } = setup();
  const r = recorder();
  let error;
  client.subscribe({}, { ...r.handlers, onState: (s, info) => (r.handlers.onState(s), s === "stopped" && (error = info.error)) });
  await until("live", () => r.states.includes("live"));
  server.job("a", 1);
  await until("one", () => r.seqs.length === 1);
  server.expire("t1");
  await until("stopped", () => r.states.at(-1) === "stopped");
  assert.match(error.message, /token expired/);
  server.job("a", 2); // missed while signed out
  server.valid.add("t3");
  setToken("t3");
  client.reconnect();
  await until("resumed", () => r.seqs.length === 2);
  assert.deepEqual(r.seqs, logSeqs(server));
  client.close();
});

test("a buffering proxy: the stream delivers nothing -> polling; streams work again -> live; each event once", async () => {
  const { server, client } = setup();
  server.mode = "buffer";
  const r = recorder();
  client.subscribe({}, r.handlers);
  await until("polling", () => r.states.at(-1) === "polling");
  server.job("a", 1);
  server.job("a", 2);
  await until("polled", () => r.seqs.length === 2);
  server.mode = "pass";
  await until("live again", () => r.states.at(-1) === "live", 5000);
  server.job("a", 3);
  await until("streamed", () => r.seqs.length === 3);
  assert.deepEqual(r.seqs, logSeqs(server));
  assert.deepEqual(r.states, ["connecting", "polling", "live"]);
  client.close();
});

/** Runs `fn(store)` with an in-memory `sessionStorage` (`store`, a Map), removed after. */
async function withSessionStorage(fn) {
  const store = new Map();
  globalThis.sessionStorage = {
    getItem: (k) => store.get(k) ?? null,
    setItem: (k, v) => store.set(k, String(v)),
    removeItem: (k) => store.delete(k),
  };
  try {
    await fn(store);
  } finally {
    delete globalThis.sessionStorage;
  }
}

test("a fallback to polling is remembered (sessionStorage): the next client polls at once", () =>
  withSessionStorage(async () => {
    const first = setup({ streamRetryMs: 5000 });
    first.server.mode = "buffer";
    const r = recorder();
    first.client.subscribe({}, r.handlers);
    await until("polling", () => r.states.at(-1) === "polling");
    first.client.close();
    const again = setup({ transport: first.server.transport(), streamRetryMs: 5000 });
    const before = first.server.subscribes.length;
    const s = recorder();
    again.client.subscribe({}, s.handlers);
    await until("polling at once", () => s.states.at(-1) === "polling", 1000);
    assert.equal(first.server.subscribes.length, before, "no stream tried before the remembered time");
  }));

/** An unsigned JWT with these claims (the SDK decodes tokens, the fake server only compares them). */
const jwt = (claims) => `e30.${Buffer.from(JSON.stringify(claims)).toString("base64url")}.sig`;

test("persisted cursors are per server, org and user: another one in the same tab never gets them", () =>
  withSessionStorage(async (store) => {
    const server = new FakeServer();
    /**
     * A page of `who` (re)loaded: where its stream started (the cursor it was offered), once it is
     * live with every event after that start (its cursor is then persisted).
     */
    const startOf = async (who) => {
      const token = jwt({ sub: who.user, org: who.tokenOrg ?? "acme" });
      server.valid.add(token);
      const client = track(new OrgpulseClient({
        baseUrl: who.server ?? "https://one.example", transport: server.transport(), getToken: () => token,
        persistCursor: true, ...FAST,
      }));
      const before = server.subscribes.length;
      const r = recorder();
      client.subscribe({ orgId: who.org ?? "" }, r.handlers);
      await until("live", () => r.states.includes("live"));
      const start = server.subscribes[before].afterCursor;
      // (this fake server replays its whole log to a stream opened without a cursor)
      const after = start ? Number(server.seqOf(start)) : 0;
      assert.deepEqual(r.seqs, logSeqs(server).filter((seq) => seq > after));
      client.close();
      return start;
    };
    assert.equal(await startOf({ user: "alice" }), "", "nothing persisted yet");
    server.job("a", 1);
    server.job("a", 2);
    assert.equal(await startOf({ user: "alice" }), server.cursorOf(0), "a reload resumes where she was");
    const hers = server.cursorOf(2);
    const others = [
      [{ user: "bob" }, "another user of the org"],
      [{ user: "alice", org: "globex" }, "another org of the same user"],
      [{ user: "alice", tokenOrg: "initech" }, "another org by the token"],
      [{ user: "alice", server: "https://two.example" }, "another server"],
    ];
    for (const [who, what] of others) {
      server.job("a", server.log.length + 1);
      assert.equal(await startOf(who), "", `${what}: not offered alice's cursor`);
    }
    assert.equal(await startOf({ user: "alice" }), hers, "theirs never replaced hers");
    const head = server.cursorOf(server.log.length);
    assert.equal(await startOf({ user: "alice", org: "acme" }), head, "the token's org named: her cursor");
    assert.equal(
      store.get(`orgpulse.cursor:${JSON.stringify(["https://one.example", "acme", "alice"])}`),
      head,
      `the documented key; stored: ${[...store.keys()]}`,
    );
  }));

test("streams refused several times in a row -> polling; a dead server is never a reason to poll", async () => {
  const { server, client } = setup();
  server.mode = "refuse-streams";
  const r = recorder();
  client.subscribe({}, r.handlers);
  await until("polling", () => r.states.at(-1) === "polling");
  assert.equal(server.subscribes.length, FAST.failuresBeforePolling ?? 3);
  client.close();

  const down = setup();
  down.server.down = true;
  const d = recorder();
  down.client.subscribe({}, d.handlers);
  await new Promise((res) => setTimeout(res, 300));
  assert.ok(!d.states.includes("polling"), `${d.states}`);
  assert.equal(d.states.at(-1), "reconnecting");
  down.client.close();
});

test("forcePoll: no stream at all", async () => {
  const { server, client } = setup({ forcePoll: true });
  const r = recorder();
  client.subscribe({}, r.handlers);
  await until("polling", () => r.states.at(-1) === "polling");
  server.job("a", 1);
  await until("one", () => r.seqs.length === 1);
  assert.equal(server.subscribes.length, 0);
  client.close();
});

test("a listener joining a running stream with an older cursor catches up, in order, once", async () => {
  const { server, client } = setup();
  const first = recorder();
  client.subscribe({}, first.handlers);
  await until("live", () => first.states.includes("live"));
  const at = server.job("a", 1).cursor;
  server.job("b", 1);
  server.job("c", 1);
  await until("three", () => first.seqs.length === 3);
  const late = recorder();
  client.subscribe({ cursor: at }, late.handlers);
  server.job("d", 1);
  await until("late", () => late.seqs.length === 3);
  await until("first", () => first.seqs.length === 4);
  assert.deepEqual(late.seqs, [2, 3, 4]);
  assert.equal(server.subscribes.length, 1, "no second stream for the late listener");
  client.close();
});

test("subscribe with a cursor as the first listener: the stream starts there", async () => {
  const { server, client } = setup();
  server.job("a", 1);
  const at = server.job("b", 1).cursor;
  server.job("c", 1);
  const r = recorder();
  client.subscribe({ cursor: at }, r.handlers);
  await until("replayed", () => r.seqs.length === 1);
  assert.equal(server.subscribes[0].afterCursor, at);
  assert.deepEqual(r.seqs, [3]);
  client.close();
});

test("subscribe / unsubscribe / subscribe in one task (React StrictMode) opens one stream", async () => {
  const { server, client } = setup();
  const r = recorder();
  client.subscribe({}, r.handlers)();
  client.subscribe({}, r.handlers);
  await until("live", () => r.states.includes("live"));
  await new Promise((res) => setTimeout(res, 50));
  assert.equal(server.subscribes.length, 1);
  assert.equal(server.open.size, 1);
  client.close();
});

test("entity types narrow entity events only, per listener", async () => {
  const { server, client } = setup();
  const invoices = recorder();
  const all = recorder();
  client.subscribe({ kinds: [EventKind.ENTITY], entityTypes: ["invoice"] }, invoices.handlers);
  client.subscribe({ kinds: [EventKind.JOB] }, all.handlers);
  await until("live", () => invoices.states.includes("live"));
  assert.deepEqual(server.subscribes[0].entityTypes, ["invoice"]);
  await client.events.publish({ entityType: "invoice", entityId: "i1", action: "paid" });
  await client.events.publish({ entityType: "comment", entityId: "c1", action: "created" });
  server.job("a", 1);
  await until("job", () => all.seqs.length === 1);
  assert.deepEqual(invoices.seqs, [1]);
  assert.equal(invoices.events[0].payload.value.entityId, "i1");
  client.close();
});

/** An entity change with `topics` (none: an org-wide change of no project). */
const change = (server, id, topics = []) =>
  server.append("entityChanged", { entityType: "task", entityId: id, action: "updated" }, { topics });

/** The seqs of the log's durable events with at least one of `topics` (empty: all). */
const topicSeqs = (server, topics) =>
  server.log.filter((ev) => !topics.length || ev.topics.some((t) => topics.includes(t))).map((ev) => Number(ev.seq));

test("topics narrow per listener; the wire carries their union, or all topics when one listener takes all", async () => {
  const { server, client } = setup();
  const p42 = recorder();
  const board = recorder();
  client.subscribe({ topics: ["project:42"] }, p42.handlers);
  const unsubBoard = client.subscribe({ topics: ["board:1", "project:42"] }, board.handlers);
  await until("live", () => p42.states.includes("live"));
  assert.deepEqual(server.subscribes.map((s) => s.topics), [["board:1", "project:42"]]);
  change(server, "a", ["project:42"]);
  change(server, "b", ["board:1"]);
  change(server, "c");
  change(server, "d", ["project:7", "project:42"]);
  await until("four", () => p42.seqs.length === 2 && board.seqs.length === 3);
  // one listener of every topic joins: the wire takes all topics, the others still get only theirs
  const all = recorder();
  client.subscribe({}, all.handlers);
  await until("widened", () => server.subscribes.length === 2);
  assert.deepEqual(server.subscribes[1].topics, []);
  unsubBoard();
  change(server, "e", ["board:1"]);
  change(server, "f", ["project:42"]);
  await until("all", () => all.seqs.at(-1) === 6 && p42.seqs.length === 3);
  assert.deepEqual(p42.seqs, topicSeqs(server, ["project:42"]));
  assert.deepEqual(board.seqs, topicSeqs(server, ["board:1", "project:42"]).filter((seq) => seq <= 4));
  assert.deepEqual(all.seqs, [5, 6], "live from the stream's position when it joined");
  client.close();
});

test("topics go on every Poll too: the polling fallback and a listener's catch-up", async () => {
  const { server, client } = setup({ forcePoll: true });
  const r = recorder();
  client.subscribe({ topics: ["project:42"] }, r.handlers);
  await until("polling", () => r.states.at(-1) === "polling");
  const at = change(server, "a", ["project:42"]).cursor;
  change(server, "b", ["project:7"]);
  change(server, "c", ["project:42"]);
  await until("polled", () => r.seqs.length === 2);
  // a second listener with its own older cursor catches up through Poll, with its own topics
  const late = recorder();
  client.subscribe({ topics: ["project:7"], cursor: at }, late.handlers);
  await until("caught up", () => late.seqs.length === 1);
  change(server, "d", ["project:7"]);
  await until("both", () => late.seqs.length === 2 && r.seqs.length === 2);
  assert.deepEqual(r.seqs, topicSeqs(server, ["project:42"]));
  assert.deepEqual(late.seqs, topicSeqs(server, ["project:7"]));
  assert.equal(server.subscribes.length, 0);
  assert.ok(server.polls.length > 0 && server.polls.every((p) => p.topics.length > 0), JSON.stringify(server.polls));
  assert.ok(server.polls.some((p) => p.topics.join() === "project:7" && p.afterCursor === at), "the catch-up Poll");
  client.close();
});

test("liveJobs with topics: ListJobs and the stream are both narrowed to them", async () => {
  const { server, client } = setup();
  server.job("a", 1, { topics: ["project:42"] });
  server.job("b", 1, { topics: ["project:7"] });
  let jobs = [];
  client.liveJobs({ topics: ["project:42"] }, { onChange: (j) => (jobs = j) });
  await until("snapshot", () => jobs.length === 1);
  assert.deepEqual(server.listJobs.at(-1).topics, ["project:42"]);
  await until("subscribed", () => server.subscribes.length === 1);
  assert.deepEqual(server.subscribes[0].topics, ["project:42"]);
  server.job("c", 1, { topics: ["project:7"] });
  server.job("d", 1, { topics: ["project:42"] });
  await until("d", () => jobs.length === 2);
  assert.deepEqual(jobs.map((j) => j.id).sort(), ["a", "d"]);
  client.close();
});

test("liveJobs: snapshot, then the events after its cursor, version rule, deletions", async () => {
  const { server, client } = setup();
  server.job("a", 1);
  server.job("b", 1);
  let jobs = [];
  const stop = client.liveJobs({}, { onChange: (j) => (jobs = j) });
  await until("snapshot", () => jobs.length === 2);
  server.job("a", 2, { progress: 50 });
  server.append("jobDeleted", { jobId: "b" });
  server.job("c", 1);
  await until("changes", () => jobs.length === 2 && jobs.some((j) => j.id === "c"));
  assert.equal(jobs.find((j) => j.id === "a").progress, 50);
  // resync: a new database, the snapshot is reloaded
  server.newEpoch();
  server.job("x", 1);
  server.kill();
  await until("reloaded", () => jobs.length === 1 && jobs[0].id === "x");
  stop();
  client.close();
});

test("backoff: full jitter between the floor and the capped exponential", () => {
  const t = { backoffMinMs: 100, backoffMaxMs: 5000 };
  assert.equal(backoffDelay(0, { ...t, random: () => 0 }), 100);
  assert.equal(backoffDelay(3, { ...t, random: () => 1 }), 900);
  assert.equal(backoffDelay(40, { ...t, random: () => 1 }), 5000);
  assert.equal(backoffDelay(40, { ...t, random: () => 0 }), 100);
});
