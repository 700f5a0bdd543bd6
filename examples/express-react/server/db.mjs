// The product's own PostgreSQL: projects and tasks, and the orgpulse outbox (API.md "Outbox").
// Every change is written in ONE transaction with its outbox row, so orgpulse announces exactly
// the changes that committed: a rolled-back change never reaches a browser.
import pg from "pg";

export const pool = new pg.Pool({ connectionString: process.env.DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/test" });

export async function migrate() {
  await pool.query(`
    CREATE TABLE IF NOT EXISTS projects (
      id text PRIMARY KEY, org_id text NOT NULL, name text NOT NULL);
    CREATE TABLE IF NOT EXISTS tasks (
      id bigserial PRIMARY KEY, org_id text NOT NULL, project_id text NOT NULL,
      title text NOT NULL, column_name text NOT NULL DEFAULT 'todo',
      updated_by text NOT NULL, updated_at timestamptz NOT NULL DEFAULT now());
    CREATE TABLE IF NOT EXISTS orgpulse_outbox (
      id bigserial PRIMARY KEY, org_id text NOT NULL, entity_type text NOT NULL,
      entity_id text NOT NULL, action text NOT NULL, data jsonb NOT NULL DEFAULT '{}',
      user_id text, actor text, created_at timestamptz NOT NULL DEFAULT now());`);
}

/** Runs `fn(client)` in a transaction: COMMIT when it returns, ROLLBACK when it throws. */
export async function inTransaction(fn) {
  const client = await pool.connect();
  try {
    await client.query("BEGIN");
    const result = await fn(client);
    await client.query("COMMIT");
    return result;
  } catch (err) {
    await client.query("ROLLBACK");
    throw err;
  } finally {
    client.release();
  }
}

/** The outbox row announcing a change of `task` (same transaction as the change). */
export function announce(client, task, action, actor) {
  return client.query(
    "INSERT INTO orgpulse_outbox (org_id, entity_type, entity_id, action, data, actor) VALUES ($1, 'task', $2, $3, $4, $5)",
    [task.org_id, String(task.id), action, JSON.stringify(taskJson(task)), actor],
  );
}

export const taskJson = (t) => ({
  id: String(t.id),
  projectId: t.project_id,
  title: t.title,
  column: t.column_name,
  updatedBy: t.updated_by,
  updatedAt: t.updated_at.toISOString(),
});
