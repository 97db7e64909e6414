"""Gateway wiring: what it consumes, its API, its loops, its collaborators."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from services.gateway import api, handlers, repayments
from services.gateway.bank import BankChannel, SimulatedBank
from services.gateway.domain import Rules
from shared import topics
from shared.consumer import Subscription
from shared.events import SCHEMAS
from shared.runtime import Context, ServiceSpec
from shared.settings import Settings


@dataclass(frozen=True)
class Deps:
    bank: BankChannel
    rules: Rules


def deps(settings: Settings) -> Deps:
    return Deps(bank=SimulatedBank(), rules=Rules.from_env())


def subscriptions(ctx: Context) -> list[Subscription]:
    order_event = partial(handlers.order_event, ctx)
    answer = partial(handlers.saga_answer, ctx)  # the answers the saga core decides on
    escrow = {t: answer for t in ("FundsHeld", "HoldRefused", "EscrowReleased", "EscrowRefunded", "ClawbackRequested")}
    escrow["EscrowRefundRejected"] = partial(handlers.escrow_refund_rejected, ctx)
    credit = {t: answer for t in ("CreditReserved", "CreditRefused", "DrawdownCommitted")}
    billing = {"RepaymentAllocated": repayments.repayment_allocated,
               "OverpaymentRefunded": repayments.overpayment_refunded}
    return [
        Subscription(topics.ORDERS, {t: order_event for t in SCHEMAS[topics.ORDERS]},
                     batch_handlers={"OrderPlaced": partial(handlers.orders_placed, ctx)}),
        Subscription(topics.ESCROW_EVENTS, escrow, batch_handlers={"FundsHeld": partial(handlers.funds_held_many, ctx)}),
        Subscription(topics.CREDIT_EVENTS, credit),
        Subscription(topics.BILLING_EVENTS, {t: partial(h, ctx) for t, h in billing.items()}),
        Subscription(topics.RISK_DECISIONS, {"RiskDecided": answer},
                     batch_handlers={"RiskDecided": partial(handlers.risk_decisions, ctx)}),
    ]


SPEC = ServiceSpec(name="gateway", migrations=Path(__file__).parent / "migrations", routers=[api.router, api.admin],
                   subscriptions=subscriptions, loops=[handlers.saga_worker, handlers.parked_expiry_loop], deps=deps)
