// Keeps State in step with the server through @orgpulse/client: a snapshot (every job with
// ListJobs' cursor, the user's notifications, who is online), then the SDK's subscription from
// that cursor. The SDK reconnects, resumes, refreshes the token and falls back to polling; a resync
// loads the snapshot again. Presence is not in the log: after a gap the page asks ListOnline.
// With a topic filter, the snapshot's jobs and the stream are both narrowed to the topics (the
// wire carries only them); notifications have no topics, so the page then asks ListNotifications
// every few seconds instead.

import {
  type ConnectError, type ConnectionState, type Event, listAllJobs, type OrgpulseClient,
  snapshotThenSubscribe, type StateInfo, type Unsubscribe,
} from "@orgpulse/client";
import type { Config } from "./config";
import type { Snapshot, State } from "./state";

export interface LiveHooks {
  /** Connection state for the badge; `detail` is e.g. "in 3s". */
  status(state: ConnectionState, detail?: string): void;
  /** State changed: re-render. `flash` is false for snapshot loads. */
  changed(flash: boolean): void;
  /** An event was applied (for the ticker and highlights). */
  event(ev: Event): void;
  /** The connection stopped for a reason the user must act on (token, permission). */
  fatal(err: ConnectError): void;
}

const ONLINE_REFRESH_MS = 10_000;
const NOTIFICATIONS_REFRESH_MS = 5_000;

export class Live {
  private unsubscribe: Unsubscribe | null = null;
  private loaded = false;
  private countdown: ReturnType<typeof setInterval> | undefined;
  private pollingOnline: ReturnType<typeof setInterval> | undefined;
  private pollingNotifications: ReturnType<typeof setInterval> | undefined;

  constructor(
    private readonly client: OrgpulseClient,
    private readonly config: Config,
    private readonly state: State,
    private readonly hooks: LiveHooks,
    /** Only the jobs and durable events of these topics; empty = all. */
    private readonly topics: string[] = [],
  ) {}

  /** Starts, or after a stop for a token problem resumes from the last cursor (nothing is lost). */
  start(): void {
    if (this.unsubscribe && this.loaded) {
      this.client.reconnect();
      return;
    }
    this.unsubscribe?.();
    this.unsubscribe = snapshotThenSubscribe(
      this.client,
      (signal) => this.snapshot(signal),
      { orgId: this.config.org, topics: this.topics },
      {
        onSnapshot: (s) => {
          this.loaded = true;
          this.state.reset(s);
          this.hooks.changed(false);
        },
        onEvent: (ev) => {
          if (this.state.apply(ev)) this.hooks.event(ev);
        },
        onState: (s, info) => this.status(s, info),
      },
    );
    clearInterval(this.pollingNotifications);
    if (this.topics.length) {
      this.pollingNotifications = setInterval(() => void this.refreshNotifications(), NOTIFICATIONS_REFRESH_MS);
    }
  }

  stop(): void {
    this.unsubscribe?.();
    this.unsubscribe = null;
    this.loaded = false;
    clearInterval(this.countdown);
    clearInterval(this.pollingOnline);
    clearInterval(this.pollingNotifications);
  }

  private async snapshot(signal: AbortSignal): Promise<Snapshot & { cursor: string }> {
    const orgId = this.config.org;
    const { jobs, cursor } = await listAllJobs(this.client, { orgId, topics: this.topics }, signal);
    const [notes, online] = await Promise.all([
      this.client.notifications.listNotifications({ orgId, pageSize: 50 }, { signal }),
      this.client.events.listOnline({ orgId }, { signal }),
    ]);
    return {
      cursor,
      jobs,
      notifications: notes.notifications,
      unread: notes.unreadCount,
      online: new Map(online.members.map((m) => [m.userId, m.onlineSince])),
    };
  }

  private status(state: ConnectionState, info: StateInfo): void {
    clearInterval(this.countdown);
    clearInterval(this.pollingOnline);
    if (state === "reconnecting" && info.retryInMs) {
      const until = Date.now() + info.retryInMs;
      const show = () => this.hooks.status("reconnecting", `in ${Math.max(1, Math.ceil((until - Date.now()) / 1000))}s`);
      show();
      this.countdown = setInterval(() => (Date.now() < until ? show() : this.hooks.status("reconnecting")), 1000);
      return;
    }
    this.hooks.status(state);
    if (state === "live" || state === "polling") void this.refreshOnline();
    if (state === "polling") this.pollingOnline = setInterval(() => void this.refreshOnline(), ONLINE_REFRESH_MS);
    if (state === "stopped" && info.error) this.hooks.fatal(info.error);
  }

  /** Under a topic filter notifications do not come by the stream: ask for them. */
  private async refreshNotifications(): Promise<void> {
    try {
      const res = await this.client.notifications.listNotifications({ orgId: this.config.org, pageSize: 50 });
      this.state.setNotifications(res.notifications, res.unreadCount);
      this.hooks.changed(false);
    } catch {
      // the next refresh will do; the connection state reports connection trouble
    }
  }

  /** Presence is ephemeral: after a gap (reconnect, polling) ask who is online now. */
  private async refreshOnline(): Promise<void> {
    try {
      const online = await this.client.events.listOnline({ orgId: this.config.org });
      this.state.online = new Map(online.members.map((m) => [m.userId, m.onlineSince]));
      this.hooks.changed(false);
    } catch {
      // the next refresh will do; the connection state reports connection trouble
    }
  }
}
