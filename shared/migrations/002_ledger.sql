-- Double-entry ledger, one per service schema (TigerBeetle's model): accounts with posted and
-- pending totals, and immutable transfers. A pending transfer reserves money; a later transfer
-- posts or voids it. Nothing is edited: balances only move by new transfers.
CREATE TABLE ledger_accounts (
    id               text PRIMARY KEY,
    -- Wallets may never be overdrawn: available = credits_posted - debits_posted - debits_pending >= 0.
    no_overdraft     boolean NOT NULL DEFAULT false,
    debits_posted    bigint  NOT NULL DEFAULT 0 CHECK (debits_posted >= 0),
    credits_posted   bigint  NOT NULL DEFAULT 0 CHECK (credits_posted >= 0),
    debits_pending   bigint  NOT NULL DEFAULT 0 CHECK (debits_pending >= 0),
    credits_pending  bigint  NOT NULL DEFAULT 0 CHECK (credits_pending >= 0),
    CHECK (NOT no_overdraft OR credits_posted - debits_posted - debits_pending >= 0)
);

CREATE TABLE ledger_transfers (
    id              text PRIMARY KEY,  -- deterministic from its cause: a retry is recognised
    debit_account   text        NOT NULL REFERENCES ledger_accounts (id),
    credit_account  text        NOT NULL REFERENCES ledger_accounts (id),
    amount          bigint      NOT NULL CHECK (amount > 0),
    -- posted | pending | post_pending (posts pending_id) | void_pending (voids pending_id)
    kind            text        NOT NULL CHECK (kind IN ('posted', 'pending', 'post_pending', 'void_pending')),
    pending_id      text REFERENCES ledger_transfers (id),
    code            text        NOT NULL,  -- why the money moved: topup, payment, release, fee, refund, ...
    order_id        text,
    created_at      timestamptz NOT NULL,
    CHECK ((kind IN ('post_pending', 'void_pending')) = (pending_id IS NOT NULL)),
    CHECK (debit_account <> credit_account)
);
CREATE UNIQUE INDEX ledger_pending_resolved_once ON ledger_transfers (pending_id) WHERE pending_id IS NOT NULL;
CREATE INDEX ledger_transfers_by_order ON ledger_transfers (order_id) WHERE order_id IS NOT NULL;
