-- Huabei payments reserve credit first (saga state RESERVING): the due-saga index covers it.
DROP INDEX payments_saga_due;
CREATE INDEX payments_saga_due ON payments (next_action_at) WHERE saga_state IN ('RESERVING', 'FUNDING', 'HOLDING');
