//! Typed clients whose every call carries `authorization: Bearer <token>` from Tokens. A unary
//! call refused because the token expired is sent once more with a fresh token (the server
//! refused it before running anything, so this is safe for writes too). A call that already names
//! an authorization header is passed through untouched.

import type { DescService } from "@bufbuild/protobuf";
import { createClient, type CallOptions, type Client, type Transport } from "@connectrpc/connect";
import { isTokenExpired } from "./errors.js";
import type { Tokens } from "./tokens.js";

type AnyMethod = (req: unknown, options?: CallOptions) => unknown;

function withToken(options: CallOptions | undefined, token: string): CallOptions {
  const headers = new Headers(options?.headers);
  headers.set("authorization", `Bearer ${token}`);
  return { ...options, headers };
}

const named = (options?: CallOptions) => new Headers(options?.headers).has("authorization");

export function authedClient<T extends DescService>(service: T, transport: Transport, tokens: Tokens): Client<T> {
  const inner = createClient(service, transport) as unknown as Record<string, AnyMethod>;
  const out: Record<string, AnyMethod> = {};
  for (const [name, method] of Object.entries(service.method)) {
    const call = inner[name];
    if (method.methodKind === "unary") {
      out[name] = async (req, options) => {
        if (named(options)) return call(req, options);
        const token = await tokens.get();
        try {
          return await call(req, withToken(options, token));
        } catch (err) {
          if (!isTokenExpired(err)) throw err;
          const fresh = await tokens.refresh(token);
          if (fresh === token) throw err;
          return call(req, withToken(options, fresh));
        }
      };
    } else {
      out[name] = (req, options) =>
        named(options)
          ? call(req, options)
          : (async function* () {
              const token = await tokens.get();
              yield* call(req, withToken(options, token)) as AsyncIterable<unknown>;
            })();
    }
  }
  return out as unknown as Client<T>;
}
