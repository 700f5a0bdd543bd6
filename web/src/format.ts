// Small display helpers: enum names, relative times, timestamps, compact JSON.

import { timestampDate, type Timestamp } from "@bufbuild/protobuf/wkt";
import { JobStatus, Severity } from "@orgpulse/client";

/** "running" for JOB_STATUS_RUNNING. */
export const statusName = (s: JobStatus): string => (JobStatus[s] ?? "unspecified").toLowerCase();

export const severityName = (s: Severity): string => (Severity[s] ?? "info").toLowerCase();

export const millis = (t: Timestamp | undefined): number => (t ? timestampDate(t).getTime() : 0);

/** "just now", "12s ago", "5m ago", "3h ago", "2d ago". */
export function ago(ms: number, now = Date.now()): string {
  if (!ms) return "";
  const s = Math.max(0, Math.round((now - ms) / 1000));
  if (s < 5) return "just now";
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

export const clock = (ms: number): string => new Date(ms || Date.now()).toLocaleTimeString([], { hour12: false });

/** `{"amount":12,"status":"paid"}`, cut to `max` characters with an ellipsis. */
export function compactJson(value: unknown, max = 120): string {
  const text = JSON.stringify(value) ?? "";
  return text.length <= max ? text : `${text.slice(0, max - 1)}…`;
}
