// The README's code blocks compile as pasted: every ```ts and ```tsx block is type-checked, each
// as a module of its own, by tsc (strict) against this package's built types (dist/, resolved
// through the workspace's node_modules like an installed @orgpulse/client) and React's.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import ts from "typescript";

const pkg = join(dirname(fileURLToPath(import.meta.url)), "..");
const readme = readFileSync(join(pkg, "README.md"), "utf8");
const blocks = [...readme.matchAll(/^```(tsx?)\n([\s\S]*?)^```$/gm)].map(([, lang, code], i) => ({
  // virtual files beside the package's own sources, so module resolution is an app's
  path: join(pkg, "test", `readme-block-${i + 1}.${lang}`),
  code,
}));

test("the README has TypeScript and TSX blocks", () => {
  assert.ok(blocks.some((b) => b.path.endsWith(".ts")) && blocks.some((b) => b.path.endsWith(".tsx")));
});

test("every README block type-checks as pasted", () => {
  const options = {
    strict: true,
    noEmit: true,
    target: ts.ScriptTarget.ES2022,
    module: ts.ModuleKind.ESNext,
    moduleResolution: ts.ModuleResolutionKind.Bundler,
    moduleDetection: ts.ModuleDetectionKind.Force,
    jsx: ts.JsxEmit.ReactJSX,
    lib: ["lib.es2022.d.ts", "lib.dom.d.ts", "lib.dom.iterable.d.ts"],
    types: [],
    skipLibCheck: true,
  };
  const host = ts.createCompilerHost(options);
  const virtual = new Map(blocks.map((b) => [b.path, b.code]));
  const { fileExists, readFile, getSourceFile } = host;
  host.fileExists = (f) => virtual.has(f) || fileExists.call(host, f);
  host.readFile = (f) => virtual.get(f) ?? readFile.call(host, f);
  host.getSourceFile = (f, lang, ...rest) =>
    virtual.has(f) ? ts.createSourceFile(f, virtual.get(f), lang) : getSourceFile.call(host, f, lang, ...rest);
  const program = ts.createProgram([...virtual.keys()], options, host);
  const errors = ts.getPreEmitDiagnostics(program).map((d) => {
    const where = d.file ? `${d.file.fileName.split("/").pop()}:${d.file.getLineAndCharacterOfPosition(d.start ?? 0).line + 1}` : "";
    return `${where} ${ts.flattenDiagnosticMessageText(d.messageText, "\n")}`;
  });
  assert.deepEqual(errors, [], `README blocks that do not compile:\n${errors.join("\n")}`);
});
