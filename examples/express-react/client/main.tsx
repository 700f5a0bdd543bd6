// The example product's React client: sign in, then a live task board per project (the backend's
// own data, announced through the outbox as entity events on the project's topic; the private
// project's reach its group only), who is viewing which task (presence state on the project's
// topic), the user's notifications, who is online, and report jobs, all through
// @orgpulse/client/react on one shared stream.
import { EventKind, JobStatus, OrgpulseClient, Severity, type PresenceEntry } from "@orgpulse/client";
import {
  OrgpulseProvider, useConnectionState, useLiveJobs, useNotifications, useOnline, useOrgEvents, usePresence,
} from "@orgpulse/client/react";
import { StrictMode, useCallback, useEffect, useState } from "react";
import { createRoot } from "react-dom/client";

interface Project {
  id: string;
  name: string;
  /** The token group that may see it; null = the whole org. */
  group: string | null;
}

interface Task {
  id: string;
  title: string;
  column: string;
  updatedBy: string;
  updatedAt: string;
}

const COLUMNS = ["todo", "doing", "done"];
const SESSION = "example.session";

async function api<T>(path: string, init: RequestInit = {}): Promise<T> {
  const res = await fetch(path, {
    ...init,
    headers: { "content-type": "application/json", authorization: `Bearer ${sessionStorage.getItem(SESSION) ?? ""}` },
  });
  if (!res.ok) throw new Error((await res.json().catch(() => ({}))).error ?? res.statusText);
  return res.json();
}

/** Newer wins (by updatedAt), whether it came from the snapshot or from an event. */
function merge(tasks: Map<string, Task>, t: Task): Map<string, Task> {
  const cur = tasks.get(t.id);
  if (cur && cur.updatedAt > t.updatedAt) return tasks;
  return new Map(tasks).set(t.id, t);
}

/** Who else is viewing task `id` ("ann is viewing"), from the project's presence entries. */
function Viewers({ entries, id, me }: { entries: PresenceEntry[]; id: string; me: string }) {
  const who = entries.filter((e) => e.userId !== me && e.state?.viewing === id).map((e) => e.userId);
  if (who.length === 0) return null;
  return (
    <div className="viewers" data-testid="viewers">
      <span className="eye" />
      {who.join(", ")} {who.length === 1 ? "is" : "are"} viewing
    </div>
  );
}

/** One project's board: its tasks (snapshot, then the project's topic live) and who views which. */
function Board({ project, me }: { project: Project; me: string }) {
  const [tasks, setTasks] = useState(new Map<string, Task>());
  const [title, setTitle] = useState("");
  const [error, setError] = useState("");
  const [viewing, setViewing] = useState<string | null>(null);
  const path = `/api/projects/${project.id}/tasks`;
  const topic = `project:${project.id}`;
  const load = useCallback(() => {
    api<Task[]>(path).then((list) => setTasks((m) => list.reduce(merge, m)), (e) => setError(String(e)));
  }, [path]);
  useEffect(load, [load]);
  // Who is viewing what: one entry per user on the project's topic, seen by the project's audience.
  const [viewers, setMyState] = usePresence(topic, { audience: project.group ? { groups: [project.group] } : undefined });
  const view = (id: string) => {
    const next = viewing === id ? null : id;
    setViewing(next);
    setMyState(next ? { viewing: next } : null);
  };
  useOrgEvents(
    { kinds: [EventKind.ENTITY], entityTypes: ["task"], topics: [topic] },
    (ev) => {
      if (ev.payload.case !== "entityChanged") return;
      const task = ev.payload.value.data as unknown as Task;
      setTasks((m) => merge(m, task));
    },
    load,
  );
  const show = (t: Task) => setTasks((m) => merge(m, t));
  const move = (t: Task, column: string) =>
    api<Task>(`/api/tasks/${t.id}`, { method: "PATCH", body: JSON.stringify({ column }) }).then(show, (e) => setError(String(e)));
  return (
    <section className="card board-card">
      <form
        className="add"
        onSubmit={(e) => {
          e.preventDefault();
          api<Task>(path, { method: "POST", body: JSON.stringify({ title }) }).then(
            (t) => (show(t), setTitle("")),
            (err) => setError(String(err)),
          );
        }}
      >
        <input data-testid="task-title" value={title} onChange={(e) => setTitle(e.target.value)} placeholder={`New task in ${project.name}`} />
        <button>Add</button> <span className="error" role="alert">{error}</span>
      </form>
      <div className="board">
        {COLUMNS.map((col) => {
          const inColumn = [...tasks.values()].filter((t) => t.column === col);
          return (
            <div className="column" key={col} data-testid={`column-${col}`}>
              <h3>{col} <span className="count">{inColumn.length}</span></h3>
              {inColumn.map((t) => (
                <div
                  className={t.id === viewing ? "task viewing" : "task"}
                  key={t.id}
                  data-testid="task"
                  data-task-id={t.id}
                  data-column={t.column}
                >
                  <div className="task-title" title="view: others see you here" onClick={() => view(t.id)}>{t.title}</div>
                  <small>by {t.updatedBy}</small>
                  <Viewers entries={viewers} id={t.id} me={me} />
                  <div className="moves">
                    {COLUMNS.filter((c) => c !== col).map((c) => (
                      <button key={c} onClick={() => void move(t, c)}>→ {c}</button>
                    ))}
                  </div>
                </div>
              ))}
            </div>
          );
        })}
      </div>
    </section>
  );
}

function Sidebar({ me }: { me: string }) {
  const { notifications, unread, markRead } = useNotifications();
  const online = useOnline();
  const jobs = useLiveJobs();
  return (
    <aside>
      <section className="card">
        <h2>Notifications <span className={unread ? "count unread" : "count"}>{unread}</span></h2>
        {notifications.length === 0 && <p className="empty">Nothing yet: run a report.</p>}
        {notifications.slice(0, 20).map((n) => (
          <div
            key={n.id}
            className={`note sev-${Severity[n.severity].toLowerCase()}${n.read ? " read" : ""}`}
            data-testid="notification"
            title={n.read ? "" : "click to mark read"}
            onClick={() => void markRead([n.id])}
          >
            <b>{n.title}</b>
            {n.body && <div>{n.body}</div>}
          </div>
        ))}
      </section>
      <section className="card">
        <h2>Online <span className="count">{online.length}</span></h2>
        {online.map((u) => (
          <div key={u} className="person" data-testid="online"><span className="dot" />{u}{u === me ? " (you)" : ""}</div>
        ))}
      </section>
      <section className="card">
        <h2>Reports <button onClick={() => void api("/api/reports", { method: "POST" })}>Run a report</button></h2>
        {jobs.length === 0 && <p className="empty">No reports yet.</p>}
        {jobs.map((j) => (
          <div key={j.id} className="job" data-testid="job" data-status={JobStatus[j.status].toLowerCase()}>
            <div>{j.title} <span className="status">{JobStatus[j.status].toLowerCase()}</span></div>
            <div className="bar"><div style={{ width: `${j.progress}%` }} /></div>
          </div>
        ))}
      </section>
    </aside>
  );
}

function App({ who }: { who: { sub: string; org: string } }) {
  const state = useConnectionState();
  const [projects, setProjects] = useState<Project[]>([]);
  const [current, setCurrent] = useState("general");
  useEffect(() => void api<Project[]>("/api/projects").then(setProjects), []);
  const project = projects.find((p) => p.id === current);
  return (
    <>
      <header>
        <h1>Tasks</h1>
        <nav>
          {projects.map((p) => (
            <button
              key={p.id}
              className={p.id === current ? "tab current" : "tab"}
              data-testid={`project-${p.id}`}
              onClick={() => setCurrent(p.id)}
            >
              {p.name}
              {p.group && <span className="private" title={`private: group ${p.group}`}>private</span>}
            </button>
          ))}
        </nav>
        <span className="who">{who.sub} · org {who.org}</span>
        <span className="state" data-testid="state" data-state={state}>{state}</span>
      </header>
      <main>
        {project ? <Board key={project.id} project={project} me={who.sub} /> : <section className="card board-card" />}
        <Sidebar me={who.sub} />
      </main>
    </>
  );
}

function Login({ done }: { done: () => void }) {
  const [user, setUser] = useState("");
  const [org, setOrg] = useState("acme");
  const [launchTeam, setLaunchTeam] = useState(false);
  return (
    <form
      className="card login"
      onSubmit={async (e) => {
        e.preventDefault();
        const { token } = await api<{ token: string }>("/api/login", { method: "POST", body: JSON.stringify({ user, org, launchTeam }) });
        sessionStorage.setItem(SESSION, token);
        done();
      }}
    >
      <h1>Tasks</h1>
      <p>Sign in as anyone, in any org: everyone in the same org shares one live board; the Launch project is private to its team.</p>
      <input data-testid="login-user" value={user} onChange={(e) => setUser(e.target.value)} placeholder="user" />
      <input data-testid="login-org" value={org} onChange={(e) => setOrg(e.target.value)} placeholder="org" />
      <label>
        <input type="checkbox" data-testid="login-launch" checked={launchTeam} onChange={(e) => setLaunchTeam(e.target.checked)} /> on the
        launch team (sees the private Launch project)
      </label>
      <button>Sign in</button>
    </form>
  );
}

function Root() {
  const [session, setSession] = useState(sessionStorage.getItem(SESSION));
  const [client, setClient] = useState<OrgpulseClient | null>(null);
  useEffect(() => {
    if (!session) return;
    let c: OrgpulseClient | null = null;
    void api<{ orgpulseUrl: string }>("/api/config").then(({ orgpulseUrl }) => {
      c = new OrgpulseClient({ baseUrl: orgpulseUrl, getToken: () => api<{ token: string }>("/api/token").then((r) => r.token) });
      setClient(c);
    });
    return () => c?.close();
  }, [session]);
  if (!session) return <Login done={() => setSession(sessionStorage.getItem(SESSION))} />;
  if (!client) return <p className="empty">Connecting…</p>;
  const who = JSON.parse(atob(session.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
  return (
    <OrgpulseProvider client={client}>
      <App who={who} />
    </OrgpulseProvider>
  );
}

createRoot(document.getElementById("root")!).render(<StrictMode><Root /></StrictMode>);
