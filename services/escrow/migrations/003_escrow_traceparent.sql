-- Tracing (shared/tracing.py): the W3C traceparent of the HoldFunds record that created the hold,
-- kept so that its auto-confirm release, driven later by the timer, joins the order's trace.
-- NULL when tracing was off: nothing is kept, nothing is resumed.
ALTER TABLE escrows ADD COLUMN traceparent text;
