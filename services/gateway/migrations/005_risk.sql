-- The risk engine's decision on each payment (visible in GET /v1/payments/{order_id}), and the
-- saga states that wait for it (RISK_CHECK) or for an operator (REVIEW).
ALTER TABLE payments
    ADD COLUMN risk_decision  text,
    ADD COLUMN risk_rules     text[],
    ADD COLUMN risk_message   text;
DROP INDEX payments_saga_due;
CREATE INDEX payments_saga_due ON payments (next_action_at)
    WHERE saga_state IN ('RISK_CHECK', 'REVIEW', 'RESERVING', 'FUNDING', 'HOLDING');
