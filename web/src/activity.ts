// Who is doing what on the jobs (issue 19), through the SDK's presence and broadcast: the job the
// user opens is held as presence {"viewing": true} on topic job:<id> (the SDK refreshes it, makes
// the user's tabs one entry and removes it on close or pagehide); every job's viewers come from
// one watchPresence of all topics. In the open job's note box, typing is broadcast on job:<id>
// (at most once a second while typing, {"typing": false} when it stops) and shows to the others
// until they hear it stopped or nothing for TYPING_SHOWN_MS; a note is a broadcast too, shown to
// whoever has the job open at that moment and stored nowhere. The watch of all topics makes the
// page's one stream carry every topic even under a topic filter (the jobs shown stay narrowed).

import { EventKind, type OrgpulseClient, type PresenceEntry, type Unsubscribe } from "@orgpulse/client";

/** How long another user shows as typing after their last word. */
export const TYPING_SHOWN_MS = 3_000;
/** While typing, a broadcast at most this often (the server allows 20 a second). */
const TYPING_EVERY_MS = 1_000;

export const jobTopic = (jobId: string): string => `job:${jobId}`;

export interface Note {
  user: string;
  text: string;
  at: number;
}

export class JobActivity {
  /** job id -> the users viewing it (sorted). */
  viewers = new Map<string, string[]>();
  /** The job this page has open, or null. */
  open: string | null = null;
  /** Who is typing in the open job's note box (not this user). */
  typing = new Map<string, ReturnType<typeof setTimeout>>();
  /** Notes sent to the open job while this page had it open, oldest first. */
  notes: Note[] = [];
  private stopWatch: Unsubscribe = () => {};
  private stopBroadcasts: Unsubscribe = () => {};
  private typedAt = 0;

  constructor(
    private readonly client: OrgpulseClient,
    private readonly org: string,
    /** The presence TTL (the SDK refreshes the entry at half of it). */
    private readonly ttlMs: number,
    private readonly changed: () => void,
    /** A broadcast the server refused (e.g. over the rate limit). */
    private readonly failed: (err: unknown) => void,
  ) {}

  start(): void {
    this.stopWatch = this.client.watchPresence("", { onChange: (entries) => this.setViewers(entries) }, { orgId: this.org });
  }

  stop(): void {
    this.select(null);
    this.stopWatch();
  }

  private setViewers(entries: PresenceEntry[]): void {
    const viewers = new Map<string, string[]>();
    for (const e of entries) {
      if (!e.topic.startsWith("job:") || e.state?.viewing !== true) continue;
      const id = e.topic.slice(4);
      viewers.set(id, [...(viewers.get(id) ?? []), e.userId].sort());
    }
    this.viewers = viewers;
    this.changed();
  }

  /** Opens `jobId` (null: none): this user views it, and hears its typing and notes. */
  select(jobId: string | null): void {
    if (jobId === this.open) return;
    if (this.open) {
      this.stopTyping();
      this.client.setPresence(jobTopic(this.open), null, { orgId: this.org });
    }
    this.stopBroadcasts();
    this.stopBroadcasts = () => {};
    this.typing.forEach((t) => clearTimeout(t));
    this.typing.clear();
    this.notes = [];
    this.open = jobId;
    if (jobId) {
      const topic = jobTopic(jobId);
      this.client.setPresence(topic, { viewing: true }, { orgId: this.org, ttlMs: this.ttlMs });
      this.stopBroadcasts = this.client.subscribe(
        { orgId: this.org, kinds: [EventKind.BROADCAST], topics: [topic] },
        {
          onEvent: (ev) => {
            if (ev.payload.case !== "broadcast") return;
            const { userId, data } = ev.payload.value;
            if (typeof data?.note === "string") {
              this.notes.push({ user: userId, text: data.note, at: Date.now() });
              this.heard(userId, false);
            } else this.heard(userId, data?.typing === true);
          },
        },
      );
    }
    this.changed();
  }

  /** Another user (or this one in another tab) is typing or stopped. */
  private heard(user: string, typing: boolean): void {
    clearTimeout(this.typing.get(user));
    this.typing.delete(user);
    if (typing) this.typing.set(user, setTimeout(() => this.heard(user, false), TYPING_SHOWN_MS));
    this.changed();
  }

  /** The note box's text changed: typing (at most once a second), or stopped when it is empty. */
  typed(text: string): void {
    if (!this.open) return;
    if (!text) return this.stopTyping();
    const now = Date.now();
    if (now - this.typedAt < TYPING_EVERY_MS) return;
    this.typedAt = now;
    this.send({ typing: true });
  }

  stopTyping(): void {
    if (!this.open || !this.typedAt) return;
    this.typedAt = 0;
    this.send({ typing: false });
  }

  /** Sends a note to whoever has the job open now. */
  note(text: string): void {
    if (!this.open || !text) return;
    this.typedAt = 0;
    this.send({ note: text });
  }

  private send(data: { typing: boolean } | { note: string }): void {
    if (this.open) this.client.broadcast(jobTopic(this.open), data, { orgId: this.org }).catch(this.failed);
  }
}
