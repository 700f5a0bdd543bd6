// Keeps State in step with the server: snapshot (ListJobs + its cursor, ListNotifications,
// ListOnline), then one Subscribe stream from that cursor; on a drop, reconnect with backoff from
// the last cursor; on resync, a new snapshot. Falls back to a Poll long-poll loop from the same
// cursor when streaming does not work through whatever is between us and the server (several
// answered failures in a row, or a stream that opens but delivers nothing for 2x the heartbeat
// interval), and tries streaming again every streamRetryMs. A server that does not answer at all
// is "reconnecting", never "polling".

import { type Api, Code, ConnectError, isCanceled, isNetworkError } from "./api";
import type { Config } from "./config";
import type { Event } from "./gen/orgpulse/v1/event_pb";
import type { Job } from "./gen/orgpulse/v1/job_pb";
import type { State } from "./state";

export type ConnState = "connecting" | "live" | "reconnecting" | "polling" | "stopped";

export interface SyncHooks {
  /** Connection state for the badge; `detail` is e.g. "in 3s". */
  status(state: ConnState, detail?: string): void;
  /** State changed: re-render. `flash` is false for snapshot loads. */
  changed(flash: boolean): void;
  /** An event was applied (for the ticker and highlights). */
  event(ev: Event): void;
  /** The loop stopped for a reason the user must act on. */
  fatal(err: ConnectError): void;
}

/** Answered stream failures in a row (with no live data) before falling back to polling. */
const FAILURES_BEFORE_POLLING = 3;
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 10_000;
const POLL_WAIT_MS = 20_000;
const RPC_TIMEOUT_MS = 10_000;
const ONLINE_REFRESH_MS = 10_000;
const MAX_SNAPSHOT_JOBS = 5_000;

/** The stream stopped without an RPC error (server closed it, or it stalled after data). */
class StreamEnded extends Error {}

export class Sync {
  private cursor = "";
  private needSnapshot = true;
  private mode: "stream" | "poll";
  private answeredFailures = 0;
  private pollUntil = 0;
  private onlineAt = 0;
  /** Bumped by stop(); a loop whose generation is stale exits. */
  private generation = 0;
  private abort = new AbortController();

  constructor(
    private readonly api: Api,
    private readonly config: Config,
    private readonly state: State,
    private readonly hooks: SyncHooks,
  ) {
    this.mode = config.forcePoll ? "poll" : "stream";
  }

  /** Runs until stop() or a fatal error. Resuming after a fatal error keeps the cursor. */
  async start(): Promise<void> {
    const gen = ++this.generation;
    this.abort.abort(); // a loop still running (a new token while connected) ends here
    this.abort = new AbortController();
    let attempt = 0;
    this.hooks.status(this.needSnapshot ? "connecting" : "reconnecting");
    while (gen === this.generation) {
      try {
        if (this.needSnapshot) await this.snapshot();
        if (this.mode === "stream") await this.stream(() => (attempt = 0));
        else await this.poll(() => (attempt = 0));
      } catch (err) {
        if (gen !== this.generation) return;
        const e = ConnectError.from(err);
        if (isVerdict(e) && e.code !== Code.InvalidArgument) {
          this.generation++;
          this.hooks.status("stopped");
          this.hooks.fatal(e);
          return;
        }
        if (e.code === Code.InvalidArgument) this.needSnapshot = true; // e.g. a cursor it rejects
        await this.backoff(attempt++);
      }
    }
  }

  stop(): void {
    this.generation++;
    this.abort.abort();
  }

  private get orgId(): string {
    return this.config.org;
  }

  private async snapshot(): Promise<void> {
    const opts = { signal: this.abort.signal, timeoutMs: RPC_TIMEOUT_MS };
    const first = await this.api.jobs.listJobs({ orgId: this.orgId, pageSize: 500 }, opts);
    // The first page's cursor: later pages may be newer, which the version rule absorbs.
    const jobs: Job[] = [...first.jobs];
    for (let page = first.nextPageToken; page && jobs.length < MAX_SNAPSHOT_JOBS; ) {
      const next = await this.api.jobs.listJobs({ orgId: this.orgId, pageSize: 500, pageToken: page }, opts);
      jobs.push(...next.jobs);
      page = next.nextPageToken;
    }
    const [notes, online] = await Promise.all([
      this.api.notifications.listNotifications({ orgId: this.orgId, pageSize: 50 }, opts),
      this.api.events.listOnline({ orgId: this.orgId }, opts),
    ]);
    this.state.reset({
      jobs,
      notifications: notes.notifications,
      unread: notes.unreadCount,
      online: new Map(online.members.map((m) => [m.userId, m.onlineSince])),
    });
    this.cursor = first.cursor;
    this.needSnapshot = false;
    this.onlineAt = Date.now();
    this.hooks.changed(false);
  }

  /** Presence is ephemeral: after a gap (reconnect, polling) ask who is online now. */
  private async refreshOnline(): Promise<void> {
    this.onlineAt = Date.now();
    try {
      const online = await this.api.events.listOnline(
        { orgId: this.orgId },
        { signal: this.abort.signal, timeoutMs: RPC_TIMEOUT_MS },
      );
      this.state.online = new Map(online.members.map((m) => [m.userId, m.onlineSince]));
      this.hooks.changed(false);
    } catch {
      // the next refresh will do; the connection loop reports connection trouble
    }
  }

  private applyAll(events: Event[]): void {
    for (const ev of events) {
      if (ev.cursor && ev.payload.case !== "userOnline" && ev.payload.case !== "userOffline") {
        this.cursor = ev.cursor;
      }
      if (this.state.apply(ev)) this.hooks.event(ev);
    }
  }

  private async stream(connected: () => void): Promise<void> {
    const ctl = new AbortController();
    const onStop = () => ctl.abort();
    this.abort.signal.addEventListener("abort", onStop);
    let received = 0;
    let proven = false;
    let silent = false;
    let watchdog = 0;
    const arm = () => {
      clearTimeout(watchdog);
      watchdog = window.setTimeout(() => {
        silent = true;
        ctl.abort();
      }, 2 * this.config.heartbeatMs);
    };
    arm();
    try {
      const events = this.api.events.subscribe(
        { orgId: this.orgId, afterCursor: this.cursor },
        { signal: ctl.signal },
      );
      for await (const ev of events) {
        received++;
        arm();
        switch (ev.payload.case) {
          case "caughtUp":
            connected();
            this.hooks.status("live");
            break;
          case "resync":
            console.info(`orgpulse: resync (${ev.payload.value.reason}): reloading the snapshot`);
            this.needSnapshot = true;
            return;
          default:
            if (!proven) {
              proven = true;
              this.answeredFailures = 0;
            }
        }
        this.applyAll([ev]);
        if (ev.payload.case === "caughtUp") void this.refreshOnline();
      }
      throw new StreamEnded("the server ended the stream");
    } catch (err) {
      if (this.abort.signal.aborted || isVerdict(err)) throw err;
      if (silent && received === 0) {
        this.startPolling("the stream opened but delivered nothing");
        return;
      }
      const answered = silent || err instanceof StreamEnded || !isNetworkError(err);
      if (answered && !proven && ++this.answeredFailures >= FAILURES_BEFORE_POLLING) {
        this.startPolling(`streaming failed ${this.answeredFailures} times in a row`);
        return;
      }
      if (silent) throw new ConnectError("the stream stalled", Code.Unavailable);
      throw err instanceof StreamEnded ? new ConnectError(err.message, Code.Unavailable) : err;
    } finally {
      clearTimeout(watchdog);
      this.abort.signal.removeEventListener("abort", onStop);
      ctl.abort();
    }
  }

  private startPolling(reason: string): void {
    console.info(`orgpulse: switching to polling: ${reason}`);
    this.mode = "poll";
    this.pollUntil = Date.now() + this.config.streamRetryMs;
  }

  private async poll(connected: () => void): Promise<void> {
    // the first Poll answers at once, so the badge says "polling" only once the server answered
    for (let waitMs = 0; this.config.forcePoll || Date.now() < this.pollUntil; waitMs = POLL_WAIT_MS) {
      const ctl = new AbortController();
      const onStop = () => ctl.abort();
      this.abort.signal.addEventListener("abort", onStop);
      const retry = this.config.forcePoll ? 0 : window.setTimeout(() => ctl.abort(), this.pollUntil - Date.now());
      try {
        const t0 = Date.now();
        const res = await this.api.events.poll(
          { orgId: this.orgId, afterCursor: this.cursor, maxEvents: 500, waitMs },
          { signal: ctl.signal, timeoutMs: waitMs + RPC_TIMEOUT_MS },
        );
        connected();
        this.hooks.status("polling");
        if (res.resync) {
          console.info("orgpulse: resync: reloading the snapshot");
          this.needSnapshot = true;
          return;
        }
        this.applyAll(res.events);
        if (res.cursor) this.cursor = res.cursor;
        // presence is not in the log: ask (our own poll just made us online, too)
        if (!waitMs || Date.now() - this.onlineAt > ONLINE_REFRESH_MS) void this.refreshOnline();
        // a server answering empty at once must not turn this into a busy loop
        if (waitMs && res.events.length === 0 && Date.now() - t0 < 1000) await sleep(1000, ctl.signal);
      } catch (err) {
        if (this.abort.signal.aborted || !isCanceled(err)) throw err;
        break; // time to try streaming again
      } finally {
        clearTimeout(retry);
        this.abort.signal.removeEventListener("abort", onStop);
      }
    }
    this.mode = "stream";
    this.answeredFailures = 0;
  }

  private async backoff(attempt: number): Promise<void> {
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** attempt);
    const until = Date.now() + base * (0.8 + 0.4 * Math.random());
    for (let left = until - Date.now(); left > 0 && !this.abort.signal.aborted; left = until - Date.now()) {
      this.hooks.status("reconnecting", `in ${Math.ceil(left / 1000)}s`);
      await sleep(Math.min(left, 1000 - (left % 1000) || 1000), this.abort.signal);
    }
    this.hooks.status("reconnecting");
  }
}

/** The server's answer about the request itself, not about the connection: never retried blindly. */
function isVerdict(err: unknown): boolean {
  const code = ConnectError.from(err).code;
  return code === Code.Unauthenticated || code === Code.PermissionDenied || code === Code.InvalidArgument;
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const t = setTimeout(done, ms);
    signal.addEventListener("abort", done, { once: true });
    function done() {
      clearTimeout(t);
      signal.removeEventListener("abort", done);
      resolve();
    }
  });
}
