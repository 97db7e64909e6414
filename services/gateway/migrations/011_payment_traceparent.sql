-- Tracing (shared/tracing.py): the W3C traceparent of the order's OrderPlaced record, kept so that
-- the steps the saga worker drives later (card charge, re-sent commands, timeouts) join the
-- order's trace. NULL when tracing was off: nothing is kept, nothing is resumed.
ALTER TABLE payments ADD COLUMN traceparent text;
