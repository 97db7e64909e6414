-- Constraints the first migrations left to the code: the installment plans a reservation may
-- carry, a reason exactly for a refusal (services/credit/domain.py, ReservationState), and
-- behaviour counts that never go below zero.
ALTER TABLE reservations
    ADD CONSTRAINT reservations_installments_check CHECK (installments IN (1, 3, 6, 9, 12)),
    ADD CONSTRAINT reservations_reason_iff_refused CHECK ((state = 'refused') = (reason_code IS NOT NULL));
ALTER TABLE profiles
    ADD CONSTRAINT profiles_behaviour_check
    CHECK (successful_payments >= 0 AND on_time_repayments >= 0 AND late_repayments >= 0 AND days_overdue >= 0);
