// What the page knows about its org: jobs, the user's notifications, who is online and the recent
// events, plus the rules that keep it exact while events arrive (durable events dedupe by seq, a
// job never goes back to an older version, a notification is counted once).

import type { Timestamp } from "@bufbuild/protobuf/wkt";
import type { Event, Job, Notification } from "@orgpulse/client";

const TICKER_LENGTH = 25;

/** A ticker line: the event, and for a deletion the title the job had. */
export interface TickerItem {
  ev: Event;
  deletedTitle?: string;
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
  /** Highest durable seq applied since the last snapshot. */
  private lastSeq = 0n;

  /** Replaces everything with a fresh snapshot; events after its cursor are applied next. */
  reset(s: Snapshot): void {
    this.jobs = new Map(s.jobs.map((j) => [j.id, j]));
    this.notifications = s.notifications;
    this.unread = s.unread;
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
        if (!p.value.read) this.unread++;
        break;
      case "userOnline":
        if (!this.online.has(p.value.userId)) this.online.set(p.value.userId, ev.time);
        break;
      case "userOffline":
        this.online.delete(p.value.userId);
        break;
      default:
        return false; // heartbeat, caught_up, resync: connection matters, handled by Sync
    }
    this.ticker.unshift({ ev, deletedTitle });
    this.ticker.length = Math.min(this.ticker.length, TICKER_LENGTH);
    return true;
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
