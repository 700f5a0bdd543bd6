// Bundles the React client (client/main.tsx) into public/app.js with esbuild; index.html is copied.
import { copyFileSync, mkdirSync } from "node:fs";
import { build } from "esbuild";

mkdirSync("public", { recursive: true });
await build({
  entryPoints: ["client/main.tsx"],
  outfile: "public/app.js",
  bundle: true,
  minify: true,
  format: "esm",
  target: "es2022",
  jsx: "automatic",
  define: { "process.env.NODE_ENV": '"production"' },
  logLevel: "warning",
});
copyFileSync("client/index.html", "public/index.html");
