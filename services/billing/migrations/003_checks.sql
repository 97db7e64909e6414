-- Constraints the first migration left to the code (docs/design.md, "Billing").
ALTER TABLE accounts
    ADD CONSTRAINT accounts_next_period_is_a_period CHECK (next_period ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'),
    ADD CONSTRAINT accounts_days_overdue_check CHECK (days_overdue >= 0 AND (overdue OR days_overdue = 0));
ALTER TABLE statements
    ADD CONSTRAINT statements_period_is_a_period CHECK (period ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'),
    ADD CONSTRAINT statements_due_after_issue CHECK (due_on >= issued_on),
    ADD CONSTRAINT statements_converted_with_a_plan CHECK ((converted_at IS NULL) = (plan_id IS NULL));
ALTER TABLE purchases ADD CONSTRAINT purchases_period_is_a_period CHECK (period ~ '^[0-9]{4}-(0[1-9]|1[0-2])$');
ALTER TABLE items ADD CONSTRAINT items_period_is_a_period CHECK (period ~ '^[0-9]{4}-(0[1-9]|1[0-2])$');
ALTER TABLE penalty_charges ADD CONSTRAINT penalty_charges_amounts_check CHECK (principal >= 0 AND amount >= 0);
ALTER TABLE refunds
    ADD CONSTRAINT refunds_amounts_check CHECK (principal_reduced >= 0 AND fee_waived >= 0 AND overpayment >= 0),
    ADD CONSTRAINT refunds_applied_at CHECK (applied = (applied_at IS NOT NULL));
ALTER TABLE repayments
    ADD CONSTRAINT repayments_amounts_check CHECK (principal >= 0 AND fee >= 0 AND penalty >= 0 AND overpayment >= 0);
