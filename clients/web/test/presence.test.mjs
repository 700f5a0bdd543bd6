// Unit tests of presence state and broadcast in the SDK against the in-memory server
// (fake-server.mjs): setPresence held and refreshed, removed by null and by close(); StrictMode's
// release-then-set is no change on the wire; watchPresence merges the snapshot with the events
// that arrive while it is read; broadcasts and presence events reach only the listeners of their
// topic; and the owner's rules for several tabs of one user (one entry, no clear while another
// tab holds it, a crashed tab's state dies with its TTL), through a host standing in for the tabs.
import assert from "node:assert/strict";
import { afterEach, test as nodeTest } from "node:test";
import { EventKind, OrgpulseClient } from "../dist/index.js";
import { PresenceOwner, presenceKey } from "../dist/presence.js";
import { FakeServer } from "./fake-server.mjs";

/** Every test is bounded: a broken state machine fails, it does not hang. */
const test = (name, fn) => nodeTest(name, { timeout: 15_000 }, fn);

const clients = [];
afterEach(() => clients.splice(0).forEach((c) => c.close()));

const FAST = {
  heartbeatMs: 100, streamRetryMs: 400, backoffMinMs: 10, backoffMaxMs: 50, pollWaitMs: 150,
  rpcTimeoutMs: 2000, crossTab: false, lifecycle: false,
};

/** A client of `server` signed in as `user` (the fake server's user is the token). */
function clientOf(server, user = "t1") {
  server.valid.add(user);
  const c = new OrgpulseClient({ baseUrl: "", transport: server.transport(), getToken: () => user, ...FAST });
  clients.push(c);
  return c;
}

async function until(what, pred, ms = 5000) {
  const t0 = Date.now();
  while (!pred()) {
    if (Date.now() - t0 > ms) assert.fail(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));

/** The presence_state and broadcast events a listener got, as [case, user, topic, json]. */
function ephemeral(client, options) {
  const got = [];
  const live = { n: 0 };
  client.subscribe(options, {
    onEvent: (ev) => {
      const p = ev.payload;
      if (p.case === "presenceState") got.push([p.case, p.value.userId, p.value.topic, JSON.stringify(p.value.state ?? {})]);
      if (p.case === "broadcast") got.push([p.case, p.value.userId, p.value.topic, JSON.stringify(p.value.data ?? {})]);
    },
    onLive: () => live.n++,
  });
  return { got, live };
}

test("setPresence: sent once, refreshed every ttl/2 while held, removed by null; topic listeners see each change", async () => {
  const server = new FakeServer();
  const ann = clientOf(server, "ann");
  const watcher = clientOf(server, "bob");
  const job = ephemeral(watcher, { kinds: [EventKind.PRESENCE], topics: ["job:1"] });
  const other = ephemeral(watcher, { topics: ["job:2"] });
  await until("bob's stream", () => job.live.n > 0);

  ann.setPresence("job:1", { viewing: true }, { ttlMs: 1000 });
  await until("the entry", () => server.presenceCalls.length === 1);
  await until("two refreshes", () => server.presenceCalls.length === 3, 3000);
  const gaps = server.presenceCalls.slice(1).map((c, i) => c.at - server.presenceCalls[i].at);
  assert.ok(gaps.every((g) => g >= 400 && g < 1000), `refresh gaps ${gaps}: about ttl/2, before the TTL`);
  assert.ok(server.presenceCalls.every((c) => c.ttlMs === 1000 && c.state.viewing === true));

  ann.setPresence("job:1", { viewing: true, typing: true }, { ttlMs: 1000 });
  ann.setPresence("job:1", null);
  await until("the removal", () => server.presence.size === 0);
  await tick(700);
  // the change and the removal in one task: only the removal went out, and nothing after it
  assert.deepEqual(server.presenceCalls.at(-1).state, {});
  assert.equal(server.presenceCalls.filter((c) => c.state.typing).length, 0);
  assert.deepEqual(job.got, [
    ["presenceState", "ann", "job:1", '{"viewing":true}'],
    ["presenceState", "ann", "job:1", "{}"],
  ]);
  assert.deepEqual(other.got, [], "a listener of another topic sees none of it");
});

test("a hold released and taken again in one task (React StrictMode) sends nothing more", async () => {
  const server = new FakeServer();
  const ann = clientOf(server, "ann");
  const first = ann.holdPresence("job:1");
  first.set({ viewing: true });
  await until("the entry", () => server.presenceCalls.length === 1);
  // unmount, mount again
  first.release();
  ann.holdPresence("job:1").set({ viewing: true });
  await tick(100);
  assert.equal(server.presenceCalls.length, 1, "no remove-then-set");
  // two holders: the entry is the most recent state, and stays while one still holds it
  const second = ann.holdPresence("job:1");
  second.set({ typing: true });
  await until("the newer state", () => server.presenceCalls.length === 2);
  assert.deepEqual(server.presenceCalls[1].state, { typing: true });
  second.release();
  await until("the older holder's state again", () => server.presenceCalls.length === 3);
  assert.deepEqual(server.presenceCalls[2].state, { viewing: true });
});

test("close() removes what the client holds; invalid topics, TTLs and states throw at once", async () => {
  const server = new FakeServer();
  const ann = clientOf(server, "ann");
  assert.throws(() => ann.setPresence("no spaces", { a: 1 }), TypeError);
  assert.throws(() => ann.setPresence("job:1", { a: 1 }, { ttlMs: 120_001 }), TypeError);
  assert.throws(() => ann.setPresence("job:1", { a: 1 }, { ttlMs: 999 }), TypeError);
  assert.throws(() => ann.setPresence("job:1", { big: "x".repeat(1100) }), /1024/);
  await assert.rejects(ann.broadcast("job:1", { big: "x".repeat(4200) }), /4096/);
  ann.setPresence("job:1", { viewing: true });
  ann.setPresence("job:2", { viewing: true });
  await until("two entries", () => server.presence.size === 2);
  ann.close();
  await until("both removed", () => server.presence.size === 0);
});

test("watchPresence: the snapshot merged with the events that arrive while it is read; re-listed after a reconnect", async () => {
  const server = new FakeServer();
  const ann = clientOf(server, "ann");
  const bob = clientOf(server, "bob");
  const cid = clientOf(server, "cid");
  ann.setPresence("job:1", { viewing: true });
  cid.setPresence("job:1", { viewing: true });
  await until("two entries", () => server.presence.size === 2);
  // while bob's first list is under way: ann leaves, dan arrives (events after the snapshot)
  const dan = clientOf(server, "dan");
  server.beforeList = async () => {
    server.beforeList = null;
    ann.setPresence("job:1", null);
    dan.setPresence("job:1", { typing: true });
    await until("both applied", () => server.presenceCalls.length === 4);
  };
  const seen = [];
  bob.watchPresence("job:1", { onChange: (entries) => seen.push(entries.map((e) => `${e.userId}=${JSON.stringify(e.state)}`)) });
  await until("the merged view", () => JSON.stringify(seen.at(-1)) === JSON.stringify(['cid={"viewing":true}', 'dan={"typing":true}']));
  assert.equal(server.presenceLists, 1);
  // a reconnect may have missed changes: the list is read again
  server.kill();
  await until("listed again", () => server.presenceLists === 2);
  cid.setPresence("job:1", null);
  await until("cid gone", () => JSON.stringify(seen.at(-1)) === JSON.stringify(['dan={"typing":true}']));
});

test("broadcast: to the listeners of its topic and of all topics, never to others; onLive once the wire carries them", async () => {
  const server = new FakeServer();
  const ann = clientOf(server, "ann");
  const bob = clientOf(server, "bob");
  const all = ephemeral(bob, {});
  await until("bob live", () => all.live.n === 1);
  // a listener the running stream already carries is live at once; one it does not, after the reconnect
  const everything = ephemeral(bob, {});
  assert.equal(everything.live.n, 1);
  const job = ephemeral(bob, { kinds: [EventKind.BROADCAST], topics: ["job:1"] });
  assert.equal(job.live.n, 1, "kinds [] and topics [] carry a topic's broadcasts");
  const jobs = ephemeral(bob, { kinds: [EventKind.JOB] });
  const other = ephemeral(bob, { kinds: [EventKind.BROADCAST], topics: ["job:2"] });
  await ann.broadcast("job:1", { typing: true });
  await ann.broadcast("job:3", { typing: false });
  await until("the broadcasts", () => all.got.length === 2);
  assert.deepEqual(job.got, [["broadcast", "ann", "job:1", '{"typing":true}']]);
  assert.deepEqual(everything.got, all.got);
  assert.deepEqual(jobs.got, [], "kind JOB only");
  assert.deepEqual(other.got, [], "topic job:2 only");
  assert.equal(server.subscribes.length, 1, "one stream: the wire already carried every kind and topic");
});

test("a narrowed stream widened by a new listener: onLive only after the stream carrying it caught up", async () => {
  const server = new FakeServer();
  const bob = clientOf(server, "bob");
  const jobs = ephemeral(bob, { kinds: [EventKind.JOB] });
  await until("bob live", () => jobs.live.n === 1);
  const presence = ephemeral(bob, { kinds: [EventKind.PRESENCE], topics: ["job:1"] });
  assert.equal(presence.live.n, 0, "the running stream does not carry presence");
  await until("the widened stream", () => presence.live.n === 1);
  assert.equal(server.subscribes.length, 2);
  assert.deepEqual(server.subscribes[1].kinds, [EventKind.JOB, EventKind.PRESENCE]);
});

/** A host for PresenceOwner: the tab `self`, recording what it sends. */
function ownerHost() {
  const sent = [];
  return {
    sent,
    host: {
      ready: async () => {},
      role: () => "leader",
      tabId: () => "self",
      post: () => {},
      send: async (org, topic, held, leaving) => void sent.push([topic, held ? JSON.stringify(held.state) : null, leaving]),
    },
  };
}
const held = (state, at, ttlMs = 30_000) => ({ state, audience: {}, ttlMs, at });

test("several tabs of one user: one entry, kept while any tab holds it, the latest state wins", async () => {
  const { sent, host } = ownerHost();
  const owner = new PresenceOwner(host);
  const key = presenceKey("", "job:1");
  for (const [i, tab] of ["self", "a", "b", "c", "d"].entries()) owner.put(tab, key, held({ viewing: true }, 1000 + i));
  await until("one set", () => sent.length === 1);
  await tick(50);
  assert.deepEqual(sent, [["job:1", '{"viewing":true}', false]], "5 tabs, one SetPresence");
  owner.put("b", key, held({ typing: true }, 2000));
  await until("b's newer state", () => sent.length === 2);
  for (const tab of ["b", "a", "c"]) owner.dropTab(tab);
  await until("back to viewing", () => sent.length === 3);
  assert.deepEqual(sent[2], ["job:1", '{"viewing":true}', false]);
  owner.put("self", key, null);
  await tick(50);
  assert.equal(sent.length, 3, "tab d still holds it: nothing is removed");
  // the leader leaves (pagehide): d holds it, so the next leader takes over and nothing is cleared
  owner.abandon();
  assert.equal(sent.length, 3);

  const next = new PresenceOwner(host);
  next.put("self", key, held({ viewing: true }, 3000));
  await until("the next leader's set", () => sent.length === 4);
  next.abandon(); // alone: removed, with keepalive
  assert.deepEqual(sent[4], ["job:1", null, true]);
});

test("a tab that stops announcing (crashed) loses its state after its TTL; the entry goes with it", async () => {
  const { sent, host } = ownerHost();
  const owner = new PresenceOwner(host);
  const key = presenceKey("", "job:1");
  owner.put("crashed", key, held({ viewing: true }, 1000, 200));
  await until("set", () => sent.length === 1);
  // refreshed at ttl/2 once, then the tab's last word is older than its TTL: removed
  await until("removed", () => sent.some(([, state]) => state === null), 2000);
  assert.deepEqual(sent.at(-1), ["job:1", null, false]);
  owner.abandon();
});
