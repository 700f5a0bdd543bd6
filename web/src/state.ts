// What the page knows about its org: jobs, the user's notifications, who is online, the recent
// events and the latest state of each of the product's entities it has seen, plus the rules that
// keep it exact while events arrive (durable events dedupe by seq, a job never goes back to an
// older version, a notification is counted once, an entity keeps only its latest change).

import type { JsonObject } from "@bufbuild/protobuf";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import type { Event, Job, Notification } from "@orgpulse/client";

/** Ticker lines shown. */
export const TICKER_LENGTH = 25;
/** Ticker lines kept, so that narrowed to one entity type the ticker still has lines to show. */
const TICKER_HISTORY = 200;
/** Entities kept in the live-entities panel; the least recently changed go first. */
export const ENTITY_ROWS = 200;
/** Notifications kept (the newest; the unread count still counts them all). */
export const NOTIFICATION_ROWS = 50;

/** A ticker line: the event, and for a deletion the title the job had. */
export interface TickerItem {
  ev: Event;
  deletedTitle?: string;
}

/** The latest change seen of one (entity type, entity id). */
export interface EntityRow {
  /** `type` NUL `id`: unique per entity. */
  key: string;
  entityType: string;
  entityId: string;
  action: string;
  data: JsonObject;
  actor: string;
  time: Timestamp | undefined;
  /** The topics of that change. */
  topics: string[];
  /** Grows with every change the page applies (unlike seq, also across log epochs). */
  revision: number;
}

export interface Snapshot {
  jobs: Job[];
  notifications: Notification[];
  unread: number;
  online: Map<string, Timestamp | undefined>;
}

export class State {
  jobs = new Map<string, Job>();
  /** Newest first. */
  notifications: Notification[] = [];
  unread = 0;
  /** user id -> online since */
  online = new Map<string, Timestamp | undefined>();
  /** Newest first; durable and presence events only. */
  ticker: TickerItem[] = [];
  /**
   * Latest change per entity, least recently changed first (Map order). Entities have no
   * snapshot (the events are the record): this is what the page has seen, kept across resyncs.
   */
  entities = new Map<string, EntityRow>();
  /** Every entity type seen, for the filter. */
  entityTypes = new Set<string>();
  private revisions = 0;
  /** Highest durable seq applied since the last snapshot. */
  private lastSeq = 0n;

  /** Replaces everything with a fresh snapshot; events after its cursor are applied next. */
  reset(s: Snapshot): void {
    this.jobs = new Map(s.jobs.map((j) => [j.id, j]));
    this.setNotifications(s.notifications, s.unread);
    this.online = s.online;
    this.lastSeq = 0n;
  }

  /** Applies one event; false for a duplicate or a keep-alive (nothing for the ticker). */
  apply(ev: Event): boolean {
    if (ev.seq > 0n) {
      if (ev.seq <= this.lastSeq) return false;
      this.lastSeq = ev.seq;
    }
    const p = ev.payload;
    let deletedTitle: string | undefined;
    switch (p.case) {
      case "jobCreated":
      case "jobUpdated": {
        this.upsertJob(p.value);
        break;
      }
      case "jobDeleted":
        deletedTitle = this.jobs.get(p.value.jobId)?.title;
        this.jobs.delete(p.value.jobId);
        break;
      case "notificationNew":
        if (this.notifications.some((n) => n.id === p.value.id)) return false;
        this.notifications.unshift(p.value);
        this.notifications.length = Math.min(this.notifications.length, NOTIFICATION_ROWS);
        if (!p.value.read) this.unread++;
        break;
      case "userOnline":
        if (!this.online.has(p.value.userId)) this.online.set(p.value.userId, ev.time);
        break;
      case "userOffline":
        this.online.delete(p.value.userId);
        break;
      case "entityChanged": {
        const c = p.value;
        const key = `${c.entityType}\u0000${c.entityId}`;
        this.entities.delete(key); // re-inserted last: the most recently changed
        this.entities.set(key, {
          key,
          entityType: c.entityType,
          entityId: c.entityId,
          action: c.action,
          data: c.data ?? {},
          actor: ev.actor,
          time: ev.time,
          topics: ev.topics,
          revision: ++this.revisions,
        });
        if (this.entities.size > ENTITY_ROWS) this.entities.delete(this.entities.keys().next().value as string);
        this.entityTypes.add(c.entityType);
        break;
      }
      default:
        return false; // heartbeat, caught_up, resync: connection matters, handled by Sync
    }
    this.ticker.unshift({ ev, deletedTitle });
    this.ticker.length = Math.min(this.ticker.length, TICKER_HISTORY);
    return true;
  }

  /** The ticker lines to show, newest first: of one entity type only when `entityType` is set. */
  tickerOf(entityType: string): TickerItem[] {
    const of = entityType
      ? this.ticker.filter(({ ev }) => ev.payload.case === "entityChanged" && ev.payload.value.entityType === entityType)
      : this.ticker;
    return of.slice(0, TICKER_LENGTH);
  }

  /** The entities to list, most recently changed first: of one type only when `entityType` is set. */
  entitiesOf(entityType: string): EntityRow[] {
    return [...this.entities.values()].reverse().filter((e) => !entityType || e.entityType === entityType);
  }

  /** The user's notifications as ListNotifications gave them (their events carry no topics). */
  setNotifications(notifications: Notification[], unread: number): void {
    this.notifications = notifications.slice(0, NOTIFICATION_ROWS);
    this.unread = unread;
  }

  /** A job the page itself created or changed (from the RPC answer); same version rule. */
  upsertJob(job: Job): boolean {
    const cur = this.jobs.get(job.id);
    if (cur && cur.version >= job.version) return false;
    this.jobs.set(job.id, job);
    return true;
  }

  markRead(ids: string[], unread: number): void {
    for (const n of this.notifications) if (ids.includes(n.id)) n.read = true;
    this.unread = unread;
  }
}
