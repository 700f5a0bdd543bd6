// The example product's backend: its own login, its projects (one private to a group) and tasks,
// every change written with its orgpulse_outbox row in one transaction, a report worker, and the
// built client.
import express from "express";
import { mint, requireUser } from "./auth.mjs";
import { announce, inTransaction, migrate, pool, taskJson } from "./db.mjs";
import { visibleProject, visibleProjects } from "./projects.mjs";
import { runReport } from "./worker.mjs";

const COLUMNS = ["todo", "doing", "done"];
await migrate();
const app = express();
app.use(express.json());
app.use(express.static(new URL("../public", import.meta.url).pathname));

// demo login: any user name in any org, on the launch team or not (a real product checks a
// password here and knows its users' teams)
app.post("/api/login", (req, res) => {
  const { user, org, launchTeam } = req.body ?? {};
  if (!/^[a-z0-9_-]{1,32}$/.test(user ?? "") || !/^[a-z0-9_-]{1,32}$/.test(org ?? "")) {
    return res.status(400).json({ error: "user and org: 1-32 of [a-z0-9_-]" });
  }
  res.json({ token: mint(user, org, { groups: launchTeam ? ["launch"] : [] }) });
});

// where the browser finds orgpulse (started with --cors-origin for this app's origin)
app.get("/api/config", (_req, res) => res.json({ orgpulseUrl: process.env.ORGPULSE_PUBLIC_URL ?? "http://127.0.0.1:8080" }));

// a fresh token for the SDK's getToken (the session token renews itself here)
app.get("/api/token", requireUser, (req, res) =>
  res.json({ token: mint(req.user.sub, req.user.org, { groups: req.user.groups ?? [] }) }),
);

app.get("/api/projects", requireUser, (req, res) => res.json(visibleProjects(req.user)));

// a project's tasks; a private project is 404 to those outside its group, as its events never reach them
app.get("/api/projects/:project/tasks", requireUser, async (req, res) => {
  if (!visibleProject(req.user, req.params.project)) return res.status(404).json({ error: "no such project" });
  const { rows } = await pool.query("SELECT * FROM tasks WHERE org_id = $1 AND project_id = $2 ORDER BY id", [
    req.user.org,
    req.params.project,
  ]);
  res.json(rows.map(taskJson));
});

app.post("/api/projects/:project/tasks", requireUser, async (req, res) => {
  if (!visibleProject(req.user, req.params.project)) return res.status(404).json({ error: "no such project" });
  const title = String(req.body?.title ?? "").trim();
  if (!title) return res.status(400).json({ error: "title required" });
  const task = await inTransaction(async (db) => {
    const { rows } = await db.query(
      "INSERT INTO tasks (org_id, project_id, title, updated_by) VALUES ($1, $2, $3, $4) RETURNING *",
      [req.user.org, req.params.project, title, req.user.sub],
    );
    await announce(db, rows[0], "created", req.user.sub);
    return rows[0];
  });
  res.status(201).json(taskJson(task));
});

// moves a task; `?fail=1` fails after both writes, so the transaction (and its outbox row) rolls back
app.patch("/api/tasks/:id", requireUser, async (req, res) => {
  const column = req.body?.column;
  if (!COLUMNS.includes(column)) return res.status(400).json({ error: `column: one of ${COLUMNS}` });
  try {
    const task = await inTransaction(async (db) => {
      const { rows } = await db.query(
        "UPDATE tasks SET column_name = $1, updated_by = $2, updated_at = now() WHERE id = $3 AND org_id = $4 AND project_id = ANY($5) RETURNING *",
        [column, req.user.sub, req.params.id, req.user.org, visibleProjects(req.user).map((p) => p.id)],
      );
      if (!rows[0]) return null;
      await announce(db, rows[0], "moved", req.user.sub);
      if (req.query.fail) throw new Error("failed on purpose after writing: rolled back");
      return rows[0];
    });
    if (!task) return res.status(404).json({ error: "no such task" });
    res.json(taskJson(task));
  } catch (err) {
    res.status(500).json({ error: err.message });
  }
});

app.post("/api/reports", requireUser, async (req, res) => {
  const jobId = runReport(req.user.org, req.user.sub, `report for ${req.user.sub}`);
  res.status(202).json({ started: true });
  await jobId.catch((err) => console.error("report worker:", err));
});

const port = Number(process.env.PORT ?? 3000);
app.listen(port, "127.0.0.1", () => console.log(`example product on http://127.0.0.1:${port}/`));
