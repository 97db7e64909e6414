-- The shared runtime's tables, created in each service's own schema.

-- Transactional outbox: rows written in the same transaction as the state change that emits
-- them; the relay publishes them in id order and stamps published_at.
CREATE TABLE outbox (
    id             bigserial PRIMARY KEY,
    topic          text        NOT NULL,
    key            bytea,
    value          bytea,
    header_keys    text[]      NOT NULL DEFAULT '{}',
    header_values  bytea[]     NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now(),
    published_at   timestamptz
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;

-- Inbox: every applied event id (and every dead-lettered record position), recorded in the
-- transaction of its effect, so a redelivery is a no-op.
CREATE TABLE inbox (
    message_key  text PRIMARY KEY,
    topic        text        NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now()
);
