//! @orgpulse/client/react: hooks over one OrgpulseClient given by OrgpulseProvider. Every hook
//! subscribes in an effect and unsubscribes in its cleanup; the client applies subscription changes
//! after the current task, so React StrictMode's mount-unmount-mount (and many components mounting
//! at once) share one stream and never open a second one. Presence holds are released in the
//! cleanup and taken again in the next effect within the same task, which the client sees as no
//! change: StrictMode never makes an entry flicker.

import type { JsonObject } from "@bufbuild/protobuf";
import {
  createContext, createElement, useCallback, useContext, useEffect, useMemo, useRef, useState, type ReactNode,
} from "react";
import type { OrgpulseClient, SubscribeOptions } from "./client.js";
import type { ConnectionState } from "./feed.js";
import { EventKind, type BroadcastMessage, type Event, type PresenceEntry } from "./gen/orgpulse/v1/event_pb.js";
import type { Job } from "./gen/orgpulse/v1/job_pb.js";
import type { Notification } from "./gen/orgpulse/v1/notification_pb.js";
import type { LiveJobsOptions } from "./jobs.js";
import type { AudienceSpec, PresenceHold, PresenceOptions } from "./presence.js";

interface Ctx {
  client: OrgpulseClient;
  orgId: string;
}

const OrgpulseContext = createContext<Ctx | null>(null);

export interface OrgpulseProviderProps {
  /** Create it once, outside render (module scope or a lazy useState). */
  client: OrgpulseClient;
  /** The org the hooks watch unless they name one; "" = the token's org. */
  orgId?: string;
  children?: ReactNode;
}

export function OrgpulseProvider({ client, orgId = "", children }: OrgpulseProviderProps) {
  const value = useMemo(() => ({ client, orgId }), [client, orgId]);
  return createElement(OrgpulseContext.Provider, { value }, children);
}

function useCtx(): Ctx {
  const ctx = useContext(OrgpulseContext);
  if (!ctx) throw new Error("orgpulse hooks need an <OrgpulseProvider client={...}> above them");
  return ctx;
}

export const useOrgpulseClient = (): OrgpulseClient => useCtx().client;

export type EventFilter = Omit<SubscribeOptions, "cursor">;

/**
 * Calls `handler` with each matching event, exactly once, for as long as the component is mounted;
 * `filter` as for `subscribe` (kinds, entityTypes, topics, orgId).
 */
export function useOrgEvents(filter: EventFilter, handler: (ev: Event) => void, onResync?: (reason: string) => void): void {
  const { client, orgId } = useCtx();
  const latest = useRef({ handler, onResync });
  latest.current = { handler, onResync };
  const org = filter.orgId ?? orgId;
  const key = JSON.stringify([filter.kinds ?? [], filter.entityTypes ?? [], filter.topics ?? []]);
  useEffect(() => {
    const [kinds, entityTypes, topics] = JSON.parse(key) as [EventKind[], string[], string[]];
    return client.subscribe(
      { orgId: org, kinds, entityTypes, topics },
      { onEvent: (ev) => latest.current.handler(ev), onResync: (r) => latest.current.onResync?.(r) },
    );
  }, [client, org, key]);
}

/** The connection state of the org's shared stream. */
export function useConnectionState(orgId?: string): ConnectionState {
  const ctx = useCtx();
  const org = orgId ?? ctx.orgId;
  const [state, setState] = useState<ConnectionState>("connecting");
  useEffect(() => ctx.client.watchState((s) => setState(s), org), [ctx.client, org]);
  return state;
}

/**
 * The org's jobs, kept exact from a snapshot and the events after it (see liveJobs); with
 * `topics`, only the jobs of those topics (the snapshot and the stream both narrowed).
 */
export function useLiveJobs(options: Omit<LiveJobsOptions, "orgId"> & { orgId?: string } = {}): Job[] {
  const { client, orgId } = useCtx();
  const [jobs, setJobs] = useState<Job[]>([]);
  const org = options.orgId ?? orgId;
  const key = JSON.stringify([options.statuses ?? [], options.maxJobs ?? 0, options.topics ?? []]);
  useEffect(() => {
    const [statuses, maxJobs, topics] = JSON.parse(key) as [number[], number, string[]];
    return client.liveJobs({ orgId: org, statuses, maxJobs: maxJobs || undefined, topics }, { onChange: setJobs });
  }, [client, org, key]);
  return jobs;
}

export interface NotificationsView {
  /** Newest first. */
  notifications: Notification[];
  unread: number;
  markRead(ids: string[]): Promise<void>;
}

/**
 * The user's notifications: the stream first (held back), then ListNotifications, then the held
 * ones merged by id; new ones as they come. A resync loads the list again.
 */
export function useNotifications(orgId?: string): NotificationsView {
  const ctx = useCtx();
  const org = orgId ?? ctx.orgId;
  const [view, setView] = useState({ notifications: [] as Notification[], unread: 0 });
  useEffect(() => {
    let held: Notification[] | null = [];
    let closed = false;
    const add = (n: Notification) =>
      setView((v) =>
        v.notifications.some((x) => x.id === n.id)
          ? v
          : { notifications: [n, ...v.notifications], unread: v.unread + (n.read ? 0 : 1) },
      );
    const load = async () => {
      held = [];
      const res = await ctx.client.notifications.listNotifications({ orgId: org, pageSize: 50 });
      if (closed) return;
      setView({ notifications: res.notifications, unread: res.unreadCount });
      const pending = held;
      held = null;
      pending.forEach(add);
    };
    const unsubscribe = ctx.client.subscribe(
      { orgId: org, kinds: [EventKind.NOTIFICATION] },
      {
        onEvent: (ev) => {
          if (ev.payload.case !== "notificationNew") return;
          if (held) held.push(ev.payload.value);
          else add(ev.payload.value);
        },
        onResync: () => void load().catch(() => {}),
      },
    );
    void load().catch(() => {});
    return () => {
      closed = true;
      unsubscribe();
    };
  }, [ctx.client, org]);
  const markRead = async (ids: string[]) => {
    const res = await ctx.client.notifications.markRead({ orgId: org, notificationIds: ids });
    setView((v) => ({
      notifications: v.notifications.map((n) => (ids.includes(n.id) ? { ...n, read: true } : n)),
      unread: res.unreadCount,
    }));
  };
  return { ...view, markRead };
}

/** Who is online (user ids, sorted): ListOnline whenever the stream is (re)established, then presence events. */
export function useOnline(orgId?: string): string[] {
  const ctx = useCtx();
  const org = orgId ?? ctx.orgId;
  const [online, setOnline] = useState<string[]>([]);
  useEffect(() => {
    let closed = false;
    const refresh = () =>
      ctx.client.events
        .listOnline({ orgId: org })
        .then((res) => !closed && setOnline(res.members.map((m) => m.userId).sort()))
        .catch(() => {});
    const unsubscribe = ctx.client.subscribe(
      { orgId: org, kinds: [EventKind.PRESENCE] },
      {
        onEvent: (ev) => {
          const p = ev.payload;
          if (p.case === "userOnline") setOnline((o) => (o.includes(p.value.userId) ? o : [...o, p.value.userId].sort()));
          if (p.case === "userOffline") setOnline((o) => o.filter((u) => u !== p.value.userId));
        },
        onState: (s) => (s === "live" || s === "polling") && void refresh(),
      },
    );
    return () => {
      closed = true;
      unsubscribe();
    };
  }, [ctx.client, org]);
  return online;
}

/**
 * Presence on `topic`: every entry there (this user's too), kept current, and the function that
 * sets this user's state on it (null removes it). The state is held while the component is
 * mounted (refreshed before its TTL runs out; all tabs of the user make one entry) and follows
 * the component to a new `topic`; unmounting, pagehide and `client.close()` remove it.
 */
export function usePresence(
  topic: string,
  options: PresenceOptions = {},
): [PresenceEntry[], (state: JsonObject | null) => void] {
  const { client, orgId } = useCtx();
  const org = options.orgId ?? orgId;
  const [entries, setEntries] = useState<PresenceEntry[]>([]);
  const mine = useRef<JsonObject | null>(null);
  const hold = useRef<PresenceHold | null>(null);
  const key = JSON.stringify([options.audience ?? {}, options.ttlMs ?? 0]);
  useEffect(() => {
    const [audience, ttlMs] = JSON.parse(key) as [AudienceSpec, number];
    const h = client.holdPresence(topic, { orgId: org, audience, ttlMs: ttlMs || undefined });
    hold.current = h;
    if (mine.current) h.set(mine.current);
    const stop = client.watchPresence(topic, { onChange: setEntries }, { orgId: org });
    return () => {
      stop();
      h.release();
      if (hold.current === h) hold.current = null;
      setEntries([]);
    };
  }, [client, org, topic, key]);
  const setMyState = useCallback((state: JsonObject | null) => {
    hold.current?.set(state);
    mine.current = state;
  }, []);
  return [entries, setMyState];
}

/**
 * Calls `handler` with each broadcast on `topic` while the component is mounted (this user's own
 * included: compare `msg.userId`); returns `send`, which broadcasts to that topic's current
 * subscribers (rejects with RESOURCE_EXHAUSTED beyond 20 per second).
 */
export function useBroadcast(
  topic: string,
  handler: (msg: BroadcastMessage) => void,
  options: { orgId?: string; audience?: AudienceSpec } = {},
): (data: JsonObject) => Promise<void> {
  const { client, orgId } = useCtx();
  const org = options.orgId ?? orgId;
  const latest = useRef(handler);
  latest.current = handler;
  useEffect(
    () =>
      client.subscribe(
        { orgId: org, kinds: [EventKind.BROADCAST], topics: [topic] },
        { onEvent: (ev) => ev.payload.case === "broadcast" && latest.current(ev.payload.value) },
      ),
    [client, org, topic],
  );
  const audience = JSON.stringify(options.audience ?? {});
  return useCallback(
    (data: JsonObject) => client.broadcast(topic, data, { orgId: org, audience: JSON.parse(audience) as AudienceSpec }),
    [client, org, topic, audience],
  );
}
