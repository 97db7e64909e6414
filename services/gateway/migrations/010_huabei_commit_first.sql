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
