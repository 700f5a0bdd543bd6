// Renders State into the static skeleton of index.html. Rows are keyed by id and patched in place,
// so a live change touches one row and gets a brief highlight; user text only ever goes through
// textContent.

import type { ConnectionState, Job, Notification } from "@orgpulse/client";
import { ago, clock, millis, severityName, statusName } from "./format";
import type { State, TickerItem } from "./state";

export const $ = <T extends HTMLElement = HTMLElement>(id: string): T => {
  const el = document.getElementById(id);
  if (!el) throw new Error(`#${id} missing from index.html`);
  return el as T;
};

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string> = {},
  ...children: (Node | string)[]
): HTMLElementTagNameMap[K] {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  e.append(...children);
  return e;
}

function flash(e: HTMLElement): void {
  e.classList.remove("flash");
  void e.offsetWidth; // restart the animation
  e.classList.add("flash");
}

/** A <time> that the periodic refresh keeps saying "5s ago". */
const since = (ms: number): HTMLElement =>
  el("time", { "data-ts": String(ms), datetime: new Date(ms || 0).toISOString() }, ago(ms));

export function refreshTimes(): void {
  for (const t of document.querySelectorAll<HTMLElement>("time[data-ts]")) {
    t.textContent = ago(Number(t.dataset.ts));
  }
}

export function renderBadge(state: ConnectionState, detail?: string): void {
  const b = $("badge");
  b.dataset.state = state;
  b.textContent = detail ? `${state} ${detail}` : state;
}

export function showError(message: string | null): void {
  const e = $("error");
  e.textContent = message ?? "";
  e.hidden = !message;
}

function jobCells(job: Job): HTMLElement[] {
  const status = statusName(job.status);
  const labels = Object.entries(job.labels).map(([k, v]) => `${k}=${v}`);
  const meta = [job.id, ...labels, job.message].filter(Boolean).join(" · ");
  return [
    el("td", {}, el("div", { class: "title" }, job.title), el("div", { class: "meta" }, meta)),
    el("td", {}, el("span", { class: `status status-${status}`, "data-testid": "job-status" }, status)),
    el(
      "td",
      {},
      el("div", { class: "bar" }, el("div", { style: `width:${Math.min(100, job.progress)}%` })),
      el("span", { class: "pct", "data-testid": "job-progress" }, `${job.progress}%`),
    ),
    el("td", { title: `by ${job.updatedBy || job.createdBy}` }, since(millis(job.updatedAt))),
  ];
}

/** Makes the table match state.jobs (newest first), touching only rows whose version changed. */
export function renderJobs(state: State, highlight: boolean): void {
  const body = $("jobs");
  const existing = new Map<string, HTMLTableRowElement>();
  for (const row of body.querySelectorAll<HTMLTableRowElement>("tr[data-job-id]")) {
    existing.set(row.dataset.jobId ?? "", row);
  }
  const jobs = [...state.jobs.values()].sort((a, b) => (a.id < b.id ? 1 : a.id > b.id ? -1 : 0));
  let prev: HTMLTableRowElement | null = null;
  for (const job of jobs) {
    let row = existing.get(job.id);
    existing.delete(job.id);
    if (!row || row.dataset.version !== String(job.version)) {
      const fresh = row ?? el("tr", { "data-testid": "job-row", "data-job-id": job.id });
      fresh.dataset.version = String(job.version);
      fresh.dataset.status = statusName(job.status);
      fresh.replaceChildren(...jobCells(job));
      if (highlight) flash(fresh);
      row = fresh;
    }
    const want: Element | null = prev ? prev.nextElementSibling : body.firstElementChild;
    if (want !== row) body.insertBefore(row, want);
    prev = row;
  }
  for (const gone of existing.values()) {
    if (!highlight) {
      gone.remove();
      continue;
    }
    // fade out, but stop being a job row at once: tests and readers see the truth immediately
    gone.removeAttribute("data-testid");
    gone.removeAttribute("data-job-id");
    gone.classList.add("leaving");
    setTimeout(() => gone.remove(), 600);
  }
  $("job-count").textContent = String(jobs.length);
  $("jobs-empty").hidden = jobs.length > 0;
}

export function renderNotifications(state: State, canMarkRead: boolean, onRead: (id: string) => void): void {
  const list = $("notifications");
  const items = state.notifications.map((n: Notification) => {
    const li = el(
      "li",
      {
        "data-testid": "notification",
        "data-notification-id": n.id,
        "data-read": String(n.read),
        class: `sev-${severityName(n.severity)}${n.read ? " read" : ""}`,
      },
      el("div", { class: "title" }, n.title),
    );
    if (n.body) li.append(el("p", {}, n.body));
    li.append(el("small", {}, `${n.userId ? "to you" : "to everyone"} from ${n.createdBy} · `, since(millis(n.createdAt))));
    if (!n.read && canMarkRead) {
      const b = el("button", { type: "button", class: "link", "data-testid": "mark-read" }, "Mark read");
      b.addEventListener("click", () => onRead(n.id));
      li.append(b);
    }
    return li;
  });
  list.replaceChildren(...items);
  $("unread-count").textContent = String(state.unread);
  $("unread-count").classList.toggle("zero", state.unread === 0);
  $("mark-all-read").hidden = !canMarkRead || state.unread === 0;
  $("notifications-empty").hidden = items.length > 0;
}

export function highlightNotification(id: string): void {
  const li = document.querySelector<HTMLElement>(`[data-notification-id="${CSS.escape(id)}"]`);
  if (li) flash(li);
}

export function renderOnline(state: State, me: string): void {
  const users = [...state.online.keys()].sort();
  const items = users.map((u) =>
    el(
      "li",
      { "data-testid": "online-member", "data-user-id": u },
      el("span", { class: "dot" }),
      u === me ? `${u} (you)` : u,
    ),
  );
  $("online").replaceChildren(...items);
  $("online-count").textContent = String(users.length);
  $("online-empty").hidden = users.length > 0;
}

function describe({ ev, deletedTitle }: TickerItem): string {
  const p = ev.payload;
  switch (p.case) {
    case "jobCreated":
      return `created job “${p.value.title}”`;
    case "jobUpdated":
      return `updated “${p.value.title}”: ${statusName(p.value.status)} ${p.value.progress}%`;
    case "jobDeleted":
      return deletedTitle ? `deleted “${deletedTitle}”` : `deleted job ${p.value.jobId}`;
    case "notificationNew":
      return `notified ${p.value.userId || "everyone"}: “${p.value.title}”`;
    case "userOnline":
      return `${p.value.userId} came online`;
    case "userOffline":
      return `${p.value.userId} went offline`;
    default:
      return p.case ?? "event";
  }
}

export function renderTicker(state: State): void {
  const items = state.ticker.map((item) => {
    const ev = item.ev;
    return el(
      "li",
      { "data-testid": "ticker-item", "data-kind": ev.payload.case ?? "" },
      el("span", { class: "when" }, clock(millis(ev.time))),
      el("span", { class: "actor" }, ev.actor && !ev.payload.case?.startsWith("user") ? ev.actor : ""),
      describe(item),
    );
  });
  $("ticker").replaceChildren(...items);
  $("ticker-empty").hidden = items.length > 0;
}
