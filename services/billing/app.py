"""Billing wiring: the user ids it consumes from users.events, the drawdowns and refunds from
credit.events, the repayments from billing.commands, its API and its timer (statements,
penalties, freezing)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from services.billing import api, handlers
from services.billing.domain import BillingRules
from shared import topics
from shared.consumer import Subscription
from shared.runtime import Context, ServiceSpec


@dataclass(frozen=True)
class Deps:
    rules: BillingRules


def subscriptions(ctx: Context) -> list[Subscription]:
    # CreditReserved / CreditRefused have no handler: accepted and ignored.
    return [
        Subscription(topics.USERS, {"UserRegistered": partial(handlers.user_registered, ctx)}),
        Subscription(topics.CREDIT_EVENTS, {
            "DrawdownCommitted": partial(handlers.drawdown_committed, ctx),
            "DrawdownRefunded": partial(handlers.drawdown_refunded, ctx)}),
        Subscription(topics.BILLING_COMMANDS, {"ApplyRepayment": partial(handlers.apply_repayment, ctx)}),
    ]


# BillingRules.from_env raises on a bad setting: the service stops at start-up, not at the first bill.
SPEC = ServiceSpec(name="billing", migrations=Path(__file__).parent / "migrations", routers=[api.router],
                   subscriptions=subscriptions, loops=[handlers.timer_loop],
                   deps=lambda settings: Deps(rules=BillingRules.from_env(business_tz=settings.zone)))
