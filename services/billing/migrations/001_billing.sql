-- Billing: Huabei purchases turned into cycles, statements, installment plans, penalties and
-- repayments. Amounts are bigint fen. Periods (cycles) are 'YYYY-MM' text.
--
-- The unit everything is owed on is an ITEM: a statement's own item (the cycle's purchases not in
-- installments; while the cycle is open it is the "open_cycle" item) or one period of an
-- installment plan. A statement (as the API shows it) is the sum of the items its period carries.

-- One row per user with a Huabei drawdown: the per-user lock every write takes, and the timer.
CREATE TABLE accounts (
    user_id        text PRIMARY KEY,
    -- The issuing cursor: the next cycle whose statement has not been issued yet. It only moves
    -- forward, in the transaction that issues the statement before it.
    next_period    text        NOT NULL,
    -- The timer: the next moment something falls due for this user (a statement to issue, an item
    -- becoming overdue, an overdue day to charge). Scanned with FOR UPDATE SKIP LOCKED.
    next_check_at  timestamptz NOT NULL,
    overdue        boolean     NOT NULL DEFAULT false,  -- AccountOverdue sent, AccountSettled not yet
    days_overdue   integer     NOT NULL DEFAULT 0,      -- the last days_overdue reported in this episode
    created_at     timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL
);
CREATE INDEX accounts_next_check ON accounts (next_check_at);

-- Issued statements, exactly one per (user, period). A cycle that is still open has no row (the
-- API derives it from its items); a cycle with nothing in it is never issued.
CREATE TABLE statements (
    statement_id  text PRIMARY KEY,
    user_id       text        NOT NULL REFERENCES accounts (user_id),
    period        text        NOT NULL,
    issued_on     date        NOT NULL,
    due_on        date        NOT NULL,
    issued_at     timestamptz NOT NULL,   -- when the timer (or a handler's catch-up) issued it
    converted_at  timestamptz,            -- converted to installments
    plan_id       text,
    UNIQUE (user_id, period)
);

-- Every committed Huabei drawdown, once per order.
CREATE TABLE purchases (
    order_id      text PRIMARY KEY,
    user_id       text        NOT NULL REFERENCES accounts (user_id),
    amount        bigint      NOT NULL CHECK (amount > 0),
    installments  integer     NOT NULL CHECK (installments IN (1, 3, 6, 9, 12)),
    committed_at  timestamptz NOT NULL,
    period        text        NOT NULL,   -- the cycle of committed_at
    plan_id       text,                   -- installments at purchase
    refunded      bigint      NOT NULL DEFAULT 0 CHECK (refunded >= 0 AND refunded <= amount)
);
CREATE INDEX purchases_by_user ON purchases (user_id);

-- Installment plans: chosen at purchase (plan_id 'P-<order_id>') or by converting a statement
-- ('C-<statement_id>'). The periods are items.
CREATE TABLE plans (
    plan_id       text PRIMARY KEY,
    user_id       text        NOT NULL REFERENCES accounts (user_id),
    source        text        NOT NULL CHECK (source IN ('purchase', 'conversion')),
    order_id      text,
    statement_id  text,
    periods       integer     NOT NULL CHECK (periods IN (3, 6, 9, 12)),
    principal     bigint      NOT NULL CHECK (principal > 0),   -- as created (refunds change the items)
    fee           bigint      NOT NULL CHECK (fee >= 0),
    created_at    timestamptz NOT NULL
);

CREATE TABLE items (
    item_id          text PRIMARY KEY,   -- a statement's own item: the statement_id; a plan period: '<plan_id>-<k>'
    user_id          text        NOT NULL REFERENCES accounts (user_id),
    kind             text        NOT NULL CHECK (kind IN ('statement', 'installment')),
    period           text        NOT NULL,   -- the cycle whose statement carries it
    due_on           date        NOT NULL,
    plan_id          text REFERENCES plans (plan_id),
    period_no        integer,
    billed           boolean     NOT NULL DEFAULT false,  -- its statement has been issued
    principal        bigint      NOT NULL DEFAULT 0 CHECK (principal >= 0),
    fee              bigint      NOT NULL DEFAULT 0 CHECK (fee >= 0),
    penalty          bigint      NOT NULL DEFAULT 0 CHECK (penalty >= 0),
    principal_paid   bigint      NOT NULL DEFAULT 0 CHECK (principal_paid >= 0),
    fee_paid         bigint      NOT NULL DEFAULT 0 CHECK (fee_paid >= 0),
    penalty_paid     bigint      NOT NULL DEFAULT 0 CHECK (penalty_paid >= 0),
    fee_accrued      boolean     NOT NULL DEFAULT false,  -- the fee is owed (and booked as revenue)
    penalty_through  date,                                -- the last overdue day charged (the penalty cursor)
    CHECK (principal_paid <= principal AND fee_paid <= fee AND penalty_paid <= penalty),
    CHECK ((kind = 'installment') = (plan_id IS NOT NULL AND period_no IS NOT NULL)),
    CHECK (kind = 'installment' OR fee = 0),
    UNIQUE (plan_id, period_no)
);
CREATE INDEX items_by_user_period ON items (user_id, period);

-- One row per (item, overdue day) charged: a restart or a second process never charges a day twice.
CREATE TABLE penalty_charges (
    item_id     text        NOT NULL REFERENCES items (item_id),
    day         date        NOT NULL,
    principal   bigint      NOT NULL,   -- the unpaid principal at the end of that day
    amount      bigint      NOT NULL,
    charged_at  timestamptz NOT NULL,
    PRIMARY KEY (item_id, day)
);

-- Refunds of Huabei purchases (DrawdownRefunded), once per (order, refund_key). A refund that
-- arrives before its purchase waits (applied = false) and is applied when the purchase arrives.
CREATE TABLE refunds (
    order_id           text        NOT NULL,
    refund_key         text        NOT NULL,
    user_id            text        NOT NULL,
    amount             bigint      NOT NULL CHECK (amount > 0),
    refunded_at        timestamptz NOT NULL,
    applied            boolean     NOT NULL DEFAULT false,
    principal_reduced  bigint      NOT NULL DEFAULT 0,
    fee_waived         bigint      NOT NULL DEFAULT 0,
    overpayment        bigint      NOT NULL DEFAULT 0,
    applied_at         timestamptz,
    PRIMARY KEY (order_id, refund_key)
);

-- Repayments, once per repayment_id: a redelivery re-emits the stored RepaymentAllocated.
CREATE TABLE repayments (
    repayment_id  text PRIMARY KEY,
    user_id       text        NOT NULL,
    amount        bigint      NOT NULL CHECK (amount > 0),
    requested_at  timestamptz NOT NULL,
    applied_at    timestamptz NOT NULL,
    principal     bigint      NOT NULL,
    fee           bigint      NOT NULL,
    penalty       bigint      NOT NULL,
    overpayment   bigint      NOT NULL,
    on_time       boolean     NOT NULL,
    allocated     jsonb       NOT NULL,   -- the RepaymentAllocated data, as emitted
    CHECK (principal + fee + penalty + overpayment = amount)
);
CREATE INDEX repayments_by_user ON repayments (user_id);
