-- Huabei repayments: the money is taken first (into the ledger account `repayments`), then
-- billing allocates it and the gateway moves each part where it belongs.
CREATE TABLE repayments (
    repayment_id  text PRIMARY KEY,
    user_id       text        NOT NULL,
    amount        bigint      NOT NULL CHECK (amount > 0),
    source        text        NOT NULL CHECK (source IN ('balance', 'bank_card')),
    state         text        NOT NULL CHECK (state IN ('requested', 'allocated')),
    allocation    jsonb,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL
);
