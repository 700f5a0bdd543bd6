//! liveJobs: the jobs of an org kept exact from a snapshot and the events after it. ListJobs (all
//! pages) gives the jobs and the log position of the snapshot (`cursor`); the subscription resumes
//! exactly there; a job never goes back to an older version; a resync reloads the snapshot.

import type { OrgpulseClient, Unsubscribe } from "./client.js";
import { snapshotThenSubscribe } from "./snapshot.js";
import type { ConnectionState, StateInfo } from "./feed.js";
import { EventKind, type Event } from "./gen/orgpulse/v1/event_pb.js";
import type { Job, JobStatus } from "./gen/orgpulse/v1/job_pb.js";

export interface LiveJobsOptions {
  orgId?: string;
  /** Only jobs in these statuses (a job leaving them leaves the list); empty = all. */
  statuses?: JobStatus[];
  /** Only jobs with at least one of these topics (given at their creation); empty = all. */
  topics?: string[];
  /** Stop paging the snapshot after this many jobs (default 5000). */
  maxJobs?: number;
}

export interface LiveJobsHandlers {
  /** The list changed (newest first by creation): after the snapshot and after each event. */
  onChange(jobs: Job[]): void;
  onState?(state: ConnectionState, info: StateInfo): void;
}

const PAGE = 500;

/** The job a job event carries or removes: [id, job | null for a deletion]. */
export function jobChange(ev: Event): [string, Job | null] | null {
  const p = ev.payload;
  if (p.case === "jobCreated" || p.case === "jobUpdated") return [p.value.id, p.value];
  if (p.case === "jobDeleted") return [p.value.jobId, null];
  return null;
}

/** Every job of an org (up to `maxJobs`) and the log position of the first page. */
export async function listAllJobs(
  client: OrgpulseClient,
  options: LiveJobsOptions,
  signal?: AbortSignal,
): Promise<{ jobs: Job[]; cursor: string }> {
  const req = { orgId: options.orgId ?? "", statuses: options.statuses ?? [], topics: options.topics ?? [], pageSize: PAGE };
  const first = await client.jobs.listJobs(req, { signal });
  const jobs = [...first.jobs];
  for (let page = first.nextPageToken; page && jobs.length < (options.maxJobs ?? 5_000); ) {
    const next = await client.jobs.listJobs({ ...req, pageToken: page }, { signal });
    jobs.push(...next.jobs);
    page = next.nextPageToken;
  }
  // the first page's cursor: later pages may be newer, which the version rule absorbs
  return { jobs, cursor: first.cursor };
}

export function liveJobs(client: OrgpulseClient, options: LiveJobsOptions, handlers: LiveJobsHandlers): Unsubscribe {
  const statuses = options.statuses ?? [];
  const jobs = new Map<string, Job>();
  const keep = (j: Job) => statuses.length === 0 || statuses.includes(j.status);
  const changed = () =>
    handlers.onChange([...jobs.values()].sort((a, b) => Number((b.createdAt?.seconds ?? 0n) - (a.createdAt?.seconds ?? 0n))));
  return snapshotThenSubscribe(
    client,
    (signal) => listAllJobs(client, options, signal),
    { orgId: options.orgId, kinds: [EventKind.JOB], topics: options.topics },
    {
      onSnapshot: (snap) => {
        jobs.clear();
        for (const j of snap.jobs) jobs.set(j.id, j);
        changed();
      },
      onEvent: (ev) => {
        const change = jobChange(ev);
        if (!change) return;
        const [id, job] = change;
        const cur = jobs.get(id);
        if (job && cur && cur.version >= job.version) return;
        if (job && keep(job)) jobs.set(id, job);
        else jobs.delete(id);
        changed();
      },
      onState: handlers.onState,
    },
  );
}
