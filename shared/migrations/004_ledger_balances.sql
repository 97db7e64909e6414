-- Balances are derived from the immutable transfers. Only accounts that must never be
-- overdrawn (wallets) also keep running totals on their row, which the overdraft check locks;
-- shared accounts (bank, escrow, lender, revenue, ...) are touched by nearly every transfer, so
-- keeping totals on their rows would serialise every transaction of the service on one row.
CREATE INDEX ledger_transfers_by_debit ON ledger_transfers (debit_account);
CREATE INDEX ledger_transfers_by_credit ON ledger_transfers (credit_account);

CREATE VIEW ledger_balances AS
SELECT account AS id,
       sum(d_posted)::bigint AS debits_posted, sum(c_posted)::bigint AS credits_posted,
       sum(d_pending)::bigint AS debits_pending, sum(c_pending)::bigint AS credits_pending
FROM (
    SELECT debit_account AS account,
           CASE WHEN kind IN ('posted', 'post_pending') THEN amount ELSE 0 END AS d_posted,
           0::bigint AS c_posted,
           CASE kind WHEN 'pending' THEN amount WHEN 'posted' THEN 0 ELSE -amount END AS d_pending,
           0::bigint AS c_pending
    FROM ledger_transfers
    UNION ALL
    SELECT credit_account, 0::bigint,
           CASE WHEN kind IN ('posted', 'post_pending') THEN amount ELSE 0 END,
           0::bigint,
           CASE kind WHEN 'pending' THEN amount WHEN 'posted' THEN 0 ELSE -amount END
    FROM ledger_transfers
) moves
GROUP BY account;

-- Running totals are kept for no-overdraft accounts only from now on.
UPDATE ledger_accounts SET debits_posted = 0, credits_posted = 0, debits_pending = 0, credits_pending = 0
WHERE NOT no_overdraft;
