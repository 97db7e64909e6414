-- A refund carries a reason code exactly when it was rejected (services/escrow/domain.py, Refund).
ALTER TABLE refunds ADD CONSTRAINT refunds_reason_iff_rejected CHECK ((state = 'rejected') = (reason_code IS NOT NULL));
