// The SDK in Node, as a backend worker uses it (for tests/sdk_browser.rs): subscribes to the org's
// job events, then creates a job and walks it to 100% through the typed calls, and prints the
// durable seqs it received as one JSON line once it has seen its own last update. Environment:
// ORGPULSE_URL, ORGPULSE_TOKEN.
import { EventKind, JobStatus, OrgpulseClient } from "@orgpulse/client";

const client = new OrgpulseClient({ baseUrl: process.env.ORGPULSE_URL, getToken: () => process.env.ORGPULSE_TOKEN });
const seqs = [];
let lastVersion = 0n;
let seenVersion = 0n;
let jobId = "";
const done = new Promise((resolve) => {
  const check = () => lastVersion && seenVersion >= lastVersion && resolve();
  client.subscribe(
    { kinds: [EventKind.JOB] },
    {
      onEvent: (ev) => {
        seqs.push(Number(ev.seq));
        const p = ev.payload;
        if (p.case === "jobUpdated" && p.value.id === jobId) seenVersion = p.value.version;
        check();
      },
      onState: async (state) => {
        if (state !== "live" || jobId) return;
        const job = await client.jobs.createJob({ title: "node worker", requestId: `node-${Date.now()}` });
        jobId = job.id;
        let v = job.version;
        for (const progress of [25, 50, 75, 100]) {
          const status = progress === 100 ? JobStatus.SUCCEEDED : JobStatus.RUNNING;
          v = (await client.jobs.updateJob({ jobId, progress, status })).version;
        }
        lastVersion = v;
        check();
      },
    },
  );
});
const timeout = setTimeout(() => {
  console.error("node worker: timed out");
  process.exit(1);
}, 20_000);
await done;
clearTimeout(timeout);
console.log(JSON.stringify({ jobId, seqs }));
client.close();
