// The example product's React client: sign in, then a live task board (the backend's own data,
// announced through the outbox as entity events), the user's notifications, who is online, and
// report jobs, all through @orgpulse/client/react on one shared stream.
import { EventKind, OrgpulseClient } from "@orgpulse/client";
import {
  OrgpulseProvider, useConnectionState, useLiveJobs, useNotifications, useOnline, useOrgEvents,
} from "@orgpulse/client/react";
import { StrictMode, useCallback, useEffect, useState } from "react";
import { createRoot } from "react-dom/client";

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

function Board() {
  const [tasks, setTasks] = useState(new Map<string, Task>());
  const [title, setTitle] = useState("");
  const [error, setError] = useState("");
  const load = useCallback(() => {
    api<Task[]>("/api/tasks").then((list) => setTasks((m) => list.reduce(merge, m)), (e) => setError(String(e)));
  }, []);
  useEffect(load, [load]);
  useOrgEvents(
    { kinds: [EventKind.ENTITY], entityTypes: ["task"] },
    (ev) => {
      if (ev.payload.case === "entityChanged") setTasks((m) => merge(m, ev.payload.value.data as unknown as Task));
    },
    load,
  );
  const show = (t: Task) => setTasks((m) => merge(m, t));
  const move = (t: Task, column: string) =>
    api<Task>(`/api/tasks/${t.id}`, { method: "PATCH", body: JSON.stringify({ column }) }).then(show, (e) => setError(String(e)));
  return (
    <section>
      <form
        onSubmit={(e) => {
          e.preventDefault();
          api<Task>("/api/tasks", { method: "POST", body: JSON.stringify({ title }) }).then(
            (t) => (show(t), setTitle("")),
            (err) => setError(String(err)),
          );
        }}
      >
        <input data-testid="task-title" value={title} onChange={(e) => setTitle(e.target.value)} placeholder="New task" />
        <button>Add</button> <span role="alert">{error}</span>
      </form>
      <div className="board">
        {COLUMNS.map((col) => (
          <div className="column" key={col} data-testid={`column-${col}`}>
            <h3>{col}</h3>
            {[...tasks.values()].filter((t) => t.column === col).map((t) => (
              <div className="task" key={t.id} data-testid="task" data-task-id={t.id} data-column={t.column}>
                {t.title} <small>by {t.updatedBy}</small>
                <div>
                  {COLUMNS.filter((c) => c !== col).map((c) => (
                    <button key={c} onClick={() => void move(t, c)}>→ {c}</button>
                  ))}
                </div>
              </div>
            ))}
          </div>
        ))}
      </div>
    </section>
  );
}

function Sidebar() {
  const { notifications, unread, markRead } = useNotifications();
  const online = useOnline();
  const jobs = useLiveJobs();
  return (
    <aside>
      <div>
        <h3>Notifications ({unread})</h3>
        {notifications.map((n) => (
          <div key={n.id} data-testid="notification" onClick={() => void markRead([n.id])}>{n.read ? "" : "● "}{n.title}</div>
        ))}
      </div>
      <div>
        <h3>Online</h3>
        {online.map((u) => <div key={u} data-testid="online">{u}</div>)}
      </div>
      <div>
        <h3>Reports <button onClick={() => void api("/api/reports", { method: "POST" })}>Run</button></h3>
        {jobs.map((j) => <div key={j.id} data-testid="job">{j.title}: {j.progress}%</div>)}
      </div>
    </aside>
  );
}

function App({ client, who }: { client: OrgpulseClient; who: string }) {
  const state = useConnectionState();
  return (
    <>
      <h2>Tasks <span className="state" data-testid="state" data-state={state}>{state}</span></h2>
      <p>Signed in as {who}.</p>
      <Board />
      <Sidebar />
    </>
  );
}

function Login({ done }: { done: () => void }) {
  const [user, setUser] = useState("");
  const [org, setOrg] = useState("acme");
  return (
    <form
      onSubmit={async (e) => {
        e.preventDefault();
        const { token } = await api<{ token: string }>("/api/login", { method: "POST", body: JSON.stringify({ user, org }) });
        sessionStorage.setItem(SESSION, token);
        done();
      }}
    >
      <input data-testid="login-user" value={user} onChange={(e) => setUser(e.target.value)} placeholder="user" />
      <input data-testid="login-org" value={org} onChange={(e) => setOrg(e.target.value)} placeholder="org" />
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
  if (!client) return <p>Connecting…</p>;
  const who = JSON.parse(atob(session.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
  return (
    <OrgpulseProvider client={client}>
      <App client={client} who={`${who.sub} (${who.org})`} />
    </OrgpulseProvider>
  );
}

createRoot(document.getElementById("root")!).render(<StrictMode><Root /></StrictMode>);
