// The SDK in a bare page, for the browser tests (tests/sdk_browser.rs, tests/sdk_audience.rs): one
// subscription to every event of the token's org (or of `topics` only), recorded in window.__seqs
// (durable seqs in arrival order) and window.__states ([state, Date.now()]). Tokens come from
// window.orgpulseMintToken, which the test driver provides (short-lived ones, to exercise expiry;
// with `groups` in their claim). With wire=1 the page records what each Subscribe and Poll asked
// for in window.__wire ([method, topics]). URL:
// ?user=&role=&groups=G1,G2&topics=T1,T2&heartbeat=S&streamRetry=S&crossTab=0&wire=1
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import type { Interceptor } from "@connectrpc/connect";
import { markingFetch, OrgpulseClient } from "@orgpulse/client";

declare global {
  interface Window {
    orgpulseMintToken(user: string, role: string, groups?: string[]): Promise<string>;
    __seqs: number[];
    __wire: [string, string[]][];
    __states: [string, number][];
    __resyncs: string[];
    __tokenCalls: number;
    __role(): string;
  }
}

const q = new URLSearchParams(location.search);
const user = q.get("user") ?? "alice";
const seconds = (name: string) => (q.has(name) ? Number(q.get(name)) * 1000 : undefined);
const list = (name: string) => (q.get(name) ?? "").split(",").filter(Boolean);
window.__seqs = [];
window.__wire = [];
/** Notes the topics each request asks for (Subscribe's one message arrives as a stream). */
const recordWire: Interceptor = (next) => (req) => {
  const note = (m: unknown) => window.__wire.push([req.method.name, [...(m as { topics: string[] }).topics]]);
  if (!req.stream) {
    note(req.message);
    return next(req);
  }
  const tapped = (async function* () {
    for await (const m of req.message) {
      note(m);
      yield m;
    }
  })();
  return next({ ...req, message: tapped });
};
window.__states = [];
window.__resyncs = [];
window.__tokenCalls = 0;
const client = new OrgpulseClient({
  baseUrl: location.origin,
  getToken: () => {
    window.__tokenCalls++;
    return window.orgpulseMintToken(user, q.get("role") ?? "member", list("groups"));
  },
  // the default transport, plus the recorder
  transport:
    q.get("wire") === "1"
      ? createGrpcWebTransport({ baseUrl: location.origin, useBinaryFormat: true, fetch: markingFetch(), interceptors: [recordWire] })
      : undefined,
  heartbeatMs: seconds("heartbeat"),
  streamRetryMs: seconds("streamRetry"),
  crossTab: q.get("crossTab") !== "0",
});
window.__role = () => client.sharing;
client.subscribe(
  { topics: list("topics") },
  {
    onEvent: (ev) => {
      if (ev.seq > 0n) window.__seqs.push(Number(ev.seq));
    },
    onState: (s) => window.__states.push([s, Date.now()]),
    onResync: (r) => window.__resyncs.push(r),
  },
);
document.body.dataset.ready = "true";
