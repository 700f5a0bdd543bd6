// The product's own login: HS256 tokens signed with the secret orgpulse-server is configured with
// (--jwt-secret-file), so the same token works for this API and for orgpulse.
import { createHmac, timingSafeEqual } from "node:crypto";
import { readFileSync } from "node:fs";

/** $ORGPULSE_JWT_SECRET, else the file $ORGPULSE_JWT_SECRET_FILE (default: secret.txt, made by
 * `npm run setup`), whitespace trimmed like orgpulse-server's --jwt-secret-file. */
const secret = (() => {
  let cached;
  return () => {
    if (cached) return cached;
    cached = process.env.ORGPULSE_JWT_SECRET?.trim();
    if (!cached) {
      const file = process.env.ORGPULSE_JWT_SECRET_FILE ?? new URL("../secret.txt", import.meta.url).pathname;
      try {
        cached = readFileSync(file, "utf8").trim();
      } catch {
        throw new Error(`no secret: run \`npm run setup\` (creates secret.txt) or set ORGPULSE_JWT_SECRET`);
      }
    }
    return cached;
  };
})();
const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
const sign = (body) => createHmac("sha256", secret()).update(body).digest("base64url");

/** A token for `user` in `org` with `roles` and `groups` (orgpulse's audiences name them), valid
 * `ttl` seconds. */
export function mint(user, org, { ttl = 600, roles = ["member"], groups = [] } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub: user, org, roles, groups, iat: now, exp: now + ttl })}`;
  return `${body}.${sign(body)}`;
}

/** The claims of a valid, unexpired token; null otherwise. */
export function verify(token) {
  const [h, p, sig] = String(token).split(".");
  if (!sig) return null;
  const want = Buffer.from(sign(`${h}.${p}`));
  const got = Buffer.from(sig);
  if (want.length !== got.length || !timingSafeEqual(want, got)) return null;
  const claims = JSON.parse(Buffer.from(p, "base64url").toString());
  return claims.exp * 1000 > Date.now() ? claims : null;
}

/** Express middleware: req.user = {sub, org, groups} from `authorization: Bearer`, else 401. */
export function requireUser(req, res, next) {
  const claims = verify((req.get("authorization") ?? "").replace(/^Bearer /, ""));
  if (!claims) return res.status(401).json({ error: "sign in" });
  req.user = claims;
  next();
}
