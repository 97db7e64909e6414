-- Huabei payments confirm the drawdown before escrow holds the money (saga state COMMITTING,
-- docs/design.md, Credit): a saga state the CHECK allows, and the due-saga index covers it, so
-- unanswered commits are re-sent.
ALTER TABLE payments DROP CONSTRAINT payments_saga_state_check;
ALTER TABLE payments ADD CONSTRAINT payments_saga_state_check
    CHECK (saga_state IN ('NEW', 'RISK_CHECK', 'REVIEW', 'RESERVING', 'COMMITTING', 'FUNDING', 'HOLDING', 'COMPLETED',
                          'FAILED'));
DROP INDEX payments_saga_due;
CREATE INDEX payments_saga_due ON payments (next_action_at)
    WHERE saga_state IN ('RISK_CHECK', 'REVIEW', 'RESERVING', 'COMMITTING', 'FUNDING', 'HOLDING');
-- Huabei payments caught in HOLDING by the upgrade came the old way (hold first, commit on
-- FundsHeld), so nothing would commit their drawdown now: they go back to COMMITTING, and the
-- worker sends CommitCredit. The lender's transfer and HoldFunds that follow are idempotent (the
-- same transfer id; escrow answers a hold it has again), so they finish the new way.
UPDATE payments SET saga_state = 'COMMITTING' WHERE saga_state = 'HOLDING' AND payment_method = 'huabei';
