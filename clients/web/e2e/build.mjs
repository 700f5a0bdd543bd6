// Bundles the browser-test pages (page.ts: the SDK alone; react-page.ts: the hooks under
// StrictMode, React's development build) into e2e/dist, and prints the SDK's bundle sizes
// (minified, and gzipped) alone and with React, for the README and the report.
import { mkdirSync, writeFileSync } from "node:fs";
import { gzipSync } from "node:zlib";
import { build } from "esbuild";

const out = new URL("./dist/", import.meta.url).pathname;
mkdirSync(out, { recursive: true });
const common = { bundle: true, format: "esm", target: "es2022", logLevel: "warning", absWorkingDir: new URL(".", import.meta.url).pathname };
await build({ ...common, entryPoints: ["page.ts"], outfile: `${out}page.js`, minify: true });
await build({ ...common, entryPoints: ["react-page.ts"], outfile: `${out}react.js`, define: { "process.env.NODE_ENV": '"development"' } });
const html = (script, body = "") => `<!doctype html><meta charset="utf-8"><title>orgpulse sdk test</title><body>${body}<script type="module" src="${script}"></script></body>\n`;
writeFileSync(`${out}page.html`, html("page.js"));
writeFileSync(`${out}react.html`, html("react.js", '<div id="root"></div>'));

if (process.argv.includes("--sizes")) {
  const size = async (contents, define = {}) => {
    const r = await build({ ...common, stdin: { contents, resolveDir: common.absWorkingDir, loader: "ts" }, write: false, minify: true, define: { "process.env.NODE_ENV": '"production"', ...define } });
    const bytes = r.outputFiles[0].contents;
    return `${(bytes.length / 1024).toFixed(1)} KiB (${(gzipSync(bytes).length / 1024).toFixed(1)} KiB gzipped)`;
  };
  const sdk = 'import { OrgpulseClient } from "@orgpulse/client"; globalThis.c = new OrgpulseClient({ baseUrl: "", getToken: () => "" }).subscribe({}, {});';
  console.log(`SDK alone: ${await size(sdk)}`);
  console.log(`SDK + hooks + React + ReactDOM: ${await size(`${sdk} import * as r from "@orgpulse/client/react"; import { createRoot } from "react-dom/client"; globalThis.r = [r, createRoot];`)}`);
  console.log(`React + ReactDOM alone: ${await size('import { createRoot } from "react-dom/client"; globalThis.r = createRoot;')}`);
}
