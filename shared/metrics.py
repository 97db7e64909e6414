"""Prometheus metrics shared by every service (served at /metrics)."""
from prometheus_client import Counter, Gauge, Histogram

CONSUMED = Counter("danbao_events_consumed_total", "Records consumed, by outcome",
                   ["topic", "outcome"])  # outcome: applied | duplicate | dead_letter | ignored
HANDLER_SECONDS = Histogram("danbao_batch_seconds", "Time to apply one consumed batch", ["topic"])
OUTBOX_PUBLISHED = Counter("danbao_outbox_published_total", "Outbox rows published to Kafka", ["topic"])
OUTBOX_BACKLOG = Gauge("danbao_outbox_backlog", "Outbox rows not yet published (sampled each minute)")
HTTP_REQUESTS = Counter("danbao_http_requests_total", "HTTP requests", ["method", "route", "status"])
SET_PATH = Counter("danbao_set_path_records_total",
                   "Records of the hot event types, by how they were applied: as a set, or one by one",
                   ["topic", "type", "path"])  # path: set | one_by_one
PARKED_EXPIRED = Counter("danbao_parked_events_expired_total",
                         "Upstream order events whose order never arrived within PARKED_EVENT_TTL_SECONDS", ["type"])
