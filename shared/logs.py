"""Structured JSON logs, one object per line, with the service, event and correlation ids (and,
tracing on, the trace id: shared/tracing.py). Library logs (aiokafka, uvicorn) go through the
same JSON renderer."""
from __future__ import annotations

import logging
import sys

import structlog

from shared import tracing

_PRE_CHAIN = [
    structlog.contextvars.merge_contextvars,
    tracing.add_set_run_ids,  # lines about one order of a set-based batch: its correlation_id
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, structlog.processors.JSONRenderer()],
        foreign_pre_chain=_PRE_CHAIN))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("aiokafka", "kafka", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    structlog.configure(
        processors=[*_PRE_CHAIN, structlog.processors.format_exc_info,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)
