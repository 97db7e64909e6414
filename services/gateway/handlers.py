"""Gateway effects: one function per command, consumed event or saga step. Each runs inside
the caller's transaction and writes its outgoing events to the outbox on the same connection,
so a state change, its ledger transfers and its events commit together.

Ledger accounts (shared/ledger.py): `bank` (money at the bank channel: debit-normal),
`lender` (money the credit service lent for Huabei orders, less what went back: debit-normal),
`wallet:<user>` (what users own), `escrow` (what escrow holds for orders, plus the merchant fees
it kept), `billing` (Huabei fees and penalties paid, which are billing's revenue),
`repayments` (repayments taken, not yet allocated by billing), `revenue:withdrawal_fee`.
"""
from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg
import structlog

from services.gateway import domain, store
from services.gateway.domain import PaymentStatus, Registration, Route, SagaState
from services.gateway.bank import ChargeResult
from shared import events, ledger, metrics, outbox, timers, topics
from shared.events import (ApplyRepayment, CardDeclined, PaymentAbandoned, RiskCheckRequested, RiskDecided, OverpaymentRefunded, RepaymentAllocated, CancelCredit, CancelOrder, ClawbackRequested, ClawbackSettled, CommitCredit, ConfirmOrder,
                           CreditRefused, CreditReserved, EscrowRefunded, ReserveCredit, RestoreCredit,
                           EscrowRefundRejected, EscrowReleased, Envelope, FundsHeld, FundsReleased, HoldFunds,
                           HoldRefused, OrderPlaced, PaymentFailed,
                           PaymentSucceeded, RefundCompleted, RefundOrder, RefundRejected, RefundRequested, ShipOrder,
                           UserRegistered)
from shared.ledger import InsufficientFunds
from shared.runtime import Context

SOURCE = "payment-gateway"
log = structlog.get_logger("gateway")


def wallet(user_id: str) -> str:
    return f"wallet:{user_id}"


async def _publish(ctx: Context, conn: asyncpg.Connection, data, *, order_id: str, cause: str | None) -> None:
    """A public payments.events outcome."""
    await outbox.add(conn, topics.PAYMENTS, order_id, events.new_event(
        data, source=SOURCE, occurred_at=ctx.clock.now(), correlation_id=order_id, causation_id=cause))


async def _command(ctx: Context, conn: asyncpg.Connection, topic: str, data, *, cause: str | None) -> None:
    await outbox.add(conn, topic, data.order_id, events.new_event(
        data, source=SOURCE, occurred_at=ctx.clock.now(), correlation_id=data.order_id, causation_id=cause))


async def _command_escrow(ctx: Context, conn: asyncpg.Connection, data, *, cause: str | None) -> None:
    await _command(ctx, conn, topics.ESCROW_COMMANDS, data, cause=cause)


async def _command_credit(ctx: Context, conn: asyncpg.Connection, data, *, cause: str | None) -> None:
    await _command(ctx, conn, topics.CREDIT_COMMANDS, data, cause=cause)


def _refund_key(refund_id: str | None) -> str:
    return f"r:{refund_id}" if refund_id else "cancel"


# ---------------------------------------------------------------- users
async def register_user(ctx: Context, conn: asyncpg.Connection, user: dict) -> tuple[Registration, dict]:
    now = ctx.clock.now()
    if await store.insert_user(conn, user, now):
        await ledger.open_account(conn, wallet(user["user_id"]), no_overdraft=True)  # never overdrawn
        registered = UserRegistered(
            user_id=user["user_id"], birth_date=user["birth_date"], phone_hash=user["phone_hash"],
            phone_masked=user["phone_masked"], id_number_hash=user["id_number_hash"],
            id_number_masked=user["id_number_masked"], real_name_verified=user["real_name_verified"],
            registered_at=now)
        await outbox.add(conn, topics.USERS, user["user_id"],
                         events.new_event(registered, source=SOURCE, occurred_at=now, correlation_id=user["user_id"]))
        return Registration.CREATED, await store.get_user(conn, user["user_id"])
    existing = await store.get_user(conn, user["user_id"])
    return domain.registration_outcome(existing, user), existing


# ---------------------------------------------------------------- wallets
async def wallet_available(conn: asyncpg.Connection | asyncpg.Pool, user_id: str) -> int:
    return (await ledger.account(conn, wallet(user_id))).available


async def top_up(ctx: Context, conn: asyncpg.Connection, user_id: str, amount: int, card_token: str,
                 key: str) -> tuple[int, dict]:
    request_id = f"topup:{user_id}:{key}"
    result = await ctx.deps.bank.authorize(request_id, card_token, amount)
    if result is ChargeResult.DECLINED:
        return 402, {"error": {"code": "CARD_DECLINED", "message": "the bank declined the card"}}
    if result is ChargeResult.NO_ANSWER:
        await ctx.deps.bank.void(request_id)
        return 402, {"error": {"code": "CHANNEL_TIMEOUT", "message": "the bank channel did not answer"}}
    await ctx.deps.bank.capture(request_id, amount)
    await ledger.transfer(conn, request_id, "bank", wallet(user_id), amount, code="topup", now=ctx.clock.now())
    return 201, {"user_id": user_id, "amount": amount, "balance": await wallet_available(conn, user_id),
                 "currency": "CNY"}


async def withdraw(ctx: Context, conn: asyncpg.Connection, user_id: str, amount: int, key: str) -> tuple[int, dict]:
    await store.lock_wallet(conn, user_id)
    fee = domain.withdrawal_fee(amount, await store.lifetime_withdrawn(conn, user_id), ctx.deps.rules)
    available = await wallet_available(conn, user_id)
    if amount + fee > available:
        return 409, {"error": {"code": "INSUFFICIENT_BALANCE",
                               "message": f"withdrawing {amount} fen plus a fee of {fee} fen needs more than "
                                          f"the available {available} fen"}}
    now = ctx.clock.now()
    request_id = f"withdrawal:{user_id}:{key}"
    await ledger.transfer(conn, request_id, wallet(user_id), "bank", amount, code="withdrawal", now=now)
    if fee:
        await ledger.transfer(conn, f"{request_id}:fee", wallet(user_id), "revenue:withdrawal_fee", fee,
                              code="withdrawal_fee", now=now)
    await store.insert_withdrawal(conn, user_id, key, amount, fee, now)
    await ctx.deps.bank.payout(request_id, user_id, amount)
    return 201, {"user_id": user_id, "amount": amount, "fee": fee, "balance": await wallet_available(conn, user_id),
                 "currency": "CNY"}


# ---------------------------------------------------------------- Huabei repayments
async def take_repayment(ctx: Context, conn: asyncpg.Connection, user_id: str, amount: int, source: str,
                         card_token: str | None, repayment_id: str) -> tuple[int, dict]:
    """Take the money (wallet or card) into `repayments` and ask billing to allocate it."""
    now = ctx.clock.now()
    transfer_id = f"repayment:{repayment_id}"
    if source == "balance":
        try:
            await ledger.transfer(conn, transfer_id, wallet(user_id), "repayments", amount, code="repayment", now=now)
        except InsufficientFunds:
            available = await wallet_available(conn, user_id)
            return 409, {"error": {"code": "INSUFFICIENT_BALANCE",
                                   "message": f"the wallet has {available} fen available, the repayment is {amount} fen"}}
    else:
        result = await ctx.deps.bank.authorize(transfer_id, card_token, amount)
        if result is not ChargeResult.APPROVED:
            if result is ChargeResult.NO_ANSWER:
                await ctx.deps.bank.void(transfer_id)
            code = "CARD_DECLINED" if result is ChargeResult.DECLINED else "CHANNEL_TIMEOUT"
            return 402, {"error": {"code": code, "message": "the card was not charged"}}
        await ctx.deps.bank.capture(transfer_id, amount)
        await ledger.transfer(conn, transfer_id, "bank", "repayments", amount, code="repayment", now=now)
    await store.insert_repayment(conn, repayment_id, user_id, amount, source, now)
    await outbox.add(conn, topics.BILLING_COMMANDS, user_id, events.new_event(
        ApplyRepayment(repayment_id=repayment_id, user_id=user_id, amount=amount, requested_at=now),
        source=SOURCE, occurred_at=now, correlation_id=user_id))
    return 201, {"repayment_id": repayment_id, "user_id": user_id, "amount": amount, "source": source,
                 "status": "pending"}


async def repayment_allocated(ctx: Context, conn: asyncpg.Connection, env: Envelope, e: RepaymentAllocated) -> None:
    """Each part where it belongs: principal to the lender, fees and penalties to billing, the
    overpayment back to the wallet."""
    repayment = await store.get_repayment(conn, e.repayment_id, lock=True)
    if repayment is None or repayment["state"] == "allocated":
        return
    now = ctx.clock.now()
    for part, account, amount in (("principal", "lender", e.principal), ("fees", "billing", e.fee + e.penalty),
                                  ("overpayment", wallet(e.user_id), e.overpayment)):
        if amount:
            await ledger.transfer(conn, f"repayment:{e.repayment_id}:{part}", "repayments", account, amount,
                                  code=f"repayment_{part}", now=now)
    await store.allocate_repayment(conn, e.repayment_id, e.model_dump(mode="json"), now)


async def overpayment_refunded(ctx: Context, conn: asyncpg.Connection, env: Envelope, e: OverpaymentRefunded) -> None:
    """A refund of an already repaid Huabei purchase: the lender pays the excess into the wallet."""
    await ledger.transfer(conn, f"overpayment:{e.order_id}:{e.refund_key}", "lender", wallet(e.user_id), e.amount,
                          code="huabei_overpayment", order_id=e.order_id, now=ctx.clock.now())


# ---------------------------------------------------------------- upstream order events
async def order_event(ctx: Context, conn: asyncpg.Connection, env: Envelope, data) -> None:
    """Every accepted orders.events record is kept; where it goes depends on its payment."""
    now = ctx.clock.now()
    payload = data.model_dump(mode="json")
    if isinstance(data, OrderPlaced):
        await store.record_order_event(conn, env.event_id, data.order_id, env.type, payload, now, "applied")
        await order_placed(ctx, conn, env, data)
        return
    if isinstance(data, RefundRequested) and not await store.first_refund_request(conn, data.order_id, data.refund_id):
        # docs/contract.md §3: the same refund_id twice has effect once (and one outcome).
        await store.record_order_event(conn, env.event_id, data.order_id, env.type, payload, now, "duplicate")
        return
    payment = await store.lock_payment(conn, data.order_id)
    state = await _route(ctx, conn, env.type, payload, payment, cause=env.event_id)
    await store.record_order_event(conn, env.event_id, data.order_id, env.type, payload, now, state)
    if state == "parked":
        log.info("order event parked until its order arrives", order_id=data.order_id, event_type=env.type)


ROUTE_STATES = {Route.FORWARD: "forwarded", Route.KEEP: "pending", Route.CANCEL_IN_FLIGHT: "cancel_in_flight",
                Route.PARK: "parked", Route.REJECT_UNKNOWN_ORDER: "rejected", Route.REJECT_NOT_PAID: "rejected",
                Route.IGNORE: "ignored"}


async def _route(ctx: Context, conn: asyncpg.Connection, event_type: str, payload: dict, payment: dict | None, *,
                 cause: str) -> str:
    """Send an upstream event where its order's saga says (domain.route_order_event); returns the
    event's new state."""
    order_id = payload["order_id"]
    route = domain.route_order_event(event_type, SagaState(payment["saga_state"]) if payment else None)
    if route in (Route.FORWARD, Route.CANCEL_IN_FLIGHT):
        await _forward(ctx, conn, event_type, payload, cause=cause)
    if route is Route.CANCEL_IN_FLIGHT:
        await store.update_payment(conn, order_id, ctx.clock.now(), cancel_requested=True)
    if route in (Route.REJECT_UNKNOWN_ORDER, Route.REJECT_NOT_PAID):
        code = "UNKNOWN_ORDER" if route is Route.REJECT_UNKNOWN_ORDER else "NOT_PAID"
        await _publish(ctx, conn, RefundRejected(order_id=order_id, refund_id=payload.get("refund_id"),
                                                 reason_code=code), order_id=order_id, cause=cause)
    return ROUTE_STATES[route]


async def release_parked(ctx: Context, conn: asyncpg.Connection, order_ids: list[str]) -> None:
    """The order has arrived: its parked events go where its saga now says, oldest first."""
    parked = await store.take_events_many(conn, order_ids, "parked", "released")
    for order_id, kept in parked.items():
        payment = await store.lock_payment(conn, order_id)
        for event in kept:
            state = await _route(ctx, conn, event["type"], event["data"], payment, cause=event["event_id"])
            await store.set_event_state(conn, event["event_id"], state)
            log.info("parked order event released", order_id=order_id, event_type=event["type"], state=state)


async def expire_parked(ctx: Context, limit: int = 100) -> int:
    """Parked events whose order has not come within PARKED_EVENT_TTL_SECONDS: logged, counted
    and marked expired (they change nothing)."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        before = ctx.clock.now() - timedelta(seconds=ctx.deps.rules.parked_event_ttl_seconds)
        expired = await store.expire_parked(conn, before, limit)
    for event in expired:
        metrics.PARKED_EXPIRED.labels(type=event["type"]).inc()
        log.warning("parked order event expired: its order never arrived", order_id=event["order_id"],
                    event_type=event["type"], event_id=event["event_id"], received_at=event["received_at"].isoformat())
    return len(expired)


async def parked_expiry_loop(ctx: Context) -> None:
    async def scan() -> bool:
        return await expire_parked(ctx) >= 100
    await timers.run(ctx, scan, name="parked events", interval=5.0)


async def _forward(ctx: Context, conn: asyncpg.Connection, event_type: str, data: dict, *, cause: str) -> None:
    order_id = data["order_id"]
    command = {
        "OrderShipped": lambda: ShipOrder(order_id=order_id),
        "OrderConfirmed": lambda: ConfirmOrder(order_id=order_id),
        "OrderCancelled": lambda: CancelOrder(order_id=order_id, reason=data["reason"]),
        "RefundRequested": lambda: RefundOrder(order_id=order_id, refund_id=data["refund_id"], amount=data["amount"],
                                               reason=data["reason"]),
    }[event_type]()
    await _command_escrow(ctx, conn, command, cause=cause)


# ---------------------------------------------------------------- the payment saga
async def order_placed(ctx: Context, conn: asyncpg.Connection, env: Envelope, order: OrderPlaced) -> None:
    now = ctx.clock.now()
    if not await store.insert_payment(conn, env.event_id, order, f"pay_{order.order_id}", now):
        # docs/contract.md §3: the same order_id from a different event is refused and changes nothing.
        await _publish(ctx, conn, PaymentFailed(order_id=order.order_id, reason_code="DUPLICATE_ORDER",
                                                message=f"order {order.order_id} was already placed by another event"),
                       order_id=order.order_id, cause=env.event_id)
        return
    payment = await store.lock_payment(conn, order.order_id)
    known = await store.registered_at(conn, order.buyer_id, order.seller_id)
    failure = domain.validation_failure(buyer_known=order.buyer_id in known, seller_known=order.seller_id in known,
                                        method=order.payment_method)
    if failure:
        await _fail(ctx, conn, payment, *failure, cause=env.event_id)
    elif ctx.deps.rules.risk_enabled:
        await _ask_risk(ctx, conn, payment, known[order.buyer_id], cause=env.event_id)
    else:
        await _fund(ctx, conn, payment, cause=env.event_id)
    await release_parked(ctx, conn, [order.order_id])


async def _ask_risk(ctx: Context, conn: asyncpg.Connection, payment: dict, buyer_registered_at: datetime, *,
                    cause: str | None) -> None:
    """The risk engine decides before any money moves; its deadline is the saga's timer."""
    now = ctx.clock.now()
    request = RiskCheckRequested(
        order_id=payment["order_id"], buyer_id=payment["buyer_id"], seller_id=payment["seller_id"],
        amount=payment["amount"], payment_method=payment["payment_method"], card_token=payment["card_token"],
        accepted_at=payment["accepted_at"], buyer_registered_at=buyer_registered_at)
    await outbox.add(conn, topics.RISK_REQUESTS, payment["buyer_id"], events.new_event(
        request, source=SOURCE, occurred_at=now, correlation_id=payment["order_id"], causation_id=cause))
    deadline = now + timedelta(seconds=ctx.deps.rules.risk_timeout_seconds)
    await store.update_payment(conn, payment["order_id"], now, saga_state=SagaState.RISK_CHECK.value,
                               next_action_at=deadline, deadline_at=deadline)


async def _fund(ctx: Context, conn: asyncpg.Connection, payment: dict, *, cause: str | None) -> None:
    """Move the buyer's money toward escrow: wallet (two-phase), Huabei (try) or card (worker)."""
    now = ctx.clock.now()
    order_id, method = payment["order_id"], payment["payment_method"]
    if method == "balance":
        try:
            # Two-phase: reserved now, posted when escrow holds it, voided if the saga compensates.
            await ledger.transfer(conn, f"payment:{order_id}", wallet(payment["buyer_id"]), "escrow", payment["amount"],
                                  code="payment", order_id=order_id, now=now, pending=True)
        except InsufficientFunds:
            available = await wallet_available(conn, payment["buyer_id"])
            await _fail(ctx, conn, payment, "INSUFFICIENT_BALANCE",
                        f"the wallet has {available} fen available, the order needs {payment['amount']} fen",
                        cause=cause)
            return
        await _start_holding(ctx, conn, payment, cause=cause)
    elif method == "huabei":
        # Try: the credit service reserves the drawdown; confirmed once escrow holds the money.
        await _command_credit(ctx, conn, _reserve_command(payment), cause=cause)
        await store.update_payment(conn, order_id, now, saga_state=SagaState.RESERVING.value,
                                   next_action_at=now + timedelta(seconds=ctx.deps.rules.hold_retry_seconds))
    else:  # bank_card: the saga worker charges the card, outside this consumer's batch
        await store.update_payment(conn, order_id, now, saga_state=SagaState.FUNDING.value, next_action_at=now,
                                   deadline_at=now + timedelta(seconds=ctx.deps.rules.channel_timeout_seconds))


async def apply_risk_decision(ctx: Context, conn: asyncpg.Connection, payment: dict, decision: str, rules: list[str],
                              message: str, *, cause: str | None) -> None:
    """approve -> fund; reject -> RISK_REJECTED; review -> wait for an operator (or the deadline)."""
    now = ctx.clock.now()
    await store.update_payment(conn, payment["order_id"], now, risk_decision=decision, risk_rules=rules,
                               risk_message=message)
    if decision == "approve":
        await _fund(ctx, conn, payment, cause=cause)
    elif decision == "reject":
        await _fail(ctx, conn, payment, "RISK_REJECTED", message, cause=cause)
    else:
        deadline = now + timedelta(seconds=ctx.deps.rules.review_timeout_seconds)
        await store.update_payment(conn, payment["order_id"], now, saga_state=SagaState.REVIEW.value,
                                   next_action_at=deadline, deadline_at=deadline)


async def risk_decided(ctx: Context, conn: asyncpg.Connection, env: Envelope, e: RiskDecided) -> None:
    payment = await store.lock_payment(conn, e.order_id)
    if payment is None or payment["saga_state"] != SagaState.RISK_CHECK.value:
        return  # late (the fallback decided) or repeated
    await apply_risk_decision(ctx, conn, payment, e.decision, list(e.rules), e.message, cause=env.event_id)


async def review_decided(ctx: Context, conn: asyncpg.Connection, order_id: str, approve: bool) -> bool:
    """An operator's decision on a payment held for review; False when it is not in review."""
    payment = await store.lock_payment(conn, order_id)
    if payment is None or payment["saga_state"] != SagaState.REVIEW.value:
        return False
    rules = list(payment["risk_rules"] or [])
    if approve:
        await apply_risk_decision(ctx, conn, payment, "approve", rules, "approved by an operator after review",
                                  cause=None)
    else:
        await apply_risk_decision(ctx, conn, payment, "reject", rules,
                                  f"rejected by an operator after review ({', '.join(rules)})", cause=None)
    return True


async def _start_holding(ctx: Context, conn: asyncpg.Connection, payment: dict, *, cause: str | None) -> None:
    now = ctx.clock.now()
    await _command_escrow(ctx, conn, _hold_command(payment), cause=cause)
    await store.update_payment(conn, payment["order_id"], now, saga_state=SagaState.HOLDING.value,
                               next_action_at=now + timedelta(seconds=ctx.deps.rules.hold_retry_seconds),
                               attempts=payment["attempts"] + 1)


def _reserve_command(p: dict) -> ReserveCredit:
    return ReserveCredit(order_id=p["order_id"], user_id=p["buyer_id"], amount=p["amount"],
                         installments=p["installments"])


def _hold_command(p: dict) -> HoldFunds:
    return HoldFunds(order_id=p["order_id"], payment_id=p["payment_id"], buyer_id=p["buyer_id"],
                     seller_id=p["seller_id"], amount=p["amount"], payment_method=p["payment_method"],
                     installments=p["installments"], auto_confirm_days=p["auto_confirm_days"])


async def _fail(ctx: Context, conn: asyncpg.Connection, payment: dict, reason_code: str, message: str, *,
                cause: str | None) -> None:
    """End the saga in FAILED (compensation already done) and give kept events their outcome."""
    order_id = payment["order_id"]
    now = ctx.clock.now()
    await store.update_payment(conn, order_id, now, status=PaymentStatus.FAILED.value, saga_state=SagaState.FAILED.value,
                               reason_code=reason_code, message=message, next_action_at=None)
    await _publish(ctx, conn, PaymentFailed(order_id=order_id, reason_code=reason_code, message=message),
                   order_id=order_id, cause=cause)
    if ctx.deps.rules.risk_enabled and domain.counted_by_risk_engine(reason_code, payment["risk_decision"]):
        abandoned = PaymentAbandoned(order_id=order_id, buyer_id=payment["buyer_id"], amount=payment["amount"],
                                     card_token=payment["card_token"], accepted_at=payment["accepted_at"])
        await outbox.add(conn, topics.RISK_REQUESTS, payment["buyer_id"], events.new_event(
            abandoned, source=SOURCE, occurred_at=now, correlation_id=order_id, causation_id=cause))
    # A cancel that stopped the payment has PaymentFailed ORDER_CANCELLED as its outcome; any
    # other cancel or refund of an unpaid order is rejected as NOT_PAID.
    in_flight_cancels = await store.take_events(conn, order_id, "cancel_in_flight", "rejected")
    if reason_code != "ORDER_CANCELLED":
        for _ in in_flight_cancels:
            await _publish(ctx, conn, RefundRejected(order_id=order_id, refund_id=None, reason_code="NOT_PAID"),
                           order_id=order_id, cause=cause)
    for kept in await store.take_events(conn, order_id, "pending", "rejected"):
        if domain.outcome_for_kept_event(kept["type"], reason_code) is Route.REJECT_NOT_PAID:
            await _publish(ctx, conn, RefundRejected(order_id=order_id, refund_id=kept["data"].get("refund_id"),
                                                     reason_code="NOT_PAID"), order_id=order_id, cause=kept["event_id"])


async def saga_step(ctx: Context, conn: asyncpg.Connection, payment: dict) -> None:
    """The saga worker's look at one due payment: charge the card, time out, or re-send the hold."""
    now = ctx.clock.now()
    order_id = payment["order_id"]
    state = SagaState(payment["saga_state"])
    rules = ctx.deps.rules
    if state is SagaState.RISK_CHECK:
        # The engine is down or slow: the documented fallback keeps the saga moving.
        decision = domain.risk_fallback(payment["amount"], rules)
        await apply_risk_decision(
            ctx, conn, payment, decision, ["risk_engine_timeout"],
            f"risk engine did not answer within {rules.risk_timeout_seconds} s: fallback "
            f"{'approves' if decision == 'approve' else 'rejects'} amounts "
            f"{'up to' if decision == 'approve' else 'above'} {rules.risk_fallback_approve_max} fen", cause=None)
        return
    if state is SagaState.REVIEW:
        await apply_risk_decision(ctx, conn, payment, "reject", list(payment["risk_rules"] or []),
                                  f"review not decided within {rules.review_timeout_seconds} s", cause=None)
        return
    if state is SagaState.RESERVING:
        log.warning("credit has not answered the reservation; re-sending", order_id=order_id)
        await _command_credit(ctx, conn, _reserve_command(payment), cause=None)
        await store.update_payment(conn, order_id, now, attempts=payment["attempts"] + 1,
                                   next_action_at=now + timedelta(seconds=ctx.deps.rules.hold_retry_seconds))
        return
    if state is SagaState.HOLDING:
        # No answer from escrow yet: HoldFunds is idempotent, send it again.
        log.warning("escrow has not answered the hold; re-sending", order_id=order_id, attempts=payment["attempts"])
        await _start_holding(ctx, conn, payment, cause=None)
        return
    bank = ctx.deps.bank
    charge_id = f"charge:{order_id}"
    if payment["cancel_requested"]:
        await bank.void(charge_id)
        await _fail(ctx, conn, payment, "ORDER_CANCELLED", "the order was cancelled before it was paid", cause=None)
        return
    result = await bank.authorize(charge_id, payment["card_token"], payment["amount"])
    if result is ChargeResult.APPROVED:
        # Authorized only: captured once escrow holds the order, voided if the saga compensates.
        await _start_holding(ctx, conn, payment, cause=None)
    elif result is ChargeResult.DECLINED:
        await _fail(ctx, conn, payment, "CARD_DECLINED", "the bank declined the card", cause=None)
        if rules.risk_enabled:  # the risk engine counts declines per card
            declined = CardDeclined(order_id=order_id, buyer_id=payment["buyer_id"], card_token=payment["card_token"],
                                    declined_at=now)
            await outbox.add(conn, topics.RISK_REQUESTS, payment["buyer_id"], events.new_event(
                declined, source=SOURCE, occurred_at=now, correlation_id=order_id))
    elif now >= payment["deadline_at"]:
        await bank.void(charge_id)  # whatever the channel may still do, nothing is charged
        await _fail(ctx, conn, payment, "CHANNEL_TIMEOUT",
                    f"the bank channel did not answer within {ctx.deps.rules.channel_timeout_seconds} s", cause=None)
    else:
        await store.update_payment(conn, order_id, now, attempts=payment["attempts"] + 1,
                                   next_action_at=min(now + timedelta(seconds=1), payment["deadline_at"]))


async def _compensate_funding(ctx: Context, conn: asyncpg.Connection, payment: dict) -> None:
    order_id, now = payment["order_id"], ctx.clock.now()
    if payment["payment_method"] == "balance":
        await ledger.void_pending(conn, f"payment-void:{order_id}", f"payment:{order_id}", now)
    elif payment["payment_method"] == "huabei":
        await ledger.transfer(conn, f"huabei-return:{order_id}", "escrow", "lender", payment["amount"],
                              code="huabei_cancel", order_id=order_id, now=now)
        await _command_credit(ctx, conn, CancelCredit(order_id=order_id), cause=None)
    else:  # bank_card: authorized, never captured
        await ctx.deps.bank.void(f"charge:{order_id}")


# ---------------------------------------------------------------- escrow's answers
async def funds_held(ctx: Context, conn: asyncpg.Connection, env: Envelope, e: FundsHeld) -> None:
    payment = await store.lock_payment(conn, e.order_id)
    if payment is None or payment["saga_state"] != SagaState.HOLDING.value:
        return  # the answer to a re-sent hold: already applied
    now = ctx.clock.now()
    if payment["payment_method"] == "balance":
        await ledger.post_pending(conn, f"payment-post:{e.order_id}", f"payment:{e.order_id}", now)
    elif payment["payment_method"] == "bank_card":
        charge_id = f"charge:{e.order_id}"
        await ctx.deps.bank.capture(charge_id, payment["amount"])
        await ledger.transfer(conn, charge_id, "bank", "escrow", payment["amount"], code="card_payment",
                              order_id=e.order_id, now=now)
    elif payment["payment_method"] == "huabei":
        await _command_credit(ctx, conn, CommitCredit(order_id=e.order_id), cause=env.event_id)  # confirm
    await store.update_payment(conn, e.order_id, now, status=PaymentStatus.HELD.value,
                               saga_state=SagaState.COMPLETED.value, next_action_at=None)
    await _publish(ctx, conn, PaymentSucceeded(
        order_id=e.order_id, payment_id=payment["payment_id"], buyer_id=payment["buyer_id"],
        seller_id=payment["seller_id"], amount=payment["amount"], payment_method=payment["payment_method"],
        installments=payment["installments"]), order_id=e.order_id, cause=env.event_id)
    for kept in await store.take_events(conn, e.order_id, "pending", "forwarded"):
        await _forward(ctx, conn, kept["type"], kept["data"], cause=kept["event_id"])


async def hold_refused(ctx: Context, conn: asyncpg.Connection, env: Envelope, e: HoldRefused) -> None:
    payment = await store.lock_payment(conn, e.order_id)
    if payment is None or payment["saga_state"] != SagaState.HOLDING.value:
        return
    await _compensate_funding(ctx, conn, payment)
    await _fail(ctx, conn, payment, e.reason_code, e.message, cause=env.event_id)


async def _set_status(ctx: Context, conn: asyncpg.Connection, order_id: str, **changes) -> dict:
    await store.update_payment(conn, order_id, ctx.clock.now(), **changes)
    p = await store.get_payment(conn, order_id)
    status = domain.payment_status(amount=p["amount"], failed=False, held=True,
                                   released=p["released_gross"] is not None, refunded=p["refunded"])
    await store.update_payment(conn, order_id, ctx.clock.now(), status=status.value)
    return p


def _refund_account(payment_method: str, buyer_id: str) -> str:
    """Refunds go back the way the money came: the wallet, the card (bank) or the lender."""
    return {"bank_card": "bank", "huabei": "lender"}.get(payment_method, wallet(buyer_id))


async def escrow_released(ctx: Context, conn: asyncpg.Connection, env: Envelope, e: EscrowReleased) -> None:
    await store.lock_payment(conn, e.order_id)
    if e.net_amount:
        await ledger.transfer(conn, f"release:{e.order_id}", "escrow", wallet(e.seller_id), e.net_amount,
                              code="release", order_id=e.order_id, now=ctx.clock.now())
    await _set_status(ctx, conn, e.order_id, released_gross=e.gross_amount, fee_amount=e.fee_amount,
                      net_amount=e.net_amount)
    await _publish(ctx, conn, FundsReleased(
        order_id=e.order_id, seller_id=e.seller_id, gross_amount=e.gross_amount, fee_amount=e.fee_amount,
        net_amount=e.net_amount, trigger=e.trigger), order_id=e.order_id, cause=env.event_id)


async def escrow_refunded(ctx: Context, conn: asyncpg.Connection, env: Envelope, e: EscrowRefunded) -> None:
    """Refunded from the hold: back the way the money came."""
    payment = await store.lock_payment(conn, e.order_id)
    # A cancel's refund has no refund_id; its own id space keeps it apart from a refund named "cancel".
    transfer_id = f"refund:{e.order_id}:{e.refund_id}" if e.refund_id else f"cancel-refund:{e.order_id}"
    if e.payment_method == "bank_card":
        await ctx.deps.bank.refund(transfer_id, f"charge:{e.order_id}", e.amount)
    await ledger.transfer(conn, transfer_id, "escrow", _refund_account(e.payment_method, e.buyer_id), e.amount,
                          code="refund", order_id=e.order_id, now=ctx.clock.now())
    if e.payment_method == "huabei":
        await _command_credit(ctx, conn, RestoreCredit(order_id=e.order_id, user_id=e.buyer_id, amount=e.amount,
                                                       refund_key=_refund_key(e.refund_id)), cause=env.event_id)
    await _set_status(ctx, conn, e.order_id, refunded=payment["refunded"] + e.amount)
    await _publish(ctx, conn, RefundCompleted(order_id=e.order_id, refund_id=e.refund_id, amount=e.amount,
                                              payment_method=e.payment_method), order_id=e.order_id, cause=env.event_id)


async def clawback_requested(ctx: Context, conn: asyncpg.Connection, env: Envelope, e: ClawbackRequested) -> None:
    """A refund after release: from the seller's wallet back the way the money came, or rejected."""
    payment = await store.lock_payment(conn, e.order_id)
    transfer_id = f"clawback:{e.order_id}:{e.refund_id}"
    try:
        await ledger.transfer(conn, transfer_id, wallet(e.seller_id), _refund_account(e.payment_method, e.buyer_id),
                              e.amount, code="clawback", order_id=e.order_id, now=ctx.clock.now())
        ok = True
    except InsufficientFunds:
        ok = False
    if ok:
        if e.payment_method == "bank_card":
            await ctx.deps.bank.refund(transfer_id, f"charge:{e.order_id}", e.amount)
        if e.payment_method == "huabei":
            await _command_credit(ctx, conn, RestoreCredit(order_id=e.order_id, user_id=e.buyer_id, amount=e.amount,
                                                           refund_key=_refund_key(e.refund_id)), cause=env.event_id)
        await _set_status(ctx, conn, e.order_id, refunded=payment["refunded"] + e.amount)
        outcome = RefundCompleted(order_id=e.order_id, refund_id=e.refund_id, amount=e.amount,
                                  payment_method=e.payment_method)
    else:
        outcome = RefundRejected(order_id=e.order_id, refund_id=e.refund_id, reason_code="SELLER_INSUFFICIENT_FUNDS")
    await _publish(ctx, conn, outcome, order_id=e.order_id, cause=env.event_id)
    await _command_escrow(ctx, conn, ClawbackSettled(order_id=e.order_id, refund_id=e.refund_id, amount=e.amount,
                                                     ok=ok), cause=env.event_id)


# ---------------------------------------------------------------- credit's answers
async def credit_reserved(ctx: Context, conn: asyncpg.Connection, env: Envelope, e: CreditReserved) -> None:
    payment = await store.lock_payment(conn, e.order_id)
    if payment is None or payment["saga_state"] != SagaState.RESERVING.value:
        return  # the answer to a re-sent reservation: already applied
    await ledger.transfer(conn, f"huabei:{e.order_id}", "lender", "escrow", payment["amount"], code="huabei_payment",
                          order_id=e.order_id, now=ctx.clock.now())
    await _start_holding(ctx, conn, payment, cause=env.event_id)


async def credit_refused(ctx: Context, conn: asyncpg.Connection, env: Envelope, e: CreditRefused) -> None:
    payment = await store.lock_payment(conn, e.order_id)
    if payment is None or payment["saga_state"] != SagaState.RESERVING.value:
        return
    await _fail(ctx, conn, payment, e.reason_code, e.message, cause=env.event_id)


async def escrow_refund_rejected(ctx: Context, conn: asyncpg.Connection, env: Envelope,
                                 e: EscrowRefundRejected) -> None:
    await _publish(ctx, conn, RefundRejected(order_id=e.order_id, refund_id=e.refund_id, reason_code=e.reason_code),
                   order_id=e.order_id, cause=env.event_id)


# ---------------------------------------------------------------- the hot path, as sets
# The consumer hands each run of OrderPlaced, RiskDecided or FundsHeld to these first. They do
# for hundreds of orders in a few statements exactly what the one-by-one handlers above do in
# the usual case, and return the records that are not the usual case (unknown users, a duplicate
# order id, a card or Huabei payment, a short wallet, a late answer, ...) to those handlers.
Batch = list[tuple[Envelope, object]]


async def orders_placed(ctx: Context, conn: asyncpg.Connection, items: Batch) -> Batch:
    """New orders of known users: a payment row waiting for the risk engine, and its request."""
    rules = ctx.deps.rules
    if not rules.risk_enabled:
        return items
    now = ctx.clock.now()
    known = await store.registered_at(conn, *{u for _, o in items for u in (o.buyer_id, o.seller_id)})
    fast = [(env, o) for env, o in items
            if domain.validation_failure(buyer_known=o.buyer_id in known, seller_known=o.seller_id in known,
                                         method=o.payment_method) is None]
    if not fast:
        return items
    await store.record_order_events(
        conn, [(env.event_id, o.order_id, env.type, o.model_dump(mode="json"), "applied") for env, o in fast], now)
    deadline = now + timedelta(seconds=rules.risk_timeout_seconds)
    inserted = await store.insert_payments(conn, [(env.event_id, o, f"pay_{o.order_id}") for env, o in fast], now,
                                           saga_state=SagaState.RISK_CHECK.value, next_action_at=deadline,
                                           deadline_at=deadline)
    await outbox.add_many(conn, [
        (topics.RISK_REQUESTS, o.buyer_id, events.new_event(
            RiskCheckRequested(order_id=o.order_id, buyer_id=o.buyer_id, seller_id=o.seller_id, amount=o.amount,
                               payment_method=o.payment_method, card_token=o.card_token, accepted_at=now,
                               buyer_registered_at=known[o.buyer_id]),
            source=SOURCE, occurred_at=now, correlation_id=o.order_id, causation_id=env.event_id))
        for env, o in fast if o.order_id in inserted])
    await release_parked(ctx, conn, sorted(inserted))
    return [(env, o) for env, o in items if o.order_id not in inserted]


async def _lock_waiting(conn: asyncpg.Connection, items: Batch, state: SagaState) -> tuple[Batch, list]:
    """Lock the payments of a run of answers. Returns the answers still to handle (those of
    payments in `state`, or of no payment: the one-by-one handler reports those) and, of them,
    (envelope, answer, payment) for the wallet payments, which the set paths handle."""
    payments = await store.lock_payments(conn, [e.order_id for _, e in items])
    items = [(env, e) for env, e in items
             if e.order_id not in payments or payments[e.order_id]["saga_state"] == state.value]
    wallet_payments = [(env, e, payments[e.order_id]) for env, e in items
                       if e.order_id in payments and payments[e.order_id]["payment_method"] == "balance"]
    return items, wallet_payments


async def risk_decisions(ctx: Context, conn: asyncpg.Connection, items: Batch) -> Batch:
    """Approved wallet payments the wallet can pay: reserve the money, ask escrow to hold it."""
    # Late (the fallback decided) or repeated answers drop out, as in risk_decided.
    items, waiting = await _lock_waiting(conn, items, SagaState.RISK_CHECK)
    candidates = [(env, e, p) for env, e, p in waiting if e.decision == "approve"]
    if not candidates:
        return items
    now = ctx.clock.now()
    # In order; an order its wallet can no longer pay is refused here and goes one by one (and fails).
    applied, refused = await ledger.transfer_many(conn, [
        ledger.NewTransfer(f"payment:{p['order_id']}", wallet(p["buyer_id"]), "escrow", p["amount"], code="payment",
                           order_id=p["order_id"], pending=True) for _, _, p in candidates], now, partial=True)
    if len(applied) + len(refused) != len(candidates):
        raise RuntimeError("a wallet payment was reserved before its risk decision")  # one by one sorts it out
    fast = [(env, e, p) for env, e, p in candidates if f"payment:{p['order_id']}" in applied]
    await outbox.add_many(conn, [
        (topics.ESCROW_COMMANDS, p["order_id"], events.new_event(
            _hold_command(p), source=SOURCE, occurred_at=now, correlation_id=p["order_id"], causation_id=env.event_id))
        for env, _, p in fast])
    retry_at = now + timedelta(seconds=ctx.deps.rules.hold_retry_seconds)
    await store.update_payments(conn, now, [
        {"order_id": p["order_id"], "risk_decision": e.decision, "risk_rules": list(e.rules), "risk_message": e.message,
         "saga_state": SagaState.HOLDING.value, "next_action_at": retry_at, "attempts": p["attempts"] + 1}
        for _, e, p in fast])
    done = {p["order_id"] for _, _, p in fast}
    return [(env, e) for env, e in items if e.order_id not in done]


async def funds_held_many(ctx: Context, conn: asyncpg.Connection, items: Batch) -> Batch:
    """Wallet payments escrow now holds: post the reservation, publish PaymentSucceeded."""
    # The answer to a re-sent hold, already applied, drops out, as in funds_held.
    items, fast = await _lock_waiting(conn, items, SagaState.HOLDING)
    if not fast:
        return items
    now = ctx.clock.now()
    order_ids = [p["order_id"] for _, _, p in fast]
    posted = await ledger.resolve_many(conn, [(f"payment-post:{o}", f"payment:{o}") for o in order_ids], post=True,
                                       now=now)
    if len(posted) != len(order_ids):
        raise RuntimeError("a wallet reservation was missing or resolved already")  # one by one sorts it out
    await store.update_payments(conn, now, [
        {"order_id": o, "status": PaymentStatus.HELD.value, "saga_state": SagaState.COMPLETED.value,
         "next_action_at": None} for o in order_ids])
    await outbox.add_many(conn, [
        (topics.PAYMENTS, p["order_id"], events.new_event(
            PaymentSucceeded(order_id=p["order_id"], payment_id=p["payment_id"], buyer_id=p["buyer_id"],
                             seller_id=p["seller_id"], amount=p["amount"], payment_method=p["payment_method"],
                             installments=p["installments"]),
            source=SOURCE, occurred_at=now, correlation_id=p["order_id"], causation_id=env.event_id))
        for env, _, p in fast])
    kept = await store.take_events_many(conn, order_ids, "pending", "forwarded")
    for order_id in order_ids:  # events that came before the payment completed: now they go on
        for event in kept.get(order_id, []):
            await _forward(ctx, conn, event["type"], event["data"], cause=event["event_id"])
    done = set(order_ids)
    return [(env, e) for env, e in items if e.order_id not in done]


# ---------------------------------------------------------------- the saga worker
async def saga_worker(ctx: Context, batch: int = 100) -> None:
    """Drives sagas whose next step is due (risk deadlines, card charges, channel deadlines,
    command re-sends). The due time is a column; SKIP LOCKED lets several gateways share."""
    async def scan() -> bool:
        return await run_due_sagas(ctx, batch) >= batch
    await timers.run(ctx, scan, name="saga worker", interval=0.2)


async def run_due_sagas(ctx: Context, batch: int) -> int:
    """Each due saga in a transaction of its own, so the worker never holds many payments while
    the consumer waits for them. The consumer locks wallets, then the payments of its next run;
    the worker a payment, then its wallet: the worker waits at most 100 ms and gives way."""
    async with ctx.pool.acquire() as conn:
        due = await store.due_saga_ids(conn, ctx.clock.now(), batch)
        for order_id in due:
            with structlog.contextvars.bound_contextvars(correlation_id=order_id):
                async with conn.transaction():
                    await conn.execute("SET LOCAL lock_timeout = '100ms'")
                    payment = await store.lock_due_saga(conn, order_id, ctx.clock.now())
                    if payment is None:  # another gateway has it, or the consumer moved it on
                        continue
                    try:
                        async with conn.transaction():  # savepoint: a failed step leaves no trace
                            await saga_step(ctx, conn, payment)
                    except (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError):
                        raise
                    except asyncpg.exceptions.LockNotAvailableError:
                        log.info("saga step waits for a lock the consumer holds; retrying in a second")
                        await store.update_payment(conn, order_id, ctx.clock.now(),
                                                   next_action_at=ctx.clock.now() + timedelta(seconds=1))
                    except Exception:
                        log.exception("saga step failed; retrying later")
                        await store.update_payment(conn, order_id, ctx.clock.now(),
                                                   next_action_at=ctx.clock.now() + timedelta(seconds=5))
    return len(due)
