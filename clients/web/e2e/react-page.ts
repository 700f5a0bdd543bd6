// @orgpulse/client/react under React.StrictMode (a development build, so effects really run
// twice) for tests/sdk_browser.rs: useOrgEvents records seqs in window.__seqs, useLiveJobs renders
// [data-testid=job-row] rows, useConnectionState the [data-testid=state] badge, useNotifications
// [data-testid=notification] and the unread count, useOnline [data-testid=online]; window.__mounts
// counts effect runs (2 per component under StrictMode). usePresence("job:react") holds
// {"viewing": true} and renders [data-testid=presence] per entry (until [data-testid=leave] unmounts
// it); useBroadcast on the same topic records what it hears in window.__broadcasts, and
// [data-testid=wave] sends {"wave": true}.
import { OrgpulseClient } from "@orgpulse/client";
import {
  OrgpulseProvider, useBroadcast, useConnectionState, useLiveJobs, useNotifications, useOnline, useOrgEvents, usePresence,
} from "@orgpulse/client/react";
import type { JsonObject } from "@bufbuild/protobuf";
import { createElement as h, StrictMode, useEffect, useState } from "react";
import { createRoot } from "react-dom/client";

declare global {
  interface Window {
    orgpulseMintToken(user: string, role: string): Promise<string>;
    __seqs: number[];
    __mounts: number;
    __broadcasts: [string, JsonObject | undefined][];
  }
}

const q = new URLSearchParams(location.search);
window.__seqs = [];
window.__mounts = 0;
window.__broadcasts = [];
const client = new OrgpulseClient({
  baseUrl: location.origin,
  getToken: () => window.orgpulseMintToken(q.get("user") ?? "alice", "member"),
  crossTab: false,
});

function Events() {
  useEffect(() => void window.__mounts++, []);
  useOrgEvents({}, (ev) => {
    if (ev.seq > 0n) window.__seqs.push(Number(ev.seq));
  });
  return null;
}

function Jobs() {
  const jobs = useLiveJobs();
  const state = useConnectionState();
  return h(
    "div",
    null,
    h("span", { "data-testid": "state" }, state),
    h("ul", null, ...jobs.map((j) => h("li", { key: j.id, "data-testid": "job-row", "data-job-id": j.id }, j.title))),
  );
}

function Side() {
  const { notifications, unread } = useNotifications();
  const online = useOnline();
  return h(
    "div",
    null,
    h("span", { "data-testid": "unread" }, String(unread)),
    ...notifications.map((n) => h("p", { key: n.id, "data-testid": "notification", "data-notification-id": n.id }, n.title)),
    ...online.map((u) => h("p", { key: u, "data-testid": "online", "data-user-id": u }, u)),
  );
}

function Viewing() {
  const [entries, setMyState] = usePresence("job:react");
  useEffect(() => setMyState({ viewing: true }), [setMyState]);
  const send = useBroadcast("job:react", (msg) => window.__broadcasts.push([msg.userId, msg.data]));
  return h(
    "div",
    null,
    ...entries.map((e) => h("p", { key: e.userId, "data-testid": "presence", "data-user-id": e.userId }, e.userId)),
    h("button", { "data-testid": "wave", onClick: () => void send({ wave: true }) }, "wave"),
  );
}

function Activity() {
  const [shown, setShown] = useState(true);
  return h("div", null, shown && h(Viewing), h("button", { "data-testid": "leave", onClick: () => setShown(false) }, "leave"));
}

createRoot(document.getElementById("root")!).render(
  h(StrictMode, null, h(OrgpulseProvider, { client }, h(Events), h(Jobs), h(Side), h(Activity))),
);
