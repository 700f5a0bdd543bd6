// The product's own PostgreSQL: tasks, and the orgpulse outbox (API.md "Outbox").
// Every change is written in ONE transaction with its outbox row, so orgpulse announces exactly
// the changes that committed: a rolled-back change never reaches a browser. The row names who may
// see it (`audience`) and its project's topic (`topics`).
import pg from "pg";
import { audienceOf, topicOf } from "./projects.mjs";

export const pool = new pg.Pool({ connectionString: process.env.DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/test" });

export async function migrate() {
  await pool.query(`
    CREATE TABLE IF NOT EXISTS tasks (
      id bigserial PRIMARY KEY, org_id text NOT NULL, project_id text NOT NULL DEFAULT 'general',
      title text NOT NULL, column_name text NOT NULL DEFAULT 'todo',
      updated_by text NOT NULL, updated_at timestamptz NOT NULL DEFAULT now());
    CREATE TABLE IF NOT EXISTS orgpulse_outbox (
      id bigserial PRIMARY KEY, org_id text NOT NULL, entity_type text NOT NULL,
      entity_id text NOT NULL, action text NOT NULL, data jsonb NOT NULL DEFAULT '{}',
      user_id text, actor text, created_at timestamptz NOT NULL DEFAULT now(),
      audience jsonb, topics text[]);
    -- a database from before projects had audiences and topics (orgpulse-server adds the
    -- outbox's columns at start too)
    ALTER TABLE orgpulse_outbox ADD COLUMN IF NOT EXISTS audience jsonb;
    ALTER TABLE orgpulse_outbox ADD COLUMN IF NOT EXISTS topics text[];
    UPDATE tasks SET project_id = 'general' WHERE project_id = 'default';`);
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

/** The outbox row announcing a change of `task` to those who may see its project (same
 * transaction as the change). */
export function announce(client, task, action, actor) {
  const audience = audienceOf(task.project_id);
  return client.query(
    `INSERT INTO orgpulse_outbox (org_id, entity_type, entity_id, action, data, actor, audience, topics)
     VALUES ($1, 'task', $2, $3, $4, $5, $6, $7)`,
    [task.org_id, String(task.id), action, JSON.stringify(taskJson(task)), actor, audience && JSON.stringify(audience), [topicOf(task.project_id)]],
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
