"""Gateway wiring: what it consumes, its API, its loops."""
from __future__ import annotations

from functools import partial
from pathlib import Path

from services.gateway import api, handlers
from shared import topics
from shared.consumer import Subscription
from shared.events import SCHEMAS
from shared.runtime import Context, ServiceSpec


def subscriptions(ctx: Context) -> list[Subscription]:
    order_event = partial(handlers.order_event, ctx)
    return [Subscription(topics.ORDERS, {t: order_event for t in SCHEMAS[topics.ORDERS]})]


SPEC = ServiceSpec(name="gateway", migrations=Path(__file__).parent / "migrations", routers=[api.router],
                   subscriptions=subscriptions)
