// The SDK in Node (for tests/sdk_browser.rs): a streaming client and a polling one (forcePoll)
// listen to entity events; once both are connected, the first publishes an entity change whose
// `data` nests 32 levels (API.md's limit; 33 is refused first) and the script prints, as one JSON
// line, the seq and data each client received and the refusal's gRPC code and message.
// Environment: ORGPULSE_URL, ORGPULSE_TOKEN (an admin's).
import { EventKind, OrgpulseClient } from "@orgpulse/client";

let data = 1;
for (let level = 0; level < 32; level++) data = { a: data };

const options = { baseUrl: process.env.ORGPULSE_URL, getToken: () => process.env.ORGPULSE_TOKEN };
const clients = { stream: new OrgpulseClient(options), poll: new OrgpulseClient({ ...options, forcePoll: true, pollWaitMs: 5_000 }) };
const connectedAs = { stream: "live", poll: "polling" };
const received = {};
let done = false;
const connected = [];
const all = Object.entries(clients).map(
  ([name, client]) =>
    new Promise((resolve) => {
      let ready;
      connected.push(new Promise((r) => (ready = r)));
      client.subscribe(
        { kinds: [EventKind.ENTITY] },
        {
          onEvent: (ev) => {
            if (ev.payload.case !== "entityChanged") return;
            received[name] = { seq: Number(ev.seq), data: ev.payload.value.data };
            resolve();
          },
          onState: (state, info) => {
            if (state === connectedAs[name]) ready();
            if (state === "stopped" && !done) {
              console.error(`${name} stopped: ${JSON.stringify(info)}`);
              process.exit(1);
            }
          },
        },
      );
    }),
);
await Promise.all(connected);
const change = (data) => ({ entityType: "invoice", entityId: "deep", action: "updated", data });
const refused = await clients.stream.events.publish(change({ a: data })).then(
  () => ({ code: 0, message: "33 levels accepted" }),
  (err) => ({ code: err.code, message: err.rawMessage }),
);
await clients.stream.events.publish(change(data));
await Promise.all(all);
console.log(JSON.stringify({ ...received, refused }));
done = true;
Object.values(clients).forEach((c) => c.close());
