-- The audit trail of operator actions (docs/design.md, "Audit trail"): every /admin/* call that
-- may change something, written before it runs (status NULL) and completed with its outcome.
-- Never a token (token_id is its fingerprint), never personal data (the body is a summary).
CREATE TABLE audit_log (
    id           bigserial   PRIMARY KEY,
    at           timestamptz NOT NULL,        -- real time, not the test clock
    operator     text,                        -- the caller's X-Operator header, if any
    token_id     text,                        -- op-<fingerprint>, user:<id>, or null (no valid token)
    method       text        NOT NULL,
    path         text        NOT NULL,
    body         jsonb,                       -- summary: secrets and personal data masked
    status       integer,                     -- the HTTP status answered; null: no answer (crash)
    finished_at  timestamptz
);
