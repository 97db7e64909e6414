CREATE TABLE users (
    user_id             text PRIMARY KEY,
    full_name           text        NOT NULL,
    birth_date          date,
    phone               text,
    id_number           text,
    real_name_verified  boolean     NOT NULL,
    registered_at       timestamptz NOT NULL
);

-- One row per accepted OrderPlaced: the payment the saga drives to a terminal state.
CREATE TABLE payments (
    order_id           text PRIMARY KEY,
    placed_event_id    text        NOT NULL,
    buyer_id           text        NOT NULL,
    seller_id          text        NOT NULL,
    amount             bigint      NOT NULL CHECK (amount > 0),
    currency           text        NOT NULL,
    payment_method     text        NOT NULL,
    card_token         text,
    installments       integer     NOT NULL,
    auto_confirm_days  integer     NOT NULL,
    status             text        NOT NULL,
    reason_code        text,
    accepted_at        timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL
);

-- Every accepted upstream order event, kept so that events arriving before the payment
-- completes (confirm, cancel, refund) are applied when it does, never dropped.
CREATE TABLE order_events (
    event_id     text PRIMARY KEY,
    order_id     text        NOT NULL,
    type         text        NOT NULL,
    data         jsonb       NOT NULL,
    received_at  timestamptz NOT NULL
);
CREATE INDEX order_events_by_order ON order_events (order_id, received_at);
