// A test proxy for the dashboard's fallback paths, in front of orgpulse-server:
//   mode "buffer": holds every response until it has ended, then sends it whole (like a proxy that
//     buffers): unary calls still work, a stream delivers nothing.
//   mode "refuse-streams": answers every Subscribe with HTTP 503 itself; everything else passes.
//   mode "pass": passes everything through as it comes.
//   mode "down": drops every connection unanswered, as a network that lost the server.
// The mode can be changed while the proxy runs (setMode). With a static directory, GET /e2e/NAME
// serves that file from it (test pages on the same origin as the API they call).
import { readFileSync } from "node:fs";
import http from "node:http";
import { basename, join } from "node:path";

const TYPES = { ".html": "text/html", ".js": "text/javascript" };

/** Starts the proxy on 127.0.0.1 (ephemeral port); resolves to {url, setMode, close}. */
export function startProxy(target, initialMode, staticDir) {
  let mode = initialMode;
  const upstream = new URL(target);
  const server = http.createServer((req, res) => {
    if (staticDir && req.method === "GET" && req.url.startsWith("/e2e/")) {
      const name = basename(new URL(req.url, "http://x").pathname);
      try {
        const body = readFileSync(join(staticDir, name));
        res.writeHead(200, { "content-type": TYPES[name.slice(name.lastIndexOf("."))] ?? "application/octet-stream" }).end(body);
      } catch {
        res.writeHead(404).end();
      }
      return;
    }
    if (mode === "down") {
      req.socket.destroy();
      return;
    }
    if (mode === "refuse-streams" && req.url.endsWith("/Subscribe")) {
      req.resume();
      res.writeHead(503, { "content-type": "text/plain" }).end("streams refused by test proxy");
      return;
    }
    const up = http.request(
      { host: upstream.hostname, port: upstream.port, path: req.url, method: req.method, headers: req.headers },
      (upRes) => {
        if (mode !== "buffer") {
          res.writeHead(upRes.statusCode, upRes.headers);
          upRes.pipe(res);
          return;
        }
        const chunks = [];
        upRes.on("data", (c) => chunks.push(c));
        upRes.on("end", () => {
          const body = Buffer.concat(chunks);
          const headers = { ...upRes.headers, "content-length": String(body.length) };
          delete headers["transfer-encoding"];
          res.writeHead(upRes.statusCode, headers).end(body);
        });
      },
    );
    up.on("error", () => res.destroy());
    res.on("close", () => up.destroy());
    req.pipe(up);
  });
  return new Promise((resolve) => {
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      resolve({
        url: `http://127.0.0.1:${port}`,
        setMode: (m) => (mode = m),
        close: () => {
          server.closeAllConnections();
          server.close();
        },
      });
    });
  });
}
