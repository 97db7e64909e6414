-- Closed sets the first migrations left to the code (services/gateway/domain.py: PaymentMethod,
-- SagaState, PaymentStatus, RiskDecision, OrderEventState; shared/events.py OrderPlaced), so that
-- a typo in a write is refused by the database rather than stored.
ALTER TABLE payments
    ADD CONSTRAINT payments_method_check CHECK (payment_method IN ('balance', 'bank_card', 'huabei')),
    ADD CONSTRAINT payments_saga_state_check
    CHECK (saga_state IN ('NEW', 'RISK_CHECK', 'REVIEW', 'RESERVING', 'FUNDING', 'HOLDING', 'COMPLETED', 'FAILED')),
    ADD CONSTRAINT payments_status_check
    CHECK (status IN ('PENDING', 'FAILED', 'HELD', 'RELEASED', 'REFUNDED', 'PARTIALLY_REFUNDED')),
    ADD CONSTRAINT payments_risk_decision_check CHECK (risk_decision IN ('approve', 'reject', 'review')),
    ADD CONSTRAINT payments_currency_check CHECK (currency = 'CNY'),
    ADD CONSTRAINT payments_installments_check CHECK (installments IN (1, 3, 6, 9, 12));
ALTER TABLE order_events
    ADD CONSTRAINT order_events_type_check
    CHECK (type IN ('OrderPlaced', 'OrderConfirmed', 'OrderShipped', 'OrderCancelled', 'RefundRequested')),
    ADD CONSTRAINT order_events_state_check
    CHECK (state IN ('applied', 'duplicate', 'forwarded', 'pending', 'cancel_in_flight', 'parked', 'released',
                     'rejected', 'ignored', 'expired'));
