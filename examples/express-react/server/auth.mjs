// The product's own login: HS256 tokens signed with the secret orgpulse-server is configured with
// (--jwt-secret-file), so the same token works for this API and for orgpulse.
import { createHmac, timingSafeEqual } from "node:crypto";

const secret = () => {
  const s = process.env.ORGPULSE_JWT_SECRET;
  if (!s) throw new Error("set ORGPULSE_JWT_SECRET to the secret orgpulse-server uses");
  return s;
};
const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
const sign = (body) => createHmac("sha256", secret()).update(body).digest("base64url");

/** A token for `user` in `org`, valid `ttl` seconds. */
export function mint(user, org, ttl = 600) {
  const now = Math.floor(Date.now() / 1000);
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub: user, org, roles: ["member"], iat: now, exp: now + ttl })}`;
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

/** Express middleware: req.user = {sub, org} from `authorization: Bearer`, else 401. */
export function requireUser(req, res, next) {
  const claims = verify((req.get("authorization") ?? "").replace(/^Bearer /, ""));
  if (!claims) return res.status(401).json({ error: "sign in" });
  req.user = claims;
  next();
}
