"""Credit wiring: what it consumes, its API, its loops."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from services.credit import api, handlers
from services.credit.domain import ReviewRules
from shared import topics
from shared.consumer import Subscription
from shared.runtime import Context, ServiceSpec


@dataclass(frozen=True)
class Deps:
    review: ReviewRules


def subscriptions(ctx: Context) -> list[Subscription]:
    def bound(table: dict) -> dict:
        return {t: partial(h, ctx) for t, h in table.items()}
    return [
        Subscription(topics.USERS, bound({"UserRegistered": handlers.user_registered})),
        # Behaviour counts only (no saga waits for them): applied a few times a second, many at a time.
        Subscription(topics.PAYMENTS, bound({"PaymentSucceeded": handlers.payment_succeeded}),
                     batch_handlers=bound({"PaymentSucceeded": handlers.payments_succeeded}),
                     delay_ms=ctx.settings.statistics_delay_ms),
        Subscription(topics.CREDIT_COMMANDS, bound({
            "ReserveCredit": handlers.reserve_credit, "CommitCredit": handlers.commit_credit,
            "CancelCredit": handlers.cancel_credit, "RestoreCredit": handlers.restore_credit})),
        Subscription(topics.BILLING_EVENTS, bound({
            "RepaymentApplied": handlers.repayment_applied, "AccountOverdue": handlers.account_overdue,
            "AccountSettled": handlers.account_settled, "OverpaymentRefunded": handlers.overpayment_refunded})),
    ]


SPEC = ServiceSpec(name="credit", migrations=Path(__file__).parent / "migrations", routers=[api.router],
                   subscriptions=subscriptions, loops=[handlers.run_timers],
                   deps=lambda settings: Deps(review=ReviewRules.from_env()))
