// The bearer token: where it comes from (URL fragment, paste box, sessionStorage) and what its
// payload says (user, org, roles, expiry). The signature is the server's business, not ours.

const STORAGE_KEY = "orgpulse.token";

export interface Identity {
  token: string;
  user: string;
  org: string;
  roles: string[];
  /** Expiry, seconds since the epoch (0 when absent). */
  exp: number;
}

/** Roles that may create jobs (docs/api.md: member, admin, service; not viewer). */
const CREATORS = ["member", "admin", "service"];

export const canCreate = (id: Identity): boolean => id.roles.some((r) => CREATORS.includes(r));
export const canMarkRead = canCreate;

export const isExpired = (id: Identity, nowMs = Date.now()): boolean =>
  id.exp > 0 && id.exp * 1000 <= nowMs;

/** Decodes a JWT's payload; throws with a readable message when it is not a JWT. */
export function decode(token: string): Identity {
  const parts = token.trim().split(".");
  if (parts.length !== 3) throw new Error("that is not a JWT (expected three dot-separated parts)");
  let claims: Record<string, unknown>;
  try {
    const b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    const bin = atob(b64.padEnd(b64.length + ((4 - (b64.length % 4)) % 4), "="));
    claims = JSON.parse(new TextDecoder().decode(Uint8Array.from(bin, (c) => c.charCodeAt(0))));
  } catch {
    throw new Error("the token's payload is not readable JSON");
  }
  const roles = Array.isArray(claims.roles) ? claims.roles.map(String) : ["member"];
  return {
    token: token.trim(),
    user: typeof claims.sub === "string" ? claims.sub : "",
    org: typeof claims.org === "string" ? claims.org : "",
    roles,
    exp: typeof claims.exp === "number" ? claims.exp : 0,
  };
}

/**
 * The token to start with: `#token=...` wins (it is then moved to sessionStorage and removed from
 * the address bar, so it does not linger in history), else the one kept for this tab.
 */
export function initialToken(): string | null {
  const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (m) {
    const token = decodeURIComponent(m[1]);
    save(token);
    history.replaceState(null, "", location.pathname + location.search);
    return token;
  }
  return sessionStorage.getItem(STORAGE_KEY);
}

export const save = (token: string): void => sessionStorage.setItem(STORAGE_KEY, token.trim());
export const forget = (): void => sessionStorage.removeItem(STORAGE_KEY);
