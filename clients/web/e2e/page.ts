// The SDK in a bare page, for the browser tests (tests/sdk_browser.rs): one subscription to every
// event of the token's org, recorded in window.__seqs (durable seqs in arrival order) and
// window.__states ([state, Date.now()]). Tokens come from window.orgpulseMintToken, which the test
// driver provides (short-lived ones, to exercise expiry). URL: ?user=&role=&heartbeat=S&streamRetry=S&crossTab=0
import { OrgpulseClient } from "@orgpulse/client";

declare global {
  interface Window {
    orgpulseMintToken(user: string, role: string): Promise<string>;
    __seqs: number[];
    __states: [string, number][];
    __resyncs: string[];
    __tokenCalls: number;
    __role(): string;
  }
}

const q = new URLSearchParams(location.search);
const user = q.get("user") ?? "alice";
const seconds = (name: string) => (q.has(name) ? Number(q.get(name)) * 1000 : undefined);
window.__seqs = [];
window.__states = [];
window.__resyncs = [];
window.__tokenCalls = 0;
const client = new OrgpulseClient({
  baseUrl: location.origin,
  getToken: () => {
    window.__tokenCalls++;
    return window.orgpulseMintToken(user, q.get("role") ?? "member");
  },
  heartbeatMs: seconds("heartbeat"),
  streamRetryMs: seconds("streamRetry"),
  crossTab: q.get("crossTab") !== "0",
});
window.__role = () => client.sharing;
client.subscribe(
  {},
  {
    onEvent: (ev) => {
      if (ev.seq > 0n) window.__seqs.push(Number(ev.seq));
    },
    onState: (s) => window.__states.push([s, Date.now()]),
    onResync: (r) => window.__resyncs.push(r),
  },
);
document.body.dataset.ready = "true";
