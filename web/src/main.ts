// Entry point of the dashboard: picks up the token, wires the forms, the entity-type filter and the
// topic filter, and runs one Live (snapshot plus the SDK's subscription) per identity and topic
// and one JobActivity (who views which job, the open job's notes and typing) per identity,
// re-rendering after each batch of changes.

import { Code, ConnectError, type Event, OrgpulseClient } from "@orgpulse/client";
import { JobActivity } from "./activity";
import { readConfig, validTopic } from "./config";
import { Live } from "./live";
import { State } from "./state";
import { canCreate, canMarkRead, decode, forget, initialToken, isExpired, save, type Identity } from "./token";
import * as view from "./view";

const config = readConfig();
let identity: Identity | null = null;
let state = new State();
let live: Live | null = null;
let activity: JobActivity | null = null;
/** The topic shown ("" = all): the snapshot's jobs and the stream are narrowed to it. */
let topic = validTopic(config.topic) ? config.topic : "";
/** One client per identity: another user or org gets a fresh one (its own streams and cursor). */
const newClient = (): OrgpulseClient =>
  new OrgpulseClient({
    baseUrl: location.origin,
    getToken: () => identity?.token ?? "",
    heartbeatMs: config.heartbeatMs,
    streamRetryMs: config.streamRetryMs,
    forcePoll: config.forcePoll,
  });
let client = newClient();

const createForm = view.$<HTMLFormElement>("create-job");
const createFormHome = createForm.parentElement as HTMLElement;
const createFormNext = createForm.nextElementSibling;

// Changes are rendered once per task, so a burst of events costs one render.
let renderQueued = false;
let renderHighlight = false;
let newNotifications: string[] = [];
function scheduleRender(highlight: boolean): void {
  renderHighlight ||= highlight;
  if (renderQueued) return;
  renderQueued = true;
  setTimeout(() => {
    renderQueued = false;
    render(renderHighlight);
    renderHighlight = false;
  });
}

function render(highlight: boolean): void {
  const me = identity;
  if (!me) return;
  view.renderJobs(state, highlight);
  if (activity) {
    // the open job was deleted, or is outside the topic now shown
    if (activity.open && !state.jobs.has(activity.open)) activity.select(null);
    view.renderViewers(activity, me.user);
    view.renderJobPanel(activity, state, me.user);
  }
  view.renderNotifications(state, canMarkRead(me), (id) => void markRead([id]));
  view.renderOnline(state, me.user);
  view.renderEntityFilter(state);
  const entityType = view.entityTypeFilter();
  view.renderEntities(state, entityType, highlight);
  view.renderTicker(state, entityType);
  view.$("ticker-filter").textContent = entityType ? `${entityType} only` : "";
  for (const id of newNotifications) view.highlightNotification(id);
  newNotifications = [];
}

function askForToken(reason?: string): void {
  view.$("token-reason").textContent =
    reason ?? "Paste an orgpulse access token (a JWT). orgpulse-server --dev prints one.";
  view.$("token-panel").hidden = false;
  view.$<HTMLTextAreaElement>("token-input").focus();
}

/** The message telling the user what went wrong with a call; asks for a new token when it was the token. */
function explain(err: unknown, what: string): string {
  const e = ConnectError.from(err);
  switch (e.code) {
    case Code.Unauthenticated:
      askForToken(`The server does not accept this token (${e.rawMessage}). Paste a new one to continue where you left off.`);
      return `Signed out: ${e.rawMessage}.`;
    case Code.PermissionDenied:
      return `No permission to ${what}: ${e.rawMessage}.`;
    default:
      return `Could not ${what}: ${e.rawMessage || Code[e.code]}.`;
  }
}

function open(token: string): void {
  let id: Identity;
  try {
    id = decode(token);
  } catch (e) {
    askForToken(`That token cannot be used: ${(e as Error).message}.`);
    return;
  }
  if (isExpired(id)) {
    askForToken("That token has expired. Paste a new one.");
    return;
  }
  if (!id.org && !config.org) {
    askForToken("This token names no org (a service token): add ?org=ORG_ID to the address.");
    return;
  }
  const resume = live && identity && identity.user === id.user && identity.org === id.org;
  identity = id;
  save(id.token);
  view.showError(null);
  view.$("token-panel").hidden = true;
  view.$("badge").hidden = false; // not before a token: there is nothing to connect yet
  view.$("who").hidden = false;
  view.$("change-token").hidden = false;
  view.$("dashboard").hidden = false;
  view.$("who-org").textContent = config.org || id.org;
  view.$("who-user").textContent = id.user;
  view.$("who-role").textContent = id.roles.join(", ");
  if (canCreate(id)) createFormHome.insertBefore(createForm, createFormNext);
  else createForm.remove();

  view.$("topic-form").hidden = false;
  if (!resume) {
    live?.stop();
    activity?.stop();
    client.close();
    client = newClient();
    activity = new JobActivity(client, config.org, config.presenceTtlMs, () => scheduleRender(false), (e) =>
      view.showError(explain(e, "send to the job's viewers")),
    );
    activity.start();
    startLive();
  } else live?.start();
}

/** A fresh State and Live for the current identity and topic (the old ones stop). */
function startLive(): void {
  const me = identity;
  if (!me) return;
  live?.stop();
  state = new State();
  live = new Live(
    client,
    config,
    state,
    {
      status: view.renderBadge,
      changed: scheduleRender,
      event: (ev: Event) => {
        if (ev.payload.case === "notificationNew") newNotifications.push(ev.payload.value.id);
        scheduleRender(true);
      },
      fatal: (e) => view.showError(explain(e, `watch org ${config.org || me.org}`)),
    },
    topic ? [topic] : [],
  );
  live.start();
  scheduleRender(false);
}

const topicInput = view.$<HTMLInputElement>("topic-filter");
/** Shows `t` only ("" = every topic): the address keeps it, the page reloads its snapshot. */
function filterByTopic(t: string): void {
  topicInput.value = t;
  view.$("topic-clear").hidden = !t;
  if (!validTopic(t) && t !== "") {
    topicInput.reportValidity();
    return;
  }
  if (t === topic) return;
  topic = t;
  const url = new URL(location.href);
  if (t) url.searchParams.set("topic", t);
  else url.searchParams.delete("topic");
  history.replaceState(history.state, "", url);
  startLive();
}
filterByTopic(topic);
view.$("topic-form").addEventListener("submit", (e) => {
  e.preventDefault();
  filterByTopic(topicInput.value.trim());
});
topicInput.addEventListener("change", () => filterByTopic(topicInput.value.trim()));
view.$("topic-clear").addEventListener("click", () => filterByTopic(""));
document.addEventListener("click", (e) => {
  const target = e.target as Element | null;
  const chip = target?.closest?.<HTMLElement>("button.topic[data-topic]");
  if (chip?.dataset.topic) filterByTopic(chip.dataset.topic);
  const opened = target?.closest?.<HTMLElement>("button.job-open")?.closest<HTMLElement>("tr[data-job-id]");
  if (opened?.dataset.jobId && opened.dataset.jobId !== activity?.open) {
    noteInput.value = "";
    activity?.select(opened.dataset.jobId);
  }
});
view.$("job-panel-close").addEventListener("click", () => activity?.select(null));
const noteInput = view.$<HTMLInputElement>("note-input");
noteInput.addEventListener("input", () => activity?.typed(noteInput.value.trim()));
noteInput.addEventListener("blur", () => activity?.stopTyping());
view.$("note-form").addEventListener("submit", (e) => {
  e.preventDefault();
  activity?.note(noteInput.value.trim());
  noteInput.value = "";
});

async function markRead(ids: string[]): Promise<void> {
  try {
    const res = await client.notifications.markRead({ orgId: config.org, notificationIds: ids });
    state.markRead(ids, res.unreadCount);
    scheduleRender(false);
  } catch (err) {
    view.showError(explain(err, "mark notifications read"));
  }
}

/** "team=web, env=prod" -> {team: "web", env: "prod"} */
function parseLabels(text: string): Record<string, string> {
  const labels: Record<string, string> = {};
  for (const part of text.split(",")) {
    const [k, ...v] = part.split("=");
    if (k.trim()) labels[k.trim()] = v.join("=").trim();
  }
  return labels;
}

/** An idempotency key; crypto.randomUUID needs a secure context, getRandomValues does not. */
const requestId = (): string =>
  Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");

createForm.addEventListener("submit", async (e) => {
  e.preventDefault();
  const data = new FormData(createForm);
  const button = createForm.querySelector("button") as HTMLButtonElement;
  const error = view.$("create-job-error");
  error.textContent = "";
  button.disabled = true;
  try {
    const job = await client.jobs.createJob({
      orgId: config.org,
      title: String(data.get("title") ?? "").trim(),
      labels: parseLabels(String(data.get("labels") ?? "")),
      requestId: requestId(),
    });
    if (state.upsertJob(job)) scheduleRender(true);
    createForm.reset();
  } catch (err) {
    error.textContent = explain(err, "create the job");
  } finally {
    button.disabled = false;
  }
});

view.$("mark-all-read").addEventListener("click", () => {
  const ids = state.notifications.filter((n) => !n.read).map((n) => n.id);
  if (ids.length) void markRead(ids);
});

view.$("entity-type-filter").addEventListener("change", () => scheduleRender(false));

view.$("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  open(view.$<HTMLTextAreaElement>("token-input").value);
});

view.$("change-token").addEventListener("click", () => {
  forget();
  askForToken();
});

setInterval(view.refreshTimes, 5000);

const token = initialToken();
if (token) open(token);
else askForToken();
