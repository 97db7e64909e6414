-- Upstream events for an order the gateway has not seen yet (OrderShipped, OrderConfirmed
-- before their OrderPlaced) wait here in state 'parked' until the order arrives, or expire.
CREATE INDEX order_events_parked ON order_events (received_at) WHERE state = 'parked';
