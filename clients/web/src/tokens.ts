//! The bearer token: asked of the app's `getToken` only when there is none or it has expired, with
//! at most one `getToken` call in flight however many calls and streams need a token at once.

import { UnauthorizedError } from "./errors.js";

export type GetToken = () => string | Promise<string>;

/** Seconds before `exp` at which a token counts as expired already (clock skew, time in flight). */
const EXPIRY_MARGIN_S = 1;

/** A JWT's claims, or {} when the token is not a JWT (it is then never considered expired). */
export function claimsOf(token: string): { sub?: string; org?: string; exp?: number } {
  const part = token.split(".")[1];
  if (!part) return {};
  try {
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const bin = atob(b64.padEnd(b64.length + ((4 - (b64.length % 4)) % 4), "="));
    const claims: unknown = JSON.parse(new TextDecoder().decode(Uint8Array.from(bin, (c) => c.charCodeAt(0))));
    return typeof claims === "object" && claims !== null ? claims : {};
  } catch {
    return {};
  }
}

export class Tokens {
  private current: string | null = null;
  private inflight: Promise<string> | null = null;
  /** How many times `getToken` has been called (for tests and diagnostics). */
  fetches = 0;

  constructor(
    private readonly getToken: GetToken,
    private readonly now: () => number = Date.now,
  ) {}

  /** The token to send now: the cached one unless it is missing or expired. */
  get(): Promise<string> {
    if (this.current !== null && !this.expired(this.current)) return Promise.resolve(this.current);
    return this.fetch();
  }

  /**
   * `stale` was refused as expired: a new token, fetched once however many callers report the same
   * stale token. Resolves to `stale` itself when `getToken` has nothing newer (the caller stops).
   */
  refresh(stale: string): Promise<string> {
    if (this.inflight) return this.inflight;
    if (this.current !== null && this.current !== stale) return Promise.resolve(this.current);
    return this.fetch();
  }

  /** The token in hand, without asking `getToken`: null before the first fetch or after `reset`. */
  cached(): string | null {
    return this.current;
  }

  /** Drops the cached token: the next call asks `getToken` (e.g. after the user signed in again). */
  reset(): void {
    this.current = null;
  }

  private expired(token: string): boolean {
    const { exp } = claimsOf(token);
    return typeof exp === "number" && (exp - EXPIRY_MARGIN_S) * 1000 <= this.now();
  }

  private fetch(): Promise<string> {
    if (this.inflight) return this.inflight;
    this.fetches++;
    const p = Promise.resolve()
      .then(this.getToken)
      .then((token) => {
        if (typeof token !== "string" || token === "") throw new UnauthorizedError("getToken returned no token");
        this.current = token;
        return token;
      })
      .finally(() => {
        if (this.inflight === p) this.inflight = null;
      });
    this.inflight = p;
    return p;
  }
}
