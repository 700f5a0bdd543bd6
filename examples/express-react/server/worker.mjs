// A background worker reporting job progress to orgpulse through native gRPC
// (@connectrpc/connect-node) with the same SDK the browser uses: a "report" job walks to 100%.
import { createGrpcTransport } from "@connectrpc/connect-node";
import { JobStatus, OrgpulseClient } from "@orgpulse/client";
import { mint } from "./auth.mjs";

const clients = new Map();
/** One SDK client per org, with tokens the worker mints for itself. */
function clientFor(org) {
  if (!clients.has(org)) {
    const transport = createGrpcTransport({ baseUrl: process.env.ORGPULSE_URL ?? "http://127.0.0.1:8080" });
    clients.set(org, new OrgpulseClient({ baseUrl: "", transport, getToken: () => mint("report-worker", org, 300) }));
  }
  return clients.get(org);
}

export async function runReport(org, title) {
  const client = clientFor(org);
  const job = await client.jobs.createJob({ title, requestId: `report-${Date.now()}-${Math.random()}` });
  for (const progress of [20, 40, 60, 80, 100]) {
    await new Promise((r) => setTimeout(r, 400));
    const status = progress === 100 ? JobStatus.SUCCEEDED : JobStatus.RUNNING;
    await client.jobs.updateJob({ jobId: job.id, progress, status, message: `${progress}% done` });
  }
  return job.id;
}
