//! Presence state (API.md "Presence state and broadcast"): what this user is doing on a topic,
//! held by the page and kept alive on the server while held.
//!
//! - PresenceBook (every tab): the holds of this tab (one per `setPresence` topic, one per
//!   `usePresence` hook). A tab's state on a topic is its most recently set hold; changes leave
//!   after the current task, so StrictMode's release-then-set is no change at all.
//! - PresenceOwner (the tab that talks to the server: the cross-tab leader, or a client alone):
//!   every tab's state per topic, by tab. The server's entry is the most recently set of them; it
//!   is sent on change, re-sent every ttl/2, and removed when no tab holds it any more. Followers
//!   send their states to the leader (and again every ttl/3, so a crashed tab's state dies with
//!   its TTL); a leader leaving removes only what no other tab holds, the next leader takes over
//!   the rest. So a user's tabs on one topic are one entry, and closing one of them does not clear
//!   it while another still holds it.
//! - watchPresence: a topic's entries, the ListPresence snapshot merged with the live
//!   `presence_state` events, listed again whenever the stream (re)starts carrying them.

import { create, fromJson, toBinary, type JsonObject } from "@bufbuild/protobuf";
import { StructSchema, timestampNow, type Timestamp } from "@bufbuild/protobuf/wkt";
import type { OrgpulseClient, Unsubscribe } from "./client.js";
import type { ConnectionState } from "./feed.js";
import { backoffDelay, DEFAULT_TIMING } from "./feed.js";
import { EventKind, PresenceEntrySchema, type PresenceEntry, type PresenceState } from "./gen/orgpulse/v1/event_pb.js";

/** Who may see an entry or a broadcast (API.md "Audiences and topics"); all empty = the whole org. */
export interface AudienceSpec {
  userIds?: string[];
  groups?: string[];
  roles?: string[];
}

export interface PresenceOptions {
  /** "" or absent = the token's org. */
  orgId?: string;
  /** Who may see the entry; absent = the whole org. */
  audience?: AudienceSpec;
  /** The entry expires this long after the last refresh (default 30 000, 1 000 to 120 000). */
  ttlMs?: number;
}

/** One tab's state on one topic, as it travels to the owner. */
export interface Held {
  state: JsonObject;
  audience: AudienceSpec;
  ttlMs: number;
  /** When it was set (Date.now()): the most recent wins. */
  at: number;
}

export const DEFAULT_PRESENCE_TTL_MS = 30_000;
export const MIN_PRESENCE_TTL_MS = 1_000;
export const MAX_PRESENCE_TTL_MS = 120_000;
const MAX_STATE_BYTES = 1024;
export const MAX_BROADCAST_BYTES = 4096;
/** A clear that keeps failing is left to the server's TTL after this many attempts. */
const CLEAR_ATTEMPTS = 3;
/** While the subscription polls (Poll carries no presence), the snapshot is read this often. */
const POLLING_RELIST_MS = 5_000;

/** API.md: a topic is 1-128 chars of [A-Za-z0-9._:@/-]. Throws a TypeError otherwise. */
export function checkTopic(topic: string): void {
  if (!/^[A-Za-z0-9._:@/-]{1,128}$/.test(topic)) throw new TypeError(`invalid topic ${JSON.stringify(topic)}: 1-128 chars of [A-Za-z0-9._:@/-]`);
}

/** Throws a TypeError when `data` encodes to more than `max` bytes (the server would refuse it). */
export function checkStruct(data: JsonObject, max: number, what: string): void {
  const size = toBinary(StructSchema, fromJson(StructSchema, data)).length;
  if (size > max) throw new TypeError(`${what} is ${size} bytes encoded; at most ${max}`);
}

/** `[org, topic]` as a map key. */
export const presenceKey = (org: string, topic: string): string => JSON.stringify([org, topic]);
const unkey = (key: string): [string, string] => JSON.parse(key) as [string, string];

/** One holder's claim on a topic: `set` replaces it, `release` withdraws it. */
export class PresenceHold {
  constructor(
    private readonly book: PresenceBook,
    private readonly key: string,
    private readonly id: number,
    private readonly options: PresenceOptions,
  ) {}

  /** This holder's state (null or {} = none; the entry goes when no holder has one). */
  set(state: JsonObject | null, options: PresenceOptions = this.options): void {
    const some = state && Object.keys(state).length ? state : null;
    const ttl = options.ttlMs ?? DEFAULT_PRESENCE_TTL_MS;
    if (!(ttl >= MIN_PRESENCE_TTL_MS && ttl <= MAX_PRESENCE_TTL_MS)) {
      throw new TypeError(`ttlMs must be between ${MIN_PRESENCE_TTL_MS} and ${MAX_PRESENCE_TTL_MS}`);
    }
    if (some) checkStruct(some, MAX_STATE_BYTES, "a presence state");
    this.book.put(this.key, this.id, some, options);
  }

  release(): void {
    this.book.put(this.key, this.id, null, this.options);
  }
}

/** What the book and the owner need of the client. */
export interface PresenceHost {
  /** Resolves once the tab knows whether it leads, follows or is alone. */
  ready(): Promise<void>;
  role(): "solo" | "leader" | "follower";
  tabId(): string;
  /** To the leader (followers only). */
  post(org: string, topic: string, held: Held | null): void;
  /** SetPresence (an empty state removes); `leaving`: the page is going away (keepalive). */
  send(org: string, topic: string, held: Held | null, leaving: boolean): Promise<void>;
}

/** This tab's holds; their combined state per topic goes to the owner (here or in the leader). */
export class PresenceBook {
  private readonly holds = new Map<string, Map<number, Held>>();
  private readonly dirty = new Set<string>();
  private nextId = 1;
  private flushing = false;
  /** Hidden (pagehide) or closed: nothing is announced until shown again. */
  private hidden = false;
  private beat: ReturnType<typeof setTimeout> | undefined;
  /** Where this tab's states go while it leads or is alone. */
  owner: PresenceOwner | null = null;

  constructor(private readonly host: PresenceHost) {}

  hold(orgId: string, topic: string, options: PresenceOptions): PresenceHold {
    checkTopic(topic);
    return new PresenceHold(this, presenceKey(orgId, topic), this.nextId++, options);
  }

  put(key: string, id: number, state: JsonObject | null, options: PresenceOptions): void {
    let holds = this.holds.get(key);
    if (state) {
      if (!holds) this.holds.set(key, (holds = new Map()));
      holds.set(id, { state, audience: options.audience ?? {}, ttlMs: options.ttlMs ?? DEFAULT_PRESENCE_TTL_MS, at: Date.now() });
    } else if (holds?.delete(id) && holds.size === 0) this.holds.delete(key);
    this.dirty.add(key);
    if (this.flushing) return;
    this.flushing = true;
    setTimeout(() => void this.flush(), 0);
  }

  /** This tab's state on `key`: its most recently set hold. */
  combined(key: string): Held | null {
    let best: Held | null = null;
    for (const h of this.holds.get(key)?.values() ?? []) if (!best || h.at >= best.at) best = h;
    return best;
  }

  /** Announces every state of this tab again (a new leader, the page shown again). */
  announceAll(): void {
    for (const key of this.holds.keys()) this.dirty.add(key);
    void this.flush();
  }

  private async flush(): Promise<void> {
    await this.host.ready();
    this.flushing = false;
    if (this.hidden) return;
    const keys = [...this.dirty];
    this.dirty.clear();
    for (const key of keys) this.route(key, this.combined(key));
    this.heartbeat();
  }

  private route(key: string, held: Held | null): void {
    if (this.host.role() === "follower") {
      const [org, topic] = unkey(key);
      this.host.post(org, topic, held);
      return;
    }
    this.owner ??= new PresenceOwner(this.host);
    this.owner.put(this.host.tabId(), key, held);
  }

  /** A follower repeats its states every ttl/3, so the leader can tell a crashed tab's apart. */
  private heartbeat(): void {
    clearTimeout(this.beat);
    if (this.hidden || this.host.role() !== "follower" || this.holds.size === 0) return;
    const every = Math.min(...[...this.holds.keys()].map((k) => this.combined(k)?.ttlMs ?? DEFAULT_PRESENCE_TTL_MS)) / 3;
    this.beat = setTimeout(() => this.announceAll(), every);
  }

  /** Leader now: this tab's states go to its own owner. */
  lead(): void {
    this.owner = new PresenceOwner(this.host);
    this.announceAll();
  }

  /** No longer leading (leaving): what only this tab held is removed, the rest is the next leader's. */
  follow(): void {
    this.owner?.abandon();
    this.owner = null;
  }

  /** pagehide / close: withdraw this tab's states (kept, to announce again on pageshow). */
  hide(): void {
    this.hidden = true;
    clearTimeout(this.beat);
    this.follow();
  }

  show(): void {
    this.hidden = false;
    this.announceAll();
  }
}

interface Holder {
  held: Held;
  /** When its tab last announced it. */
  seen: number;
}

interface Entry {
  org: string;
  topic: string;
  holders: Map<string, Holder>;
  /** What the server has: JSON of [state, audience, ttl], or null (nothing). */
  sent: string | null;
  refreshAt: number;
  busy: boolean;
  again: boolean;
  failures: number;
  timer: ReturnType<typeof setTimeout> | undefined;
}

/** The server's entries of this user, as the tab that talks to the server keeps them. */
export class PresenceOwner {
  private readonly entries = new Map<string, Entry>();
  private closed = false;

  constructor(private readonly host: PresenceHost) {}

  /** Tab `tab`'s state on `key` (null: it holds none). */
  put(tab: string, key: string, held: Held | null): void {
    let e = this.entries.get(key);
    if (!e) {
      if (!held) return;
      const [org, topic] = unkey(key);
      e = { org, topic, holders: new Map(), sent: null, refreshAt: 0, busy: false, again: false, failures: 0, timer: undefined };
      this.entries.set(key, e);
    }
    if (held) e.holders.set(tab, { held, seen: Date.now() });
    else e.holders.delete(tab);
    this.schedule(e, 0);
  }

  /** A tab said goodbye: its states are withdrawn. */
  dropTab(tab: string): void {
    for (const e of this.entries.values()) if (e.holders.delete(tab)) this.schedule(e, 0);
  }

  /** This tab stops owning: removes what no other tab holds (keepalive), forgets the rest. */
  abandon(): void {
    this.closed = true;
    const self = this.host.tabId();
    for (const e of this.entries.values()) {
      clearTimeout(e.timer);
      this.prune(e);
      const others = [...e.holders.keys()].some((t) => t !== self);
      if (!others && e.sent !== null) void this.host.send(e.org, e.topic, null, true).catch(() => {});
    }
    this.entries.clear();
  }

  private schedule(e: Entry, delay: number): void {
    clearTimeout(e.timer);
    e.timer = setTimeout(() => void this.sync(e), delay);
  }

  /** Drops the states of tabs not heard from within their TTL (crashed without a goodbye). */
  private prune(e: Entry): void {
    const self = this.host.tabId();
    const now = Date.now();
    for (const [tab, h] of e.holders) if (tab !== self && now - h.seen > h.held.ttlMs) e.holders.delete(tab);
  }

  private async sync(e: Entry): Promise<void> {
    if (this.closed) return;
    if (e.busy) {
      e.again = true;
      return;
    }
    this.prune(e);
    let best: Held | null = null;
    for (const { held } of e.holders.values()) if (!best || held.at >= best.at) best = held;
    const want = best ? JSON.stringify([best.state, best.audience, best.ttlMs]) : null;
    const now = Date.now();
    if (want === e.sent && (want === null || now < e.refreshAt)) {
      if (want === null) this.entries.delete(presenceKey(e.org, e.topic));
      else this.schedule(e, e.refreshAt - now);
      return;
    }
    e.busy = true;
    let delay: number;
    try {
      await this.host.send(e.org, e.topic, best, false);
      e.sent = want;
      e.failures = 0;
      e.refreshAt = Date.now() + (best?.ttlMs ?? 0) / 2;
      delay = best ? best.ttlMs / 2 : 0;
    } catch {
      e.failures++;
      if (want === null && e.failures >= CLEAR_ATTEMPTS) e.sent = null; // the TTL removes it
      delay = Math.min(backoffDelay(e.failures, DEFAULT_TIMING), (best?.ttlMs ?? DEFAULT_PRESENCE_TTL_MS) / 2);
    } finally {
      e.busy = false;
    }
    if (this.closed) return;
    this.schedule(e, e.again ? 0 : delay);
    e.again = false;
  }
}

export interface PresenceWatchOptions {
  orgId?: string;
}

export interface PresenceHandlers {
  /** The topic's entries now (sorted by user, then topic): after each snapshot and each change. */
  onChange(entries: PresenceEntry[]): void;
  onState?(state: ConnectionState): void;
}

const entryKey = (userId: string, topic: string) => `${userId}\u0000${topic}`;

/**
 * The entries of `topic` ("" = every topic): subscribe first, then ListPresence each time the
 * stream starts carrying this topic (and every few seconds while polling, which carries no
 * presence); the events that arrive while the list is under way are applied after it, the last
 * write per (user, topic) winning.
 */
export function watchPresence(
  client: OrgpulseClient,
  topic: string,
  handlers: PresenceHandlers,
  options: PresenceWatchOptions = {},
): Unsubscribe {
  if (topic) checkTopic(topic);
  const orgId = options.orgId ?? "";
  const entries = new Map<string, PresenceEntry>();
  let held: [PresenceState, Timestamp | undefined][] | null = null;
  let generation = 0;
  let closed = false;
  let polling: ReturnType<typeof setInterval> | undefined;
  const emit = () =>
    handlers.onChange([...entries.values()].sort((a, b) => (a.userId === b.userId ? (a.topic < b.topic ? -1 : 1) : a.userId < b.userId ? -1 : 1)));
  const apply = (p: PresenceState, time: Timestamp | undefined) => {
    const k = entryKey(p.userId, p.topic);
    if (p.state && Object.keys(p.state).length) entries.set(k, create(PresenceEntrySchema, { userId: p.userId, topic: p.topic, state: p.state, updatedAt: time ?? timestampNow() }));
    else entries.delete(k);
  };
  const load = async () => {
    const gen = ++generation;
    held ??= [];
    try {
      const list = await client.listPresence(topic, { orgId });
      if (closed || gen !== generation) return;
      entries.clear();
      for (const e of list) entries.set(entryKey(e.userId, e.topic), e);
    } catch {
      if (closed || gen !== generation) return; // the next (re)start or poll lists again
    }
    const pending = held ?? [];
    held = null;
    for (const [p, time] of pending) apply(p, time);
    emit();
  };
  const unsubscribe = client.subscribe(
    { orgId, kinds: [EventKind.PRESENCE], topics: topic ? [topic] : [] },
    {
      onEvent: (ev) => {
        if (ev.payload.case !== "presenceState") return;
        if (held) held.push([ev.payload.value, ev.time]);
        else {
          apply(ev.payload.value, ev.time);
          emit();
        }
      },
      onLive: () => void load(),
      onState: (s) => {
        clearInterval(polling);
        if (s === "polling") {
          void load();
          polling = setInterval(() => void load(), POLLING_RELIST_MS);
        }
        handlers.onState?.(s);
      },
    },
  );
  return () => {
    closed = true;
    clearInterval(polling);
    unsubscribe();
  };
}
