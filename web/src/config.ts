// Page settings read from the query string, so tests and operators can tune timing without a
// rebuild: ?heartbeat=SECONDS (the server's heartbeat interval, default 15), ?transport=poll (never
// stream), ?streamRetry=SECONDS (how often polling tries streaming again, default 60), ?org=ID
// (the org to watch; needed for service tokens, which carry none), ?topic=NAME (show that topic
// only; the page's topic filter keeps it in the address), ?presenceTtl=SECONDS (how long the job a
// user has open stays marked as viewed by them without a refresh, default 30; 1 to 120).

export interface Config {
  /** The server's heartbeat interval; a stream silent for twice this long is considered stuck. */
  heartbeatMs: number;
  forcePoll: boolean;
  streamRetryMs: number;
  /** Org to name in requests; "" = the token's org. */
  org: string;
  /** The topic filter the page starts with; "" = every topic. */
  topic: string;
  /** The TTL of this user's "viewing" presence (the SDK refreshes it at half of that). */
  presenceTtlMs: number;
}

function seconds(params: URLSearchParams, name: string, fallback: number): number {
  const v = Number.parseFloat(params.get(name) ?? "");
  return (Number.isFinite(v) && v > 0 ? v : fallback) * 1000;
}

export function readConfig(search = location.search): Config {
  const p = new URLSearchParams(search);
  return {
    heartbeatMs: seconds(p, "heartbeat", 15),
    forcePoll: p.get("transport") === "poll",
    streamRetryMs: seconds(p, "streamRetry", 60),
    org: p.get("org") ?? "",
    topic: p.get("topic") ?? "",
    presenceTtlMs: Math.min(Math.max(seconds(p, "presenceTtl", 30), 1_000), 120_000),
  };
}

/** API.md "Audiences and topics": a topic is 1-128 characters of [A-Za-z0-9._:@/-]. */
export const validTopic = (t: string): boolean => /^[A-Za-z0-9._:@/-]{1,128}$/.test(t);
