-- Behaviour the credit score reads, counted from payments.events and billing.events.
ALTER TABLE profiles
    ADD COLUMN successful_payments  integer NOT NULL DEFAULT 0,
    ADD COLUMN on_time_repayments   integer NOT NULL DEFAULT 0,
    ADD COLUMN late_repayments      integer NOT NULL DEFAULT 0,
    ADD COLUMN days_overdue         integer NOT NULL DEFAULT 0;

-- One Huabei account per user; id_number and phone are unique across accounts (eligibility).
-- Reservations only succeed while used + reserved stays within credit_limit (a conditional
-- update), which keeps concurrent purchases within the line.
CREATE TABLE huabei_accounts (
    user_id        text PRIMARY KEY,
    status         text        NOT NULL CHECK (status IN ('active', 'frozen')),
    credit_limit   bigint      NOT NULL CHECK (credit_limit BETWEEN 50000 AND 5000000),
    used           bigint      NOT NULL DEFAULT 0 CHECK (used >= 0),
    reserved       bigint      NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    score          integer     NOT NULL,
    id_number      text        NOT NULL UNIQUE,
    phone          text        NOT NULL UNIQUE,
    activated_at   timestamptz NOT NULL,
    reviewed_at    timestamptz NOT NULL,
    on_time_since_review  integer NOT NULL DEFAULT 0,
    late_since_review     integer NOT NULL DEFAULT 0
);

-- Try/confirm/cancel of drawdowns, one per order.
CREATE TABLE reservations (
    order_id     text PRIMARY KEY,
    user_id      text        NOT NULL,
    amount       bigint      NOT NULL CHECK (amount > 0),
    installments integer     NOT NULL,
    -- refused: kept so that a re-sent ReserveCredit gets the same answer
    state        text        NOT NULL CHECK (state IN ('reserved', 'committed', 'cancelled', 'expired', 'refused')),
    reason_code  text,
    message      text,
    expires_at   timestamptz NOT NULL,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL
);
CREATE INDEX reservations_expiring ON reservations (expires_at) WHERE state = 'reserved';

-- Principal restored by refunds, once per refund.
CREATE TABLE restorations (
    order_id    text   NOT NULL,
    refund_key  text   NOT NULL,
    amount      bigint NOT NULL CHECK (amount > 0),
    PRIMARY KEY (order_id, refund_key)
);
