//! How the client tells the kinds of failure apart: nothing answered (retry with backoff), the
//! token expired (get a new one, retry at once), or the server's verdict on the request itself
//! (never retried blindly).

import { Code, ConnectError } from "@connectrpc/connect";

/** The fetch itself failed: nothing answered (connection refused, reset, offline). */
export class NetworkError extends Error {
  override name = "NetworkError";
}

/** Throw this from `getToken` to say there is no token to be had: the client stops. */
export class UnauthorizedError extends Error {
  override name = "UnauthorizedError";
}

/** The trailer (or header) the server sets when a token's `exp` has passed. */
export const ERROR_TRAILER = "orgpulse-error";
const TOKEN_EXPIRED = "token-expired";

/** True when the server (or something in front of it) never answered or broke off mid-way. */
export function isNetworkError(err: unknown): boolean {
  const e = ConnectError.from(err);
  return e.cause instanceof NetworkError || e.cause instanceof TypeError;
}

/** UNAUTHENTICATED because the token expired: `orgpulse-error: token-expired`, else the message. */
export function isTokenExpired(err: unknown): boolean {
  const e = ConnectError.from(err);
  if (e.code !== Code.Unauthenticated) return false;
  const marker = e.metadata.get(ERROR_TRAILER);
  return marker !== null ? marker === TOKEN_EXPIRED : /token expired/i.test(e.rawMessage);
}

/** The server's answer about the request itself, not about the connection. */
export function isVerdict(err: unknown): boolean {
  const code = ConnectError.from(err).code;
  return code === Code.Unauthenticated || code === Code.PermissionDenied || code === Code.InvalidArgument;
}

export const isCanceled = (err: unknown): boolean => ConnectError.from(err).code === Code.Canceled;

/** A `fetch` that marks "nothing answered" as a NetworkError (an abort stays an abort). */
export function markingFetch(inner: typeof fetch = globalThis.fetch.bind(globalThis)): typeof fetch {
  return (input, init) =>
    inner(input, init).catch((e: unknown) => {
      if (e instanceof Error && e.name === "AbortError") throw e;
      throw new NetworkError(e instanceof Error ? e.message : String(e));
    });
}
