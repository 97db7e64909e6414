-- Rows a consumer's transaction writes are handed to the producer by the consumer itself right
-- after its commit (shared/outbox.py, Relay.hand_off); the relay publishes such a row only if it
-- is still unpublished a few seconds later (the process died before sending it, or Kafka
-- refused it).
ALTER TABLE outbox ADD COLUMN handed_off boolean NOT NULL DEFAULT false;
