"""Credit wiring: what it consumes, its API, its loops."""
from __future__ import annotations

from functools import partial
from pathlib import Path

from services.credit import api, handlers
from shared import topics
from shared.consumer import Subscription
from shared.runtime import Context, ServiceSpec


def subscriptions(ctx: Context) -> list[Subscription]:
    return [Subscription(topics.USERS, {"UserRegistered": partial(handlers.user_registered, ctx)})]


SPEC = ServiceSpec(name="credit", migrations=Path(__file__).parent / "migrations", routers=[api.router],
                   subscriptions=subscriptions)
