//! OrgpulseClient: typed calls for every RPC (with the bearer token from `getToken`, refreshed and
//! retried once when it expired) and `subscribe`, which shares one wire stream per org among all
//! the subscribe calls of the client, and by default among all tabs of the same user; presence
//! state held while the page holds it (one entry per topic for all tabs of the user) and
//! broadcasts (see presence.ts).

import { fromBinary, toBinary, type JsonObject } from "@bufbuild/protobuf";
import { Code, ConnectError, type Client, type Transport } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { crossTabAvailable, Tabs, type TabMessage, type WireStateInfo } from "./crosstab.js";
import { markingFetch } from "./errors.js";
import { Fanout, Listener, unionFilter, type FilterSpec, type Handlers } from "./fanout.js";
import {
  backoffDelay, DEFAULT_TIMING, Feed, sleep, type ConnectionState, type FallbackMemory, type StateInfo, type Timing,
  type WireFilter,
} from "./feed.js";
import { EventSchema, EventService, type Event, type EventKind, type PresenceEntry } from "./gen/orgpulse/v1/event_pb.js";
import { JobService } from "./gen/orgpulse/v1/job_pb.js";
import { NotificationService } from "./gen/orgpulse/v1/notification_pb.js";
import { liveJobs, type LiveJobsHandlers, type LiveJobsOptions } from "./jobs.js";
import { watchLifecycle } from "./lifecycle.js";
import {
  checkStruct, checkTopic, MAX_BROADCAST_BYTES, PresenceBook, presenceKey, watchPresence, type AudienceSpec, type Held,
  type PresenceHandlers, type PresenceHold, type PresenceOptions, type PresenceWatchOptions,
} from "./presence.js";
import { authedClient } from "./rpc.js";
import { claimsOf, Tokens, type GetToken } from "./tokens.js";

export interface OrgpulseClientOptions extends Partial<Timing> {
  /** The server (or the proxy in front of it), e.g. "https://pulse.example.com"; "" = this page's origin. */
  baseUrl: string;
  /** The bearer token; called when there is none or it expired, never twice at once. */
  getToken: GetToken;
  /** Default: grpc-web (binary) over fetch, which works in browsers and Node >= 18. */
  transport?: Transport;
  /**
   * Share one stream among all tabs of the same user (Web Locks + BroadcastChannel). Default on
   * where both exist. `key` names the group (default: the token's `sub` and `org`).
   */
  crossTab?: boolean | { key?: string };
  /**
   * Keep each org's cursor in sessionStorage so a reload resumes from it: under
   * `<prefix>:["<server>","<org>","<user>"]` (prefix "orgpulse.cursor", or this string), so only the
   * same user of the same org on the same server is ever offered it.
   */
  persistCursor?: boolean | string;
  /**
   * Remember a fallback to polling in sessionStorage for `streamRetryMs`, so a reload polls at
   * once. Default on where sessionStorage exists.
   */
  rememberFallback?: boolean;
  /** Disconnect / reconnect on offline, pagehide, pageshow, visibilitychange, sleep. Default on in browsers. */
  lifecycle?: boolean;
}

export interface SubscribeOptions {
  /** "" or absent = the token's org (a service token must name one). */
  orgId?: string;
  /** Absent or empty = all kinds. */
  kinds?: EventKind[];
  /** Narrows entity events; absent or empty = all types. */
  entityTypes?: string[];
  /**
   * Only durable events with at least one of these topics (e.g. "project:42"), and presence states
   * and broadcasts of one of them; absent or empty = all. Online / offline events are not
   * narrowed. Topics narrow what the token may see, never widen it.
   */
  topics?: string[];
  /**
   * Resume after this position (e.g. ListJobs.cursor). Without it the listener starts at the shared
   * stream's position (live from now when it is the first).
   */
  cursor?: string;
}

export type Unsubscribe = () => void;

const DEFAULT_PERSIST_KEY = "orgpulse.cursor";
const CATCH_UP_PAGE = 500;
const CATCH_UP_ATTEMPTS = 5;

/** One org: its listeners here, remote tabs' filters (when leader) and its feed (when not a follower). */
class Channel {
  readonly fanout = new Fanout();
  feed: Feed | null = null;
  /** The first listener's cursor, where the feed starts. */
  startCursor: string | undefined;
  /** tab id -> that tab's listeners' filters (leader only). */
  readonly remote = new Map<string, FilterSpec[]>();
  scheduled = false;

  constructor(readonly orgId: string) {}

  get wanted(): boolean {
    return this.fanout.listeners.size > 0 || this.remote.size > 0;
  }

  specs(): FilterSpec[] {
    return [...this.fanout.specs(), ...[...this.remote.values()].flat()];
  }
}

export class OrgpulseClient {
  readonly jobs: Client<typeof JobService>;
  readonly notifications: Client<typeof NotificationService>;
  readonly events: Client<typeof EventService>;
  readonly tokens: Tokens;
  /** EventService over fetch with `keepalive`, for what is sent as the page goes away. */
  private readonly parting: Client<typeof EventService>;
  private readonly presence: PresenceBook;
  /** setPresence's own hold per [org, topic]. */
  private readonly ownHolds = new Map<string, PresenceHold>();
  private readonly timing: Timing;
  private readonly channels = new Map<string, Channel>();
  private readonly persistKey: string | null;
  /** The server's URL: `baseUrl`, else this page's origin. */
  private readonly server: string;
  private tabs: Tabs | null = null;
  private tabsPending: Promise<void> | null = null;
  private role: "solo" | "leader" | "follower" = "solo";
  private readonly unwatch: () => void;
  private closed = false;

  constructor(private readonly options: OrgpulseClientOptions) {
    this.tokens = new Tokens(options.getToken);
    this.timing = { ...DEFAULT_TIMING, ...definedOnly(options) };
    this.server = options.baseUrl || globalThis.location?.origin || "";
    const transport =
      options.transport ??
      createGrpcWebTransport({
        baseUrl: this.server,
        useBinaryFormat: true,
        fetch: markingFetch(),
      });
    this.jobs = authedClient(JobService, transport, this.tokens);
    this.notifications = authedClient(NotificationService, transport, this.tokens);
    this.events = authedClient(EventService, transport, this.tokens);
    this.parting = options.transport
      ? this.events
      : authedClient(
          EventService,
          createGrpcWebTransport({
            baseUrl: this.server,
            useBinaryFormat: true,
            fetch: markingFetch((input, init) => globalThis.fetch(input, { ...init, keepalive: true })),
          }),
          this.tokens,
        );
    this.presence = new PresenceBook({
      ready: () => this.joinTabs(),
      role: () => this.role,
      tabId: () => this.tabs?.id ?? "self",
      post: (org, topic, held) => this.tabs?.post({ t: "presence", tab: this.tabs.id, org, topic, held }),
      send: (org, topic, held, leaving) => this.sendPresence(org, topic, held, leaving),
    });
    const persist = options.persistCursor;
    this.persistKey = persist ? (typeof persist === "string" ? persist : DEFAULT_PERSIST_KEY) : null;
    this.unwatch =
      options.lifecycle === false
        ? () => {}
        : watchLifecycle({
            suspend: (reason) => this.feeds().forEach((f) => f.suspend(reason)),
            resume: () => this.feeds().forEach((f) => f.resume()),
            woke: () => this.feeds().forEach((f) => f.reconnectNow()),
            hidden: () => {
              this.presence.hide();
              this.tabs?.leave();
            },
            shown: () => {
              this.tabs?.join();
              this.presence.show();
            },
          });
  }

  /**
   * Calls `handlers.onEvent` with every matching event, each durable one exactly once and in seq
   * order, across reconnects, token refreshes, server restarts and stream/poll switches. Returns
   * the function that stops it.
   */
  subscribe(options: SubscribeOptions, handlers: Handlers): Unsubscribe {
    const spec = {
      kinds: [...(options.kinds ?? [])],
      entityTypes: [...(options.entityTypes ?? [])],
      topics: [...(options.topics ?? [])],
    };
    return this.listen(options.orgId ?? "", new Listener(spec, handlers), options.cursor);
  }

  /** The jobs of an org kept exact (snapshot, then the events after its cursor); see liveJobs. */
  liveJobs(options: LiveJobsOptions, handlers: LiveJobsHandlers): Unsubscribe {
    return liveJobs(this, options, handlers);
  }

  /** Only the connection state of an org's shared stream (it does not widen what the stream carries). */
  watchState(onState: NonNullable<Handlers["onState"]>, orgId = ""): Unsubscribe {
    return this.listen(orgId, new Listener(null, { onState }));
  }

  /**
   * Holds `state` as this user's presence on `topic` (e.g. {"viewing": true}) until it is set
   * again, `null` (or {}) removes it, or the page goes (pagehide) or the client closes; refreshed
   * every ttl/2 meanwhile. All tabs of the user share one entry per topic: the most recently set
   * state, removed when no tab holds one. Throws a TypeError for an invalid topic, TTL or a state
   * over 1 KiB; the server's answers are retried (rate limits with backoff).
   */
  setPresence(topic: string, state: JsonObject | null, options: PresenceOptions = {}): void {
    const key = presenceKey(options.orgId ?? "", topic);
    let hold = this.ownHolds.get(key);
    if (!hold) this.ownHolds.set(key, (hold = this.holdPresence(topic, options)));
    hold.set(state, options);
  }

  /**
   * A holder of its own on `topic` (what usePresence uses): the entry is the most recently set of
   * all holders' states (this tab's and the user's other tabs'), gone when the last releases.
   */
  holdPresence(topic: string, options: PresenceOptions = {}): PresenceHold {
    if (this.closed) throw new Error("this OrgpulseClient is closed");
    return this.presence.hold(options.orgId ?? "", topic, options);
  }

  /** ListPresence: the entries of `topic` ("" = every topic) this user may see, now. */
  async listPresence(topic: string, options: { orgId?: string } = {}): Promise<PresenceEntry[]> {
    const res = await this.events.listPresence({ orgId: options.orgId ?? "", topic }, { timeoutMs: this.timing.rpcTimeoutMs });
    return res.entries;
  }

  /** The entries of `topic` ("" = every topic), kept current: snapshot, then presence_state events. */
  watchPresence(topic: string, handlers: PresenceHandlers, options: PresenceWatchOptions = {}): Unsubscribe {
    return watchPresence(this, topic, handlers, options);
  }

  /**
   * Sends `data` (at most 4 KiB) to whoever is subscribed to `topic` right now (never stored,
   * never replayed; for typing indicators, cursors). Rejects with RESOURCE_EXHAUSTED beyond 20
   * per second per user.
   */
  async broadcast(topic: string, data: JsonObject, options: { orgId?: string; audience?: AudienceSpec } = {}): Promise<void> {
    checkTopic(topic);
    checkStruct(data, MAX_BROADCAST_BYTES, "a broadcast");
    await this.events.broadcast(
      { orgId: options.orgId ?? "", topic, data, audience: options.audience },
      { timeoutMs: this.timing.rpcTimeoutMs },
    );
  }

  /** How this client shares streams: "solo" (no cross-tab), "leader" (holds them), "follower". */
  get sharing(): "solo" | "leader" | "follower" {
    return this.role;
  }

  /** The connection state of an org's shared stream now. */
  state(orgId = ""): ConnectionState {
    return this.channels.get(orgId)?.fanout.state ?? "stopped";
  }

  /** Starts stopped streams again from their cursors (e.g. after the user signed in anew). */
  reconnect(): void {
    this.tokens.reset();
    for (const f of this.feeds()) f.start();
  }

  /** Stops every stream and listener of this client. */
  close(): void {
    this.closed = true;
    this.presence.hide();
    this.unwatch();
    for (const ch of this.channels.values()) {
      ch.feed?.stop();
      ch.fanout.listeners.forEach((l) => ch.fanout.remove(l));
    }
    this.channels.clear();
    this.tabs?.close();
  }

  private async sendPresence(org: string, topic: string, held: Held | null, leaving: boolean): Promise<void> {
    const events = leaving ? this.parting : this.events;
    await events.setPresence(
      { orgId: org, topic, state: held?.state ?? {}, audience: held?.audience, ttlMs: held?.ttlMs ?? 0 },
      { timeoutMs: this.timing.rpcTimeoutMs },
    );
  }

  private feeds(): Feed[] {
    return [...this.channels.values()].flatMap((ch) => (ch.feed ? [ch.feed] : []));
  }

  private listen(orgId: string, l: Listener, cursor?: string): Unsubscribe {
    if (this.closed) throw new Error("this OrgpulseClient is closed");
    const ch = this.channel(orgId);
    ch.fanout.add(l);
    if (cursor) {
      const unclaimed = !ch.feed && ch.startCursor === undefined && this.role !== "follower";
      if (unclaimed) ch.startCursor = cursor;
      else if (cursor !== ch.startCursor || ch.feed) void this.catchUp(ch, l, cursor);
    }
    this.schedule(ch);
    return () => {
      if (!l.active) return;
      ch.fanout.remove(l);
      this.schedule(ch);
    };
  }

  private channel(orgId: string): Channel {
    let ch = this.channels.get(orgId);
    if (!ch) {
      ch = new Channel(orgId);
      this.channels.set(orgId, ch);
    }
    return ch;
  }

  /**
   * Applies listener changes after the current task, so a burst of subscribe / unsubscribe calls
   * (several components mounting, React StrictMode's mount-unmount-mount) costs at most one change
   * of the wire, and never a second stream.
   */
  private schedule(ch: Channel): void {
    if (ch.scheduled) return;
    ch.scheduled = true;
    setTimeout(() => {
      ch.scheduled = false;
      void this.reconcile(ch);
    }, 0);
  }

  private async reconcile(ch: Channel): Promise<void> {
    if (this.closed) return;
    await this.joinTabs();
    // Read before the checks below: nothing may wait between them and the feed's creation.
    const saved = this.persistKey && !ch.feed ? await this.persisted(ch.orgId) : "";
    if (this.closed) return;
    if (this.role === "follower") {
      this.sendFilters();
      if (!ch.wanted) this.channels.delete(ch.orgId);
      return;
    }
    if (!ch.wanted) {
      ch.feed?.stop();
      ch.feed = null;
      if (this.channels.get(ch.orgId) === ch) this.channels.delete(ch.orgId);
      return;
    }
    const filter = unionFilter(ch.orgId, ch.specs());
    if (ch.feed) {
      ch.feed.setFilter(filter);
      return;
    }
    // where the stream got to (this tab's own earlier feed, or the old leader's), else where the
    // first listener asked to start, else where this tab was before a reload
    const cursor = ch.fanout.cursor || ch.startCursor || saved;
    ch.feed = new Feed(this.events, this.tokens, filter, cursor, this.timing, this.sink(ch), this.fallbackMemory());
    ch.feed.start();
  }

  /** The feed's output: this tab's listeners, the cursor store, and (as leader) the other tabs. */
  private sink(ch: Channel) {
    const org = ch.orgId;
    const post = (msg: TabMessage) => {
      if (this.role === "leader") this.tabs?.post(msg);
    };
    return {
      event: (ev: Event) => {
        ch.fanout.event(ev);
        post({ t: "event", org, ev: toBinary(EventSchema, ev) });
      },
      cursor: (cursor: string) => {
        ch.fanout.cursor = cursor;
        this.persist(org, cursor);
        post({ t: "cursor", org, cursor });
      },
      resync: (reason: string) => {
        ch.fanout.resync(reason);
        post({ t: "resync", org, reason });
      },
      state: (state: ConnectionState, info: StateInfo) => {
        ch.fanout.setState(state, info);
        const { error, ...rest } = info;
        const wire: WireStateInfo = error ? { ...rest, error: { code: error.code, message: error.rawMessage } } : rest;
        post({ t: "state", org, state, info: wire });
      },
      live: (filter: WireFilter | null) => {
        ch.fanout.live(filter);
        post({ t: "live", org, filter });
      },
    };
  }

  /** Joins the tab group once (when cross-tab sharing is on): until it leads, this tab follows. */
  private joinTabs(): Promise<void> {
    if (this.tabsPending) return this.tabsPending;
    const opt = this.options.crossTab ?? true;
    if (!opt || !crossTabAvailable()) return (this.tabsPending = Promise.resolve());
    this.tabsPending = (async () => {
      let key = typeof opt === "object" ? opt.key : undefined;
      if (!key) {
        const { sub, org } = claimsOf(await this.tokens.get().catch(() => ""));
        key = `${sub ?? ""}@${org ?? ""}`;
      }
      this.role = "follower";
      this.tabs = new Tabs(`orgpulse:${this.server}:${key}`, {
        lead: () => this.lead(),
        follow: () => this.follow(),
        message: (m) => this.onTabMessage(m),
      });
      this.tabs.join();
    })();
    return this.tabsPending;
  }

  private lead(): void {
    this.role = "leader";
    this.tabs?.post({ t: "leader", tab: this.tabs.id });
    for (const ch of this.channels.values()) this.schedule(ch);
    this.presence.lead();
  }

  private follow(): void {
    this.role = "follower";
    this.presence.follow();
    for (const ch of this.channels.values()) {
      ch.feed?.stop();
      ch.feed = null;
      ch.remote.clear();
    }
  }

  private sendFilters(): void {
    if (!this.tabs) return;
    const orgs: Record<string, FilterSpec[]> = {};
    for (const ch of this.channels.values()) {
      const specs = ch.fanout.specs();
      if (specs.length) orgs[ch.orgId] = specs;
    }
    this.tabs.post({ t: "filters", tab: this.tabs.id, orgs });
  }

  private onTabMessage(m: TabMessage): void {
    if (this.closed) return;
    switch (m.t) {
      case "hello":
        if (this.role !== "leader") return;
        for (const ch of this.channels.values()) {
          const { state, info } = ch.fanout;
          this.tabs?.post({ t: "state", org: ch.orgId, state, info: { reason: info.reason } });
          if (ch.fanout.liveFilter) this.tabs?.post({ t: "live", org: ch.orgId, filter: ch.fanout.liveFilter });
        }
        return;
      case "presence":
        if (this.role === "leader") this.presence.owner?.put(m.tab, presenceKey(m.org, m.topic), m.held);
        return;
      case "leader":
        if (this.role !== "follower") return;
        this.sendFilters();
        this.presence.announceAll();
        return;
      case "filters":
      case "bye": {
        if (this.role !== "leader") return;
        if (m.t === "bye") this.presence.owner?.dropTab(m.tab);
        const orgs = m.t === "filters" ? m.orgs : {};
        for (const ch of this.channels.values()) {
          if (!orgs[ch.orgId] && ch.remote.delete(m.tab)) this.schedule(ch);
        }
        for (const [org, specs] of Object.entries(orgs)) {
          const ch = this.channel(org);
          ch.remote.set(m.tab, specs);
          this.schedule(ch);
        }
        return;
      }
    }
    if (this.role !== "follower") return;
    const ch = this.channels.get(m.org);
    if (!ch) return;
    switch (m.t) {
      case "event":
        ch.fanout.event(fromBinary(EventSchema, m.ev));
        return;
      case "cursor":
        ch.fanout.cursor = m.cursor;
        this.persist(m.org, m.cursor);
        return;
      case "resync":
        ch.fanout.resync(m.reason);
        return;
      case "live":
        ch.fanout.live(m.filter);
        return;
      case "state": {
        const { error, ...rest } = m.info;
        const info: StateInfo = error ? { ...rest, error: new ConnectError(error.message, error.code as Code) } : rest;
        ch.fanout.setState(m.state, info);
        return;
      }
    }
  }

  /**
   * A listener that joined a running stream with its own (older) cursor: its events up to the
   * stream's position come from Poll, while the stream's are held back; then the held ones follow,
   * deduplicated by seq, so it too sees each event once and in order.
   */
  private async catchUp(ch: Channel, l: Listener, cursor: string): Promise<void> {
    l.held = [];
    const spec = l.spec ?? { kinds: [], entityTypes: [], topics: [] };
    let position = cursor;
    for (let attempt = 0; l.active && attempt < CATCH_UP_ATTEMPTS; ) {
      try {
        const res = await this.events.poll(
          { orgId: ch.orgId, ...spec, afterCursor: position, maxEvents: CATCH_UP_PAGE, waitMs: 0 },
          { timeoutMs: this.timing.rpcTimeoutMs },
        );
        if (res.resync) l.resync("the cursor could not be served");
        for (const ev of res.events) l.deliver(ev, true);
        position = res.cursor || position;
        if (res.events.length < CATCH_UP_PAGE) break;
      } catch {
        if (++attempt === CATCH_UP_ATTEMPTS) l.resync("could not catch up from the cursor");
        else await sleep(backoffDelay(attempt, this.timing));
      }
    }
    const held = l.held ?? [];
    l.held = null;
    for (const ev of held) l.deliver(ev);
  }

  private fallbackMemory(): FallbackMemory | null {
    const storage = this.options.rememberFallback === false ? undefined : globalThis.sessionStorage;
    if (!storage) return null;
    const key = `orgpulse.fallback:${this.options.baseUrl}`;
    return {
      pollingUntil: () => Number(storage.getItem(key) ?? 0) || 0,
      remember: (until) => {
        try {
          if (until) storage.setItem(key, String(until));
          else storage.removeItem(key);
        } catch {
          // storage denied: the fallback is found again the slow way
        }
      },
    };
  }

  /**
   * Where the cursor of `orgId` for the holder of `token` is kept: keyed by server, org (the
   * token's when `orgId` is empty) and user (the token's `sub`; the JWT is decoded, not verified).
   * null when cursors are not persisted or there is no token.
   */
  private cursorKey(orgId: string, token: string | null): string | null {
    if (!this.persistKey || !token) return null;
    const { sub, org } = claimsOf(token);
    return `${this.persistKey}:${JSON.stringify([this.server, orgId || org || "", sub ?? ""])}`;
  }

  private async persisted(orgId: string): Promise<string> {
    const key = this.cursorKey(orgId, await this.tokens.get().catch(() => null));
    if (!key) return "";
    try {
      return globalThis.sessionStorage?.getItem(key) ?? "";
    } catch {
      return "";
    }
  }

  private persist(orgId: string, cursor: string): void {
    const key = this.cursorKey(orgId, this.tokens.cached());
    if (!key) return;
    try {
      globalThis.sessionStorage?.setItem(key, cursor);
    } catch {
      // storage full or denied: resuming after a reload is best effort
    }
  }
}

function definedOnly(o: object): Partial<Timing> {
  return Object.fromEntries(Object.entries(o).filter(([k, v]) => v !== undefined && k in DEFAULT_TIMING));
}
