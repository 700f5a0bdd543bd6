// `npm run setup`: creates secret.txt, the HS256 secret orgpulse-server (--jwt-secret-file
// secret.txt) and this backend share, random and readable by its owner only; kept when present.
// It is git-ignored: a secret never goes into the repository.
import { randomBytes } from "node:crypto";
import { existsSync, writeFileSync } from "node:fs";

const path = new URL("secret.txt", import.meta.url);
if (existsSync(path)) {
  console.log("secret.txt exists: kept");
} else {
  writeFileSync(path, `${randomBytes(32).toString("base64url")}\n`, { mode: 0o600 });
  console.log("secret.txt created");
}
