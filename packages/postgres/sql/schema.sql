-- @idemkit/postgres schema (the same DDL that store.migrate() runs).
-- For migration tools: run this once. It creates the table in the first schema of your
-- search_path; rename "idempotency_keys" (and the index) if you pass another `table`.
CREATE TABLE IF NOT EXISTS "idempotency_keys" (
  key              text COLLATE "C" PRIMARY KEY,
  fingerprint      text,
  state            text NOT NULL CHECK (state IN ('in_progress', 'completed')),
  lease_token      text,
  lease_expires_at timestamptz,
  response_status  integer,
  response_headers jsonb,
  response_body    bytea,
  created_at       timestamptz NOT NULL DEFAULT now(),
  expires_at       timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS "idempotency_keys_expires_at_idx" ON "idempotency_keys" (expires_at);
