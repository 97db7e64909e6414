-- The payment saga lives on the payment row: saga_state is where the orchestration stands,
-- next_action_at when the saga worker looks at it again (retry or deadline), deadline_at when
-- the current step gives up. status is the public view (docs/contract.md §6).
ALTER TABLE payments
    ADD COLUMN payment_id        text,
    ADD COLUMN saga_state        text        NOT NULL DEFAULT 'NEW',
    ADD COLUMN next_action_at    timestamptz,
    ADD COLUMN deadline_at       timestamptz,
    ADD COLUMN attempts          integer     NOT NULL DEFAULT 0,
    ADD COLUMN cancel_requested  boolean     NOT NULL DEFAULT false,
    ADD COLUMN message           text,
    ADD COLUMN refunded          bigint      NOT NULL DEFAULT 0 CHECK (refunded >= 0),
    ADD COLUMN released_gross    bigint,
    ADD COLUMN fee_amount        bigint,
    ADD COLUMN net_amount        bigint,
    ADD CONSTRAINT refunded_at_most_paid CHECK (refunded <= amount);
CREATE INDEX payments_saga_due ON payments (next_action_at) WHERE saga_state IN ('FUNDING', 'HOLDING');

-- Upstream events that arrived before the payment completed wait here (state 'pending').
ALTER TABLE order_events
    ADD COLUMN seq    bigserial,
    ADD COLUMN state  text NOT NULL DEFAULT 'applied';
CREATE INDEX order_events_pending ON order_events (order_id, seq) WHERE state = 'pending';

-- One outcome per refund_id, whatever the number of RefundRequested events carrying it.
CREATE TABLE refund_requests (
    order_id   text NOT NULL,
    refund_id  text NOT NULL,
    PRIMARY KEY (order_id, refund_id)
);

CREATE TABLE withdrawals (
    user_id          text        NOT NULL,
    idempotency_key  text        NOT NULL,
    amount           bigint      NOT NULL CHECK (amount > 0),
    fee              bigint      NOT NULL CHECK (fee >= 0),
    created_at       timestamptz NOT NULL,
    PRIMARY KEY (user_id, idempotency_key)
);
