"""Escrow wiring: the escrow commands it consumes, its API and its auto-confirm timer."""
from __future__ import annotations

from functools import partial
from pathlib import Path

from services.escrow import api, handlers
from services.escrow.domain import FeeRates
from shared import topics
from shared.consumer import Subscription
from shared.runtime import Context, ServiceSpec



def subscriptions(ctx: Context) -> list[Subscription]:
    return [Subscription(topics.ESCROW_COMMANDS, {
        "HoldFunds": partial(handlers.hold_funds, ctx),
        "ShipOrder": partial(handlers.ship_order, ctx),
        "ConfirmOrder": partial(handlers.confirm_order, ctx, rates=ctx.deps),
        "CancelOrder": partial(handlers.cancel_order, ctx),
        "RefundOrder": partial(handlers.refund_order, ctx),
        "ClawbackSettled": partial(handlers.clawback_settled, ctx),
    }, batch_handlers={"HoldFunds": partial(handlers.holds, ctx)})]


async def auto_confirm_loop(ctx: Context) -> None:
    await handlers.auto_confirm_loop(ctx, ctx.deps)


# The merchant fee rates (ctx.deps), read once at start-up: a bad MERCHANT_FEE_*_PCT stops the
# service there with a one-line error, not at the first release.
SPEC = ServiceSpec(name="escrow", migrations=Path(__file__).parent / "migrations", routers=[api.router],
                   subscriptions=subscriptions, loops=[auto_confirm_loop], deps=lambda settings: FeeRates.from_env())
