// A background worker reporting job progress to orgpulse through native gRPC
// (@connectrpc/connect-node) with the same SDK the browser uses: a "report" job walks to 100%,
// then the user who asked for it gets a notification.
import { createGrpcTransport } from "@connectrpc/connect-node";
import { JobStatus, OrgpulseClient, Severity } from "@orgpulse/client";
import { mint } from "./auth.mjs";

const clients = new Map();
/** One SDK client per org, with tokens the worker mints for itself (admin: it sends notifications). */
function clientFor(org) {
  if (!clients.has(org)) {
    const transport = createGrpcTransport({ baseUrl: process.env.ORGPULSE_URL ?? "http://127.0.0.1:8080" });
    clients.set(org, new OrgpulseClient({ baseUrl: "", transport, getToken: () => mint("report-worker", org, { ttl: 300, roles: ["admin"] }) }));
  }
  return clients.get(org);
}

/** Runs a report job for `user` of `org`; when it is done, `user` is notified. */
export async function runReport(org, user, title) {
  const client = clientFor(org);
  const requestId = `report-${Date.now()}-${Math.random()}`;
  const job = await client.jobs.createJob({ title, requestId });
  for (const progress of [20, 40, 60, 80, 100]) {
    await new Promise((r) => setTimeout(r, 400));
    const status = progress === 100 ? JobStatus.SUCCEEDED : JobStatus.RUNNING;
    await client.jobs.updateJob({ jobId: job.id, progress, status, message: `${progress}% done` });
  }
  await client.notifications.sendNotification({
    userId: user,
    title: `Report ready: ${title}`,
    body: "Your report finished.",
    severity: Severity.SUCCESS,
    requestId: `${requestId}-done`, // a retry never notifies twice
  });
  return job.id;
}
