//! One org's connection to the server, whoever listens: one Subscribe stream from the last cursor,
//! reconnected with full-jitter backoff after a drop; a new token and an immediate retry when the
//! token expired; a Poll long-poll loop from the same cursor when streaming does not get through
//! (several answered failures in a row, or a stream that opens but delivers nothing for twice the
//! heartbeat interval), trying streaming again every `streamRetryMs`. A server that does not answer
//! at all is "reconnecting", never "polling". What arrives goes to a FeedSink, unfiltered and
//! undeduplicated: the listeners' side (Fanout) does that.

import { Code, ConnectError, type Client } from "@connectrpc/connect";
import { isCanceled, isNetworkError, isTokenExpired, isVerdict, UnauthorizedError } from "./errors.js";
import type { Event, EventKind, EventService } from "./gen/orgpulse/v1/event_pb.js";
import type { Tokens } from "./tokens.js";

export type ConnectionState = "connecting" | "live" | "reconnecting" | "polling" | "stopped";

export interface StateInfo {
  /** reconnecting: the delay before the next attempt. */
  retryInMs?: number;
  /** stopped: why (token refused, no permission, ...); the app must act. */
  error?: ConnectError;
  /** A human-readable reason for the change, when there is one. */
  reason?: string;
}

/** What goes on the wire: one org, the union of the listeners' kinds, entity types and topics. */
export interface WireFilter {
  orgId: string;
  /** Empty = all kinds. */
  kinds: EventKind[];
  /** Empty = all entity types. */
  entityTypes: string[];
  /** Empty = all topics. */
  topics: string[];
}

export interface FeedSink {
  /** A durable (seq > 0) or presence event, in the order the server sent it. */
  event(ev: Event): void;
  /** The position to resume from moved (after events, heartbeats, caught_up, polls). */
  cursor(cursor: string): void;
  /** The cursor could not be served: everything before "now" is unknown; reload the snapshot. */
  resync(reason: string): void;
  state(state: ConnectionState, info: StateInfo): void;
  /** A stream with this filter reached caught_up; null: that stream ended. */
  live(filter: WireFilter | null): void;
}

export interface Timing {
  /** The server's heartbeat interval; a stream silent for twice this long is considered stuck. */
  heartbeatMs: number;
  /** While polling, how often to try streaming again. */
  streamRetryMs: number;
  backoffMinMs: number;
  backoffMaxMs: number;
  /** Answered stream failures in a row (with no data) before falling back to polling. */
  failuresBeforePolling: number;
  pollWaitMs: number;
  rpcTimeoutMs: number;
  /** Never stream (e.g. a network known to buffer responses). */
  forcePoll: boolean;
  random: () => number;
}

/**
 * Where a fallback to polling is remembered (phoenix.js does the same), so a reload behind the same
 * buffering proxy polls at once instead of waiting out a silent stream again.
 */
export interface FallbackMemory {
  /** Until when (epoch ms) to poll before trying streams; 0 = not remembered. */
  pollingUntil(): number;
  remember(untilMs: number): void;
}

export const DEFAULT_TIMING: Timing = {
  heartbeatMs: 15_000,
  streamRetryMs: 60_000,
  backoffMinMs: 250,
  backoffMaxMs: 10_000,
  failuresBeforePolling: 3,
  pollWaitMs: 20_000,
  rpcTimeoutMs: 10_000,
  forcePoll: false,
  random: Math.random,
};

/** Full jitter above a floor (as centrifuge-js): min + rand(0, min(max, min * 2^attempt)), capped. */
export function backoffDelay(attempt: number, t: Pick<Timing, "backoffMinMs" | "backoffMaxMs" | "random">): number {
  const span = Math.min(t.backoffMaxMs, t.backoffMinMs * 2 ** Math.min(attempt, 31));
  return Math.min(t.backoffMaxMs, t.backoffMinMs + t.random() * span);
}

/** Events that are not in the log and carry no position to resume from. */
const EPHEMERAL = new Set<Event["payload"]["case"]>(["userOnline", "userOffline", "presenceState", "broadcast"]);

/** The stream stopped without an RPC error (server closed it, or it stalled after data). */
class StreamEnded extends Error {}

const bearer = (token: string) => ({ authorization: `Bearer ${token}` });

export class Feed {
  private mode: "stream" | "poll";
  private answeredFailures = 0;
  private pollUntil = 0;
  /** Bumped by stop(); a loop whose generation is stale exits. */
  private generation = 0;
  private attemptAbort = new AbortController();
  private everLive = false;
  private wake: () => void = () => {};
  private suspended: { promise: Promise<void>; resume: () => void } | null = null;
  private last: ConnectionState | null = null;
  private pollReason = "polling forced";

  constructor(
    private readonly events: Client<typeof EventService>,
    private readonly tokens: Tokens,
    private filter: WireFilter,
    private position: string,
    private readonly timing: Timing,
    private readonly sink: FeedSink,
    private readonly memory: FallbackMemory | null = null,
  ) {
    this.mode = timing.forcePoll ? "poll" : "stream";
    const remembered = memory?.pollingUntil() ?? 0;
    if (!timing.forcePoll && remembered > Date.now()) {
      this.mode = "poll";
      this.pollUntil = remembered;
      this.pollReason = "remembered: streaming did not get through here recently";
    }
  }

  get cursor(): string {
    return this.position;
  }

  get transport(): "stream" | "poll" {
    return this.mode;
  }

  /** Runs until stop() or a verdict (the state is then "stopped"); start() again resumes from the cursor. */
  start(): void {
    const gen = ++this.generation;
    this.attemptAbort.abort();
    void this.run(gen);
  }

  stop(): void {
    this.generation++;
    this.attemptAbort.abort();
    this.wake();
    this.suspended?.resume();
    this.suspended = null;
    this.emit("stopped", {});
  }

  /** A new wire filter: the connection reopens at once from the cursor (if it changed). */
  setFilter(filter: WireFilter): void {
    if (sameFilter(filter, this.filter)) return;
    this.filter = filter;
    this.reconnectNow();
  }

  /** Drops the current attempt (or the wait before the next) and connects again at once. */
  reconnectNow(): void {
    this.attemptAbort.abort();
    this.wake();
  }

  /** Offline, or the page is going into the back/forward cache: disconnect until resume(). */
  suspend(reason: string): void {
    if (this.suspended || this.last === "stopped") return;
    let resume = () => {};
    const promise = new Promise<void>((r) => (resume = r));
    this.suspended = { promise, resume };
    this.attemptAbort.abort();
    this.wake();
    this.emit("reconnecting", { reason });
  }

  resume(): void {
    const s = this.suspended;
    this.suspended = null;
    s?.resume();
    this.wake();
  }

  private emit(state: ConnectionState, info: StateInfo): void {
    if (state === this.last && state !== "reconnecting") return;
    this.last = state;
    this.sink.state(state, info);
  }

  private moveTo(cursor: string): void {
    if (!cursor || cursor === this.position) return;
    this.position = cursor;
    this.sink.cursor(cursor);
  }

  private async run(gen: number): Promise<void> {
    let attempt = 0;
    this.emit(this.everLive ? "reconnecting" : "connecting", {});
    while (gen === this.generation) {
      if (this.suspended) {
        await this.suspended.promise;
        continue;
      }
      const ctl = (this.attemptAbort = new AbortController());
      let token = "";
      try {
        token = await this.tokens.get();
        if (this.mode === "stream") await this.stream(token, ctl.signal, () => (attempt = 0));
        else await this.poll(token, ctl.signal, () => (attempt = 0));
      } catch (err) {
        if (gen !== this.generation) return;
        if (ctl.signal.aborted) continue; // reconnectNow / suspend: no backoff
        if (isTokenExpired(err) && token) {
          const fresh = await this.tokens.refresh(token).catch((e: unknown) => e);
          if (typeof fresh === "string" && fresh !== token) continue; // retry at once with it
          if (!(fresh instanceof UnauthorizedError || typeof fresh === "string")) {
            await this.backoff(attempt++, ctl.signal); // getToken failed: try again later
            continue;
          }
          this.fail(new ConnectError("the token expired and getToken has no newer one", Code.Unauthenticated));
          return;
        }
        if (err instanceof UnauthorizedError) {
          this.fail(new ConnectError(err.message, Code.Unauthenticated));
          return;
        }
        const e = ConnectError.from(err);
        if (e.code === Code.InvalidArgument && this.position) {
          // a cursor this server rejects: everything before now is unknown
          this.position = "";
          this.sink.cursor("");
          this.sink.resync(`the server rejected the cursor: ${e.rawMessage}`);
          continue;
        }
        if (isVerdict(e)) {
          this.fail(e);
          return;
        }
        await this.backoff(attempt++, ctl.signal);
      }
    }
  }

  private fail(error: ConnectError): void {
    this.generation++;
    this.emit("stopped", { error, reason: error.rawMessage });
  }

  private async stream(token: string, attempt: AbortSignal, connected: () => void): Promise<void> {
    const ctl = new AbortController();
    const onAbort = () => ctl.abort();
    attempt.addEventListener("abort", onAbort);
    let received = 0;
    let proven = false;
    let silent = false;
    let watchdog: ReturnType<typeof setTimeout> | undefined;
    const arm = () => {
      clearTimeout(watchdog);
      watchdog = setTimeout(() => {
        silent = true;
        ctl.abort();
      }, 2 * this.timing.heartbeatMs);
    };
    arm();
    const filter = this.filter;
    let caughtUp = false;
    try {
      const events = this.events.subscribe(
        { ...filter, afterCursor: this.position },
        { signal: ctl.signal, headers: bearer(token) },
      );
      for await (const ev of events) {
        received++;
        arm();
        switch (ev.payload.case) {
          case "caughtUp":
            connected();
            if (this.memory?.pollingUntil()) this.memory.remember(0);
            this.everLive = true;
            this.emit("live", {});
            caughtUp = true;
            this.sink.live(filter);
            break;
          case "resync":
            this.sink.resync(ev.payload.value.reason);
            break;
          case "heartbeat":
            break;
          default:
            if (!proven) {
              proven = true;
              this.answeredFailures = 0;
            }
            this.sink.event(ev);
        }
        if (!EPHEMERAL.has(ev.payload.case)) this.moveTo(ev.cursor);
      }
      throw new StreamEnded("the server ended the stream");
    } catch (err) {
      if (attempt.aborted || isVerdict(err)) throw err;
      if (silent && received === 0) {
        this.startPolling("the stream opened but delivered nothing");
        return;
      }
      const answered = silent || err instanceof StreamEnded || !isNetworkError(err);
      if (answered && !proven && ++this.answeredFailures >= this.timing.failuresBeforePolling) {
        this.startPolling(`streaming failed ${this.answeredFailures} times in a row`);
        return;
      }
      if (silent) throw new ConnectError("the stream stalled", Code.Unavailable);
      throw err instanceof StreamEnded ? new ConnectError(err.message, Code.Unavailable) : err;
    } finally {
      if (caughtUp) this.sink.live(null);
      clearTimeout(watchdog);
      attempt.removeEventListener("abort", onAbort);
      ctl.abort();
    }
  }

  private startPolling(reason: string): void {
    this.mode = "poll";
    this.pollUntil = Date.now() + this.timing.streamRetryMs;
    this.pollReason = `switching to polling: ${reason}`;
    this.memory?.remember(this.pollUntil);
  }

  private async poll(token: string, attempt: AbortSignal, connected: () => void): Promise<void> {
    const { forcePoll, pollWaitMs, rpcTimeoutMs } = this.timing;
    // the first Poll answers at once, so the state says "polling" only once the server answered
    for (let waitMs = 0; forcePoll || Date.now() < this.pollUntil; waitMs = pollWaitMs) {
      const ctl = new AbortController();
      const onAbort = () => ctl.abort();
      attempt.addEventListener("abort", onAbort);
      const retry = forcePoll ? undefined : setTimeout(() => ctl.abort(), this.pollUntil - Date.now());
      try {
        const t0 = Date.now();
        const res = await this.events.poll(
          { ...this.filter, afterCursor: this.position, maxEvents: 500, waitMs },
          { signal: ctl.signal, timeoutMs: waitMs + rpcTimeoutMs, headers: bearer(token) },
        );
        connected();
        this.everLive = true;
        this.emit("polling", { reason: this.pollReason });
        if (res.resync) this.sink.resync("the cursor could not be served");
        for (const ev of res.events) this.sink.event(ev);
        this.moveTo(res.cursor);
        // a server answering empty at once must not turn this into a busy loop
        if (waitMs && res.events.length === 0 && Date.now() - t0 < 1000) await sleep(1000, ctl.signal);
        // a token about to expire is replaced before the next long wait
        if ((await this.tokens.get()) !== token) return;
      } catch (err) {
        if (attempt.aborted || !isCanceled(err)) throw err;
        break; // time to try streaming again
      } finally {
        clearTimeout(retry);
        attempt.removeEventListener("abort", onAbort);
      }
    }
    if (!forcePoll) {
      this.mode = "stream";
      this.answeredFailures = 0;
    }
  }

  private async backoff(attempt: number, signal: AbortSignal): Promise<void> {
    const delay = backoffDelay(attempt, this.timing);
    this.emit("reconnecting", { retryInMs: Math.round(delay) });
    await new Promise<void>((resolve) => {
      const t = setTimeout(done, delay);
      this.wake = done;
      signal.addEventListener("abort", done, { once: true });
      function done() {
        clearTimeout(t);
        signal.removeEventListener("abort", done);
        resolve();
      }
    });
    this.wake = () => {};
  }
}

export function sameFilter(a: WireFilter, b: WireFilter): boolean {
  const eq = <T>(x: T[], y: T[]) => x.length === y.length && x.every((v, i) => v === y[i]);
  return a.orgId === b.orgId && eq(a.kinds, b.kinds) && eq(a.entityTypes, b.entityTypes) && eq(a.topics, b.topics);
}

export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const t = setTimeout(done, ms);
    signal?.addEventListener("abort", done, { once: true });
    function done() {
      clearTimeout(t);
      signal?.removeEventListener("abort", done);
      resolve();
    }
  });
}
