// An in-memory orgpulse for the SDK's unit tests: connect's router transport serving EventService
// and JobService over one per-org log with the server's rules (replay after the cursor, then
// caught_up, then live with heartbeats; resync for a cursor of another epoch; Poll; kinds, entity
// types and topics narrowing what a request gets; no audiences: every token sees all), plus the
// failures a browser meets: the server gone (a network error, nothing answered), streams killed
// mid-way, tokens expiring mid-stream (with or without the orgpulse-error trailer), a proxy that
// buffers streams and one that refuses them. Presence state (one entry per user and topic, the
// user being the token) and broadcasts go to the open streams their kinds and topics match.
import { Code, ConnectError, createRouterTransport } from "@connectrpc/connect";
import {
  create, EventSchema, EventService, JobSchema, JobService, NetworkError, PollResponseSchema,
  ListJobsResponseSchema, EventKind, kindOf, PresenceEntrySchema,
} from "../dist/index.js";

const netError = () => new ConnectError("fetch failed", Code.Unknown, undefined, undefined, new NetworkError("connection refused"));

/** Whether a log event matches a Subscribe or Poll request (its kinds, entity types and topics). */
function matches(ev, { kinds, entityTypes, topics }) {
  if (kinds.length && !kinds.includes(kindOf(ev))) return false;
  if (ev.payload.case === "entityChanged" && entityTypes.length && !entityTypes.includes(ev.payload.value.entityType)) return false;
  return !topics.length || ev.topics.some((t) => topics.includes(t));
}

/** The filter of a Subscribe or Poll request, as the tests compare it. */
const asked = (req) => ({
  kinds: [...req.kinds], entityTypes: [...req.entityTypes], topics: [...req.topics], afterCursor: req.afterCursor,
});

export class FakeServer {
  constructor({ heartbeatMs = 40 } = {}) {
    this.heartbeatMs = heartbeatMs;
    this.epoch = "e1";
    /** @type {any[]} */
    this.log = [];
    this.jobs = new Map();
    this.valid = new Set(["t1"]);
    /** expiry is signalled by the trailer (true) or only by the message (false) */
    this.trailer = true;
    this.down = false;
    this.mode = "pass"; // "buffer" | "refuse-streams"
    /** a sloppy server replaying this many events before the cursor (the client must dedupe) */
    this.replayOverlap = 0;
    /** What each Subscribe and Poll asked for: {kinds, entityTypes, topics, afterCursor} */
    this.subscribes = [];
    this.polls = [];
    /** What each ListJobs asked for: {topics} */
    this.listJobs = [];
    this.open = new Set();
    /** Each open stream's filter and its queue of ephemeral events. */
    this.streams = new Set();
    /** "user\0topic" -> PresenceEntry */
    this.presence = new Map();
    /** Every SetPresence: {user, topic, state, ttlMs, at} */
    this.presenceCalls = [];
    /** How many ListPresence calls were answered. */
    this.presenceLists = 0;
    /** Runs before a ListPresence answers (a test's concurrent changes). */
    this.beforeList = null;
    this.wakers = new Set();
    this.killers = new Set();
  }

  cursorOf(seq) {
    return `${this.epoch}:${seq}`;
  }

  append(caseName, value, extra = {}) {
    const seq = BigInt(this.log.length + 1);
    const ev = create(EventSchema, { seq, cursor: this.cursorOf(seq), orgId: "acme", payload: { case: caseName, value }, ...extra });
    this.log.push(ev);
    if (caseName === "jobCreated" || caseName === "jobUpdated") this.jobs.set(value.id, value);
    if (caseName === "jobDeleted") this.jobs.delete(value.jobId);
    this.wake();
    return ev;
  }

  /** A job event; the job's topics are the event's, as on the server. */
  job(id, version, extra = {}) {
    const j = create(JobSchema, { id, version: BigInt(version), title: id, ...extra });
    return this.append(version === 1 ? "jobCreated" : "jobUpdated", j, { topics: j.topics });
  }

  wake() {
    for (const w of [...this.wakers]) w();
  }

  /** A new database behind the same address: seq starts over, old cursors get resync. */
  newEpoch() {
    this.epoch = `e${Number(this.epoch.slice(1)) + 1}`;
    this.log = [];
    this.jobs.clear();
  }

  /** Every open stream breaks off as when the server is SIGKILLed. */
  kill() {
    for (const k of [...this.killers]) k();
  }

  /** Ends the streams of `token` with UNAUTHENTICATED as the server does when exp passes. */
  expire(token) {
    this.valid.delete(token);
    this.wake();
  }

  expiredError() {
    return this.trailer
      ? new ConnectError("credentials no longer valid", Code.Unauthenticated, { "orgpulse-error": "token-expired" })
      : new ConnectError("token expired", Code.Unauthenticated);
  }

  auth(ctx) {
    const token = (ctx.requestHeader.get("authorization") ?? "").replace(/^Bearer /, "");
    if (!this.valid.has(token)) throw this.expiredError();
    return token;
  }

  /** Events after `cursor` matching `filter`; null when the cursor belongs to another epoch. */
  after(cursor, filter) {
    let from = 0;
    if (cursor) {
      const [epoch, seq] = cursor.split(":");
      if (epoch !== this.epoch) return null;
      from = Math.max(0, Number(seq) - this.replayOverlap);
    }
    return this.log.slice(from).filter((ev) => matches(ev, filter));
  }

  /** The seq a cursor names (the end of the log when it is empty or of another epoch). */
  seqOf(cursor) {
    const [epoch, seq] = (cursor || "").split(":");
    return epoch === this.epoch ? BigInt(seq) : BigInt(this.log.length);
  }

  waitForChange(signal, ms) {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(t);
        this.wakers.delete(done);
        signal.removeEventListener("abort", done);
        resolve();
      };
      const t = setTimeout(done, ms);
      this.wakers.add(done);
      signal.addEventListener("abort", done);
    });
  }

  /** An ephemeral event (seq 0) to every open stream whose filter matches, as the server does. */
  emit(caseName, value) {
    const ev = create(EventSchema, { orgId: "acme", payload: { case: caseName, value } });
    const kind = kindOf(ev);
    for (const st of this.streams) {
      if (st.req.kinds.length && !st.req.kinds.includes(kind)) continue;
      if (st.req.topics.length && !st.req.topics.includes(value.topic)) continue;
      st.queue.push(ev);
    }
    this.wake();
  }

  setPresence(req, ctx) {
    const user = this.auth(ctx);
    const state = req.state ?? {};
    this.presenceCalls.push({ user, topic: req.topic, state, ttlMs: req.ttlMs, at: Date.now() });
    const key = `${user}\u0000${req.topic}`;
    const before = this.presence.get(key);
    const removed = Object.keys(state).length === 0;
    if (removed) this.presence.delete(key);
    else this.presence.set(key, create(PresenceEntrySchema, { userId: user, topic: req.topic, state }));
    if (removed ? before : JSON.stringify(before?.state) !== JSON.stringify(state)) {
      this.emit("presenceState", { userId: user, topic: req.topic, state: removed ? undefined : state });
    }
    return {};
  }

  async listPresence(req, ctx) {
    this.auth(ctx);
    const entries = [...this.presence.values()].filter((e) => !req.topic || e.topic === req.topic);
    await this.beforeList?.();
    this.presenceLists++;
    return { entries };
  }

  async *subscribe(req, ctx) {
    const token = this.auth(ctx);
    this.subscribes.push(asked(req));
    this.open.add(ctx);
    const stream = { req, queue: [] };
    this.streams.add(stream);
    try {
      if (this.mode === "refuse-streams") throw new ConnectError("streams refused by test proxy", Code.Unavailable);
      if (this.mode === "buffer") {
        await new Promise((r) => ctx.signal.addEventListener("abort", r));
        return;
      }
      let pending = this.after(req.afterCursor, req);
      if (pending === null) {
        yield create(EventSchema, { cursor: this.cursorOf(this.log.length), payload: { case: "resync", value: { reason: "cursor from another log" } } });
        pending = [];
      }
      let sent = BigInt(this.log.length);
      for (const ev of pending) yield ev;
      yield create(EventSchema, { cursor: this.cursorOf(sent), payload: { case: "caughtUp", value: {} } });
      while (!ctx.signal.aborted) {
        if (!this.valid.has(token)) throw this.expiredError();
        if (stream.queue.length) {
          yield* stream.queue.splice(0);
          continue;
        }
        if (BigInt(this.log.length) > sent) {
          const fresh = this.log.slice(Number(sent));
          sent = BigInt(this.log.length);
          for (const ev of fresh) if (matches(ev, req)) yield ev;
          continue;
        }
        await this.waitForChange(ctx.signal, this.heartbeatMs);
        if (BigInt(this.log.length) === sent && this.valid.has(token) && !ctx.signal.aborted) {
          yield create(EventSchema, { cursor: this.cursorOf(sent), payload: { case: "heartbeat", value: {} } });
        }
      }
    } finally {
      this.open.delete(ctx);
      this.streams.delete(stream);
    }
  }

  async poll(req, ctx) {
    this.auth(ctx);
    this.polls.push(asked(req));
    let events = this.after(req.afterCursor, req);
    if (events === null) return create(PollResponseSchema, { resync: true, cursor: this.cursorOf(this.log.length) });
    if (!events.length && req.waitMs) {
      await this.waitForChange(ctx.signal, Math.min(req.waitMs, 200));
      events = this.after(req.afterCursor, req) ?? [];
    }
    events = events.slice(0, req.maxEvents || 100);
    const last = events.length ? events.at(-1).seq : this.seqOf(req.afterCursor);
    return create(PollResponseSchema, { events, cursor: this.cursorOf(last) });
  }

  transport() {
    const inner = createRouterTransport(({ service }) => {
      service(EventService, {
        subscribe: (req, ctx) => this.subscribe(req, ctx),
        poll: (req, ctx) => this.poll(req, ctx),
        listOnline: () => ({ members: [] }),
        setPresence: (req, ctx) => this.setPresence(req, ctx),
        listPresence: (req, ctx) => this.listPresence(req, ctx),
        broadcast: (req, ctx) => {
          this.emit("broadcast", { userId: this.auth(ctx), topic: req.topic, data: req.data });
          return {};
        },
        publish: (req, ctx) => {
          this.auth(ctx);
          const change = { entityType: req.entityType, entityId: req.entityId, action: req.action };
          const ev = this.append("entityChanged", change, { topics: req.topics });
          return { seq: ev.seq, cursor: ev.cursor };
        },
      });
      service(JobService, {
        listJobs: (req, ctx) => {
          this.auth(ctx);
          const jobs = [...this.jobs.values()].filter((j) => !req.topics.length || j.topics.some((t) => req.topics.includes(t)));
          this.listJobs.push({ topics: [...req.topics] });
          return create(ListJobsResponseSchema, { jobs, cursor: this.cursorOf(this.log.length) });
        },
        createJob: (req, ctx) => {
          this.auth(ctx);
          return this.job(`j${this.log.length + 1}`, 1, { title: req.title, topics: req.topics }).payload.value;
        },
      });
    });
    const self = this;
    return {
      async unary(...args) {
        if (self.down) throw netError();
        return inner.unary(...args);
      },
      async stream(method, signal, timeoutMs, header, input, contextValues) {
        if (self.down) throw netError();
        const ctl = new AbortController();
        signal?.addEventListener("abort", () => ctl.abort());
        const res = await inner.stream(method, ctl.signal, timeoutMs, header, input, contextValues);
        let kill;
        const killed = new Promise((_, reject) => {
          kill = () => {
            ctl.abort();
            reject(netError());
          };
        });
        killed.catch(() => {});
        self.killers.add(kill);
        async function* message() {
          const it = res.message[Symbol.asyncIterator]();
          try {
            for (;;) {
              const r = await Promise.race([it.next(), killed]);
              if (r.done) return;
              yield r.value;
            }
          } finally {
            self.killers.delete(kill);
            ctl.abort();
          }
        }
        return { ...res, message: message() };
      },
    };
  }
}

export { EventKind };
