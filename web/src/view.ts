// Renders State into the static skeleton of index.html. Rows are keyed by id and patched in place,
// so a live change touches one row and gets a brief highlight; user text only ever goes through
// textContent. Topics show as chips ([data-testid=topic]); clicking one filters by it (main.ts).
// A job's title opens it ([data-testid=job-open]); who else views a job shows as chips in its row
// ([data-testid=viewer]), and the open job's panel shows its viewers, notes and who is typing.

import type { ConnectionState, Event, Job, Notification } from "@orgpulse/client";
import type { JobActivity } from "./activity";
import { ago, clock, compactJson, millis, severityName, statusName } from "./format";
import type { EntityRow, State, TickerItem } from "./state";

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

/** A chip per topic; the click handler in main.ts filters by the chip's `data-topic`. */
const topicChips = (topics: string[]): HTMLElement[] =>
  topics.map((t) => el("button", { type: "button", class: "topic", "data-testid": "topic", "data-topic": t, title: `Show ${t} only` }, t));

function jobCells(job: Job): HTMLElement[] {
  const status = statusName(job.status);
  const labels = Object.entries(job.labels).map(([k, v]) => `${k}=${v}`);
  const meta = [job.id, ...labels, job.message].filter(Boolean).join(" · ");
  return [
    el(
      "td",
      {},
      el(
        "div",
        { class: "title" },
        el("button", { type: "button", class: "job-open", "data-testid": "job-open", title: "Open: who views it, notes" }, job.title),
        ...topicChips(job.topics),
        el("span", { class: "viewers", "data-testid": "viewers" }),
      ),
      el("div", { class: "meta" }, meta),
    ),
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

/**
 * Makes `body`'s rows match `items`, in order, keyed by `data-key`: a row is created or rebuilt
 * (and flashed when `highlight`) only when its version changed. Returns the rows no item wants.
 */
function syncRows<T>(
  body: HTMLElement,
  items: T[],
  key: (item: T) => string,
  version: (item: T) => string,
  build: (row: HTMLTableRowElement, item: T) => void,
  highlight: boolean,
): HTMLTableRowElement[] {
  const existing = new Map<string, HTMLTableRowElement>();
  for (const row of body.querySelectorAll<HTMLTableRowElement>(":scope > tr[data-key]")) {
    existing.set(row.dataset.key ?? "", row);
  }
  let prev: HTMLTableRowElement | null = null;
  for (const item of items) {
    const k = key(item);
    let row = existing.get(k);
    existing.delete(k);
    if (!row || row.dataset.version !== version(item)) {
      const fresh = row ?? el("tr", { "data-key": k });
      fresh.dataset.version = version(item);
      build(fresh, item);
      if (highlight) flash(fresh);
      row = fresh;
    }
    const want: Element | null = prev ? prev.nextElementSibling : body.firstElementChild;
    if (want !== row) body.insertBefore(row, want);
    prev = row;
  }
  return [...existing.values()];
}

/** Makes the table match state.jobs (newest first), touching only rows whose version changed. */
export function renderJobs(state: State, highlight: boolean): void {
  const body = $("jobs");
  const jobs = [...state.jobs.values()].sort((a, b) => (a.id < b.id ? 1 : a.id > b.id ? -1 : 0));
  const gone = syncRows(
    body,
    jobs,
    (job) => job.id,
    (job) => String(job.version),
    (row, job) => {
      row.dataset.testid = "job-row";
      row.dataset.jobId = job.id;
      row.dataset.status = statusName(job.status);
      row.replaceChildren(...jobCells(job));
    },
    highlight,
  );
  for (const row of gone) {
    if (!highlight) {
      row.remove();
      continue;
    }
    // fade out, but stop being a job row at once: tests and readers see the truth immediately
    row.removeAttribute("data-testid");
    row.removeAttribute("data-job-id");
    row.removeAttribute("data-key");
    row.classList.add("leaving");
    setTimeout(() => row.remove(), 600);
  }
  $("job-count").textContent = String(jobs.length);
  $("jobs-empty").hidden = jobs.length > 0;
}

/** Each job row's viewers other than `me`, and which row is open (after renderJobs). */
export function renderViewers(activity: JobActivity, me: string): void {
  for (const row of $("jobs").querySelectorAll<HTMLElement>('tr[data-testid="job-row"]')) {
    const id = row.dataset.jobId ?? "";
    row.classList.toggle("selected", id === activity.open);
    const users = (activity.viewers.get(id) ?? []).filter((u) => u !== me);
    const box = row.querySelector<HTMLElement>('[data-testid="viewers"]');
    if (!box || box.dataset.users === users.join(" ")) continue;
    box.dataset.users = users.join(" ");
    box.replaceChildren(
      ...users.map((u) => el("span", { class: "viewer", "data-testid": "viewer", "data-user-id": u, title: `${u} is viewing this job` }, u)),
    );
  }
}

/** The open job's panel: title, who views it, the notes, who is typing (not `me`). */
export function renderJobPanel(activity: JobActivity, state: State, me: string): void {
  const id = activity.open;
  const job = id ? state.jobs.get(id) : undefined;
  $("job-panel").hidden = !job;
  if (!id || !job) return;
  $("job-panel").dataset.jobId = id;
  $("job-panel-title").textContent = job.title;
  const viewers = activity.viewers.get(id) ?? [];
  $("job-panel-viewers").textContent = viewers.map((u) => (u === me ? `${u} (you)` : u)).join(", ") || "nobody yet";
  $("notes").replaceChildren(
    ...activity.notes.map((n) => el("li", { "data-testid": "note", "data-user-id": n.user }, el("b", {}, n.user === me ? "you" : n.user), `: ${n.text}`)),
  );
  const typing = [...activity.typing.keys()].filter((u) => u !== me).sort();
  const line = $("typing");
  line.dataset.users = typing.join(" ");
  line.textContent = typing.length ? `${typing.join(", ")} ${typing.length === 1 ? "is" : "are"} typing…` : "";
}

/** The entity-type filter's current choice; "" = every type. */
export const entityTypeFilter = (): string => $<HTMLSelectElement>("entity-type-filter").value;

/** Offers every entity type seen so far, keeping the current choice. */
export function renderEntityFilter(state: State): void {
  const select = $<HTMLSelectElement>("entity-type-filter");
  const types = [...state.entityTypes].sort();
  if (select.options.length === types.length + 1) return; // types are only ever added
  const chosen = select.value;
  select.replaceChildren(el("option", { value: "" }, "All types"), ...types.map((t) => el("option", { value: t }, t)));
  select.value = chosen;
  select.hidden = types.length === 0;
}

function entityCells(e: EntityRow): HTMLElement[] {
  const data = compactJson(e.data);
  return [
    el("td", { class: "mono" }, e.entityType),
    el("td", { class: "mono" }, e.entityId, ...topicChips(e.topics)),
    el("td", {}, el("span", { class: "action", "data-testid": "entity-action" }, e.action)),
    el("td", { class: "mono data", title: JSON.stringify(e.data, null, 2), "data-testid": "entity-data" }, data),
    el("td", {}, e.actor),
    el("td", {}, since(millis(e.time))),
  ];
}

/** Makes the live-entities table match the entities of the chosen type, most recently changed first. */
export function renderEntities(state: State, entityType: string, highlight: boolean): void {
  const rows = state.entitiesOf(entityType);
  const gone = syncRows(
    $("entities"),
    rows,
    (e) => e.key,
    (e) => String(e.revision),
    (row, e) => {
      row.dataset.testid = "entity-row";
      row.dataset.entityType = e.entityType;
      row.dataset.entityId = e.entityId;
      row.dataset.action = e.action;
      row.replaceChildren(...entityCells(e));
    },
    highlight,
  );
  for (const row of gone) row.remove();
  $("entity-count").textContent = String(rows.length);
  $("entities-empty").hidden = rows.length > 0;
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
    case "entityChanged":
      return `${p.value.entityType} ${p.value.entityId} ${p.value.action}`;
    default:
      return p.case ?? "event";
  }
}

/** Extra test hooks of a ticker line: its seq, and for an entity event what changed. */
function tickerHooks(ev: Event): Record<string, string> {
  const hooks: Record<string, string> = { "data-testid": "ticker-item", "data-kind": ev.payload.case ?? "" };
  if (ev.seq > 0n) hooks["data-seq"] = String(ev.seq);
  if (ev.payload.case === "entityChanged") {
    const c = ev.payload.value;
    Object.assign(hooks, { "data-entity-type": c.entityType, "data-entity-id": c.entityId, "data-action": c.action });
  }
  return hooks;
}

/** The actor of a line ("alice: invoice inv_1 paid"); presence lines name their user themselves. */
function actorOf(ev: Event): string {
  if (!ev.actor || ev.payload.case?.startsWith("user")) return "";
  return ev.payload.case === "entityChanged" ? `${ev.actor}:` : ev.actor;
}

export function renderTicker(state: State, entityType: string): void {
  // the spaces between the parts keep textContent readable; flex layout does not show them
  const items = state.tickerOf(entityType).map((item) =>
    el(
      "li",
      tickerHooks(item.ev),
      el("span", { class: "when" }, clock(millis(item.ev.time))),
      " ",
      el("span", { class: "actor" }, actorOf(item.ev)),
      " ",
      describe(item),
      ...topicChips(item.ev.topics),
    ),
  );
  $("ticker").replaceChildren(...items);
  $("ticker-empty").hidden = items.length > 0;
}
