//! One stream for all tabs of one user: the tab holding a Web Lock is the leader and runs the
//! streams; the others send it their filters and receive every wire message through a
//! BroadcastChannel. When the leader goes (tab closed, page frozen in the back/forward cache), the
//! lock passes to another tab, which resumes from the last cursor it was sent: the per-listener
//! seq dedupe makes the replay invisible. Presence states travel the same way: each follower
//! tells the leader what it holds, and the leader keeps the user's one entry per topic.

import type { ConnectionState, StateInfo, WireFilter } from "./feed.js";
import type { FilterSpec } from "./fanout.js";
import type { Held } from "./presence.js";

/** Messages between the tabs of one key; `org` is the org id ("" = the token's org). */
export type TabMessage =
  | { t: "hello"; tab: string }
  | { t: "leader"; tab: string }
  | { t: "filters"; tab: string; orgs: Record<string, FilterSpec[]> }
  | { t: "bye"; tab: string }
  | { t: "event"; org: string; ev: Uint8Array }
  | { t: "cursor"; org: string; cursor: string }
  | { t: "resync"; org: string; reason: string }
  | { t: "state"; org: string; state: ConnectionState; info: WireStateInfo }
  | { t: "live"; org: string; filter: WireFilter | null }
  /** A follower's presence state on a topic, to the leader (null: it holds none). */
  | { t: "presence"; tab: string; org: string; topic: string; held: Held | null };

/** StateInfo as it crosses tabs (an error travels as code and message). */
export type WireStateInfo = Omit<StateInfo, "error"> & { error?: { code: number; message: string } };

export interface TabsEvents {
  /** This tab got the lock: start the streams. */
  lead(): void;
  /** This tab gave the lock up (it stays a follower until it gets it again). */
  follow(): void;
  message(msg: TabMessage): void;
}

/** Browsers only: Node may have BroadcastChannel (between its threads) but has no tabs. */
export function crossTabAvailable(): boolean {
  return (
    typeof window !== "undefined" &&
    typeof BroadcastChannel === "function" &&
    typeof navigator !== "undefined" &&
    typeof navigator.locks?.request === "function"
  );
}

export class Tabs {
  readonly id = Math.random().toString(36).slice(2) + Date.now().toString(36);
  private readonly channel: BroadcastChannel;
  private release: (() => void) | null = null;
  private lockAbort: AbortController | null = null;
  leader = false;

  constructor(
    private readonly name: string,
    private readonly on: TabsEvents,
  ) {
    this.channel = new BroadcastChannel(name);
    this.channel.onmessage = (e: MessageEvent<TabMessage>) => this.on.message(e.data);
  }

  /** Asks for the lock (granted when no other tab holds it) and says hello to a leader. */
  join(): void {
    this.post({ t: "hello", tab: this.id });
    if (this.lockAbort) return;
    const abort = (this.lockAbort = new AbortController());
    navigator.locks
      .request(this.name, { signal: abort.signal }, () => {
        this.leader = true;
        this.on.lead();
        return new Promise<void>((resolve) => (this.release = resolve));
      })
      .catch(() => {}); // aborted before it was granted
  }

  /** Gives the lock up (pagehide, close) and tells the leader this tab's filters are gone. */
  leave(): void {
    this.post({ t: "bye", tab: this.id });
    this.lockAbort?.abort();
    this.lockAbort = null;
    const release = this.release;
    this.release = null;
    if (this.leader) {
      this.leader = false;
      this.on.follow();
    }
    release?.();
  }

  post(msg: TabMessage): void {
    this.channel.postMessage(msg);
  }

  close(): void {
    this.leave();
    this.channel.close();
  }
}
