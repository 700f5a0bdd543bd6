//! The listeners of one org in one tab: each has its own filter and its own last seq, so one
//! shared wire stream (the union of their filters) reaches each exactly once, in seq order,
//! however often the stream reconnects, replays or switches to polling.

import { EventKind, type Event } from "./gen/orgpulse/v1/event_pb.js";
import type { ConnectionState, StateInfo, WireFilter } from "./feed.js";

/** What a listener asked for. */
export interface FilterSpec {
  /** Empty = all kinds. */
  kinds: EventKind[];
  /** Empty = all entity types. */
  entityTypes: string[];
  /** Durable events with at least one of these topics; empty = all. */
  topics: string[];
}

export interface Handlers {
  /**
   * A durable event (seq > 0, each exactly once, in seq order) or an ephemeral one (seq 0: online /
   * offline, presence state, broadcast; at most once).
   */
  onEvent?(ev: Event): void;
  onState?(state: ConnectionState, info: StateInfo): void;
  /**
   * What happened before now cannot be replayed (the cursor is too old, or from another log):
   * reload your snapshot. Events after this call continue the new position.
   */
  onResync?(reason: string): void;
  /**
   * The shared stream now carries this listener's events (it reached `caught_up` with a filter
   * covering the listener's): when it joined a live stream, and after each (re)connection. What
   * is not in the log (presence entries) may have changed unseen before: read its snapshot now.
   */
  onLive?(): void;
}

export class Listener {
  /** Highest seq delivered since the last resync. */
  lastSeq = 0n;
  /** While catching up from its own cursor: the shared stream's events, held back. */
  held: Event[] | null = null;
  active = true;

  constructor(
    /** null = state only: contributes nothing to the wire filter and receives no events. */
    readonly spec: FilterSpec | null,
    readonly handlers: Handlers,
  ) {}

  wants(ev: Event): boolean {
    if (!this.spec) return false;
    const kind = kindOf(ev);
    if (kind === EventKind.UNSPECIFIED) return false;
    if (this.spec.kinds.length && !this.spec.kinds.includes(kind)) return false;
    const p = ev.payload;
    if (p.case === "entityChanged" && this.spec.entityTypes.length && !this.spec.entityTypes.includes(p.value.entityType)) return false;
    const topics = this.spec.topics;
    const own = topicOf(ev);
    if (own !== undefined) return topics.length === 0 || topics.includes(own);
    return ev.seq === 0n || topics.length === 0 || ev.topics.some((t) => topics.includes(t));
  }

  /** Whether a stream with `filter` carries everything this listener asks for. */
  coveredBy(filter: WireFilter): boolean {
    if (!this.spec) return false;
    const within = <T>(want: T[], have: T[]) => have.length === 0 || (want.length > 0 && want.every((w) => have.includes(w)));
    const { kinds, entityTypes, topics } = this.spec;
    const entities = kinds.length === 0 || kinds.includes(EventKind.ENTITY);
    return within(kinds, filter.kinds) && within(topics, filter.topics) && (!entities || within(entityTypes, filter.entityTypes));
  }

  /** Delivers `ev` unless it is filtered out, a duplicate, or held back by a catch-up. */
  deliver(ev: Event, bypassHold = false): void {
    if (!this.active || !this.wants(ev)) return;
    if (this.held && !bypassHold) {
      this.held.push(ev);
      return;
    }
    if (ev.seq > 0n) {
      if (ev.seq <= this.lastSeq) return;
      this.lastSeq = ev.seq;
    }
    this.handlers.onEvent?.(ev);
  }

  resync(reason: string): void {
    if (!this.active) return;
    this.lastSeq = 0n;
    if (this.held) this.held = []; // what it held belongs to the log before the resync
    this.handlers.onResync?.(reason);
  }
}

export function kindOf(ev: Event): EventKind {
  switch (ev.payload.case) {
    case "jobCreated":
    case "jobUpdated":
    case "jobDeleted":
      return EventKind.JOB;
    case "notificationNew":
      return EventKind.NOTIFICATION;
    case "userOnline":
    case "userOffline":
    case "presenceState":
      return EventKind.PRESENCE;
    case "broadcast":
      return EventKind.BROADCAST;
    case "entityChanged":
      return EventKind.ENTITY;
    default:
      return EventKind.UNSPECIFIED;
  }
}

/** The topic of a presence state or a broadcast (they have one each); undefined for the others. */
export function topicOf(ev: Event): string | undefined {
  const p = ev.payload;
  return p.case === "presenceState" || p.case === "broadcast" ? p.value.topic : undefined;
}

/** The smallest wire filter that carries everything each spec asks for. */
export function unionFilter(orgId: string, specs: Iterable<FilterSpec>): WireFilter {
  const kinds = new Set<EventKind>();
  const entityTypes = new Set<string>();
  const topics = new Set<string>();
  let allKinds = false;
  let allTypes = false;
  let allTopics = false;
  for (const s of specs) {
    // a tab running an older bundle sends specs without topics: it wants them all
    const own = s.topics ?? [];
    if (own.length === 0) allTopics = true;
    own.forEach((t) => topics.add(t));
    if (s.kinds.length === 0) allKinds = true;
    s.kinds.forEach((k) => kinds.add(k));
    if (s.kinds.length === 0 || s.kinds.includes(EventKind.ENTITY)) {
      if (s.entityTypes.length === 0) allTypes = true;
      s.entityTypes.forEach((t) => entityTypes.add(t));
    }
  }
  return {
    orgId,
    kinds: allKinds ? [] : [...kinds].sort((a, b) => a - b),
    entityTypes: allTypes ? [] : [...entityTypes].sort(),
    topics: allTopics ? [] : [...topics].sort(),
  };
}

export class Fanout {
  readonly listeners = new Set<Listener>();
  state: ConnectionState = "connecting";
  info: StateInfo = {};
  /** The last position the shared stream reached (where a new leader resumes). */
  cursor = "";
  /** The filter of the stream that is open and caught up now; null while there is none. */
  liveFilter: WireFilter | null = null;

  add(l: Listener): void {
    this.listeners.add(l);
    l.handlers.onState?.(this.state, this.info);
    if (this.liveFilter && l.coveredBy(this.liveFilter)) l.handlers.onLive?.();
  }

  /** A stream with `filter` reached caught_up (null: the stream ended). */
  live(filter: WireFilter | null): void {
    this.liveFilter = filter;
    if (!filter) return;
    for (const l of this.listeners) if (l.active && l.coveredBy(filter)) l.handlers.onLive?.();
  }

  remove(l: Listener): void {
    l.active = false;
    this.listeners.delete(l);
  }

  specs(): FilterSpec[] {
    return [...this.listeners].flatMap((l) => (l.spec ? [l.spec] : []));
  }

  event(ev: Event): void {
    for (const l of this.listeners) l.deliver(ev);
  }

  resync(reason: string): void {
    for (const l of this.listeners) l.resync(reason);
  }

  setState(state: ConnectionState, info: StateInfo): void {
    // A listener was told the current state when it joined: the feed's first "connecting" is no
    // news. "reconnecting" repeats with each new delay.
    const news = state !== this.state || state === "reconnecting";
    this.state = state;
    this.info = info;
    if (!news) return;
    for (const l of this.listeners) l.handlers.onState?.(state, info);
  }
}
