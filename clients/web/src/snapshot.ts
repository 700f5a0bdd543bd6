//! Snapshot, then the events after it: `load` reads the app's data together with the log position
//! it reflects (e.g. ListJobs.cursor); the subscription resumes exactly there. A failed load is
//! retried with backoff (a refused one stops: token or permission); a resync loads it again.

import { ConnectError } from "@connectrpc/connect";
import type { OrgpulseClient, SubscribeOptions, Unsubscribe } from "./client.js";
import { isVerdict, UnauthorizedError } from "./errors.js";
import type { Handlers } from "./fanout.js";
import { backoffDelay, DEFAULT_TIMING, sleep } from "./feed.js";

export interface SnapshotHandlers<S> extends Handlers {
  /** A fresh snapshot: replace what you show with it; events after its cursor follow. */
  onSnapshot(snapshot: S): void;
}

export function snapshotThenSubscribe<S extends { cursor: string }>(
  client: OrgpulseClient,
  load: (signal: AbortSignal) => Promise<S>,
  options: Omit<SubscribeOptions, "cursor">,
  handlers: SnapshotHandlers<S>,
): Unsubscribe {
  const abort = new AbortController();
  let unsubscribe: Unsubscribe = () => {};

  async function start(): Promise<void> {
    unsubscribe();
    unsubscribe = () => {};
    for (let attempt = 0; !abort.signal.aborted; attempt++) {
      try {
        const snapshot = await load(abort.signal);
        if (abort.signal.aborted) return;
        handlers.onSnapshot(snapshot);
        unsubscribe = client.subscribe(
          { ...options, cursor: snapshot.cursor },
          { ...handlers, onResync: () => void start() },
        );
        return;
      } catch (err) {
        if (abort.signal.aborted) return;
        // a refused load (an expired token was already refreshed once by the call itself) stops
        if (err instanceof UnauthorizedError || isVerdict(err)) {
          handlers.onState?.("stopped", { error: ConnectError.from(err), reason: ConnectError.from(err).rawMessage });
          return;
        }
        const delay = backoffDelay(attempt, DEFAULT_TIMING);
        handlers.onState?.("reconnecting", { retryInMs: Math.round(delay), reason: ConnectError.from(err).rawMessage });
        await sleep(delay, abort.signal);
      }
    }
  }

  void start();
  return () => {
    abort.abort();
    unsubscribe();
  };
}
