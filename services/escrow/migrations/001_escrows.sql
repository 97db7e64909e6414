-- One row per order escrow has heard of. The amounts are kept on the row so that a decision
-- needs one locked row: held = amount - refunded_from_hold - released_gross.
CREATE TABLE escrows (
    order_id            text PRIMARY KEY,
    status              text        NOT NULL CHECK (status IN ('HELD', 'RELEASED', 'REFUNDED', 'CANCELLED')),
    -- NULL on a CANCELLED marker (a cancel that arrived before any hold).
    payment_id          text,
    buyer_id            text,
    seller_id           text,
    payment_method      text,
    installments        integer     NOT NULL DEFAULT 1,
    amount              bigint      NOT NULL DEFAULT 0 CHECK (amount >= 0),
    auto_confirm_days   integer     NOT NULL DEFAULT 0,
    auto_confirm_at     timestamptz,  -- the auto-confirm timer, set by the first shipment
    refunded_from_hold  bigint      NOT NULL DEFAULT 0 CHECK (refunded_from_hold >= 0),
    clawed_back         bigint      NOT NULL DEFAULT 0 CHECK (clawed_back >= 0),
    pending_clawbacks   bigint      NOT NULL DEFAULT 0 CHECK (pending_clawbacks >= 0),
    released_gross      bigint      NOT NULL DEFAULT 0 CHECK (released_gross >= 0),
    fee_amount          bigint      NOT NULL DEFAULT 0 CHECK (fee_amount >= 0),
    net_amount          bigint      NOT NULL DEFAULT 0 CHECK (net_amount >= 0),
    released_at         timestamptz,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL,
    CHECK (refunded_from_hold + released_gross <= amount),
    -- The sum rule (docs/contract.md §3), enforced by the database too.
    CHECK (refunded_from_hold + clawed_back + pending_clawbacks <= amount),
    CHECK (fee_amount + net_amount = released_gross)
);
-- What the auto-confirm loop scans.
CREATE INDEX escrows_auto_confirm_due ON escrows (auto_confirm_at) WHERE status = 'HELD' AND auto_confirm_at IS NOT NULL;

-- Every refund decided: from the hold (incl. a cancel's, refund_id NULL) or clawed back after
-- release. A refund_id is decided once per order, whatever its outcome.
CREATE TABLE refunds (
    id           bigserial PRIMARY KEY,
    order_id     text        NOT NULL,
    refund_id    text,
    amount       bigint      NOT NULL CHECK (amount >= 0),
    kind         text        NOT NULL CHECK (kind IN ('from_hold', 'clawback')),
    state        text        NOT NULL CHECK (state IN ('completed', 'pending', 'rejected')),
    reason_code  text,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    UNIQUE (order_id, refund_id)  -- NULLs (cancels) never collide
);
