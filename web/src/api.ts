// grpc-web clients for the three orgpulse services, on the page's own origin. Every call carries
// the current bearer token; a request that never reached the server (connection refused, reset)
// is marked as a NetworkError so the sync loop can tell "server down" from "server said no".

import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { EventService } from "./gen/orgpulse/v1/event_pb";
import { JobService } from "./gen/orgpulse/v1/job_pb";
import { NotificationService } from "./gen/orgpulse/v1/notification_pb";

/** The fetch itself failed: nothing answered. */
export class NetworkError extends Error {
  override name = "NetworkError";
}

export interface Api {
  jobs: Client<typeof JobService>;
  notifications: Client<typeof NotificationService>;
  events: Client<typeof EventService>;
}

export function createApi(token: () => string): Api {
  const auth: Interceptor = (next) => (req) => {
    req.header.set("authorization", `Bearer ${token()}`);
    return next(req);
  };
  const transport = createGrpcWebTransport({
    baseUrl: location.origin,
    useBinaryFormat: true,
    interceptors: [auth],
    fetch: (input, init) =>
      globalThis.fetch(input, init).catch((e: unknown) => {
        if (e instanceof Error && e.name === "AbortError") throw e;
        throw new NetworkError(e instanceof Error ? e.message : String(e));
      }),
  });
  return {
    jobs: createClient(JobService, transport),
    notifications: createClient(NotificationService, transport),
    events: createClient(EventService, transport),
  };
}

/**
 * True when the server (or something in front of it) never answered: the request failed to
 * connect, or the response body broke off mid-way.
 */
export function isNetworkError(err: unknown): boolean {
  const e = ConnectError.from(err);
  return e.cause instanceof NetworkError || e.cause instanceof TypeError;
}

export const isCanceled = (err: unknown): boolean => ConnectError.from(err).code === Code.Canceled;

export { Code, ConnectError };
