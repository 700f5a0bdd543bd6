// Builds dist/: app.js (src/main.ts and its imports, minified), app.css and index.html. The output
// is deterministic, so CI can rebuild it and fail on any difference from the committed copy.
import { copyFileSync, mkdirSync } from "node:fs";
import { build } from "esbuild";

mkdirSync("dist", { recursive: true });
const common = { bundle: true, minify: true, legalComments: "none", logLevel: "warning" };
await build({ ...common, entryPoints: ["src/main.ts"], outfile: "dist/app.js", format: "iife", target: "es2022" });
await build({ ...common, entryPoints: ["src/app.css"], outfile: "dist/app.css" });
copyFileSync("src/index.html", "dist/index.html");
