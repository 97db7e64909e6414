-- Tracing (shared/tracing.py): the W3C traceparent of the ReserveCredit record that made the
-- reservation, kept so that its expiry, driven later by the timer, joins the order's trace.
-- NULL when tracing was off: nothing is kept, nothing is resumed.
ALTER TABLE reservations ADD COLUMN traceparent text;
