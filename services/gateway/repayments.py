"""Gateway effects for Huabei repayments: the money is taken (wallet or card) into the
`repayments` account and billing is asked to allocate it; billing's answer moves each part where
it belongs. Accounts: services/gateway/accounts.py."""
from __future__ import annotations

import asyncpg

from services.gateway import store
from services.gateway.accounts import BANK, BILLING, LENDER, REPAYMENTS, wallet
from services.gateway.bank import ChargeResult
from services.gateway.domain import RepaymentSource, RepaymentState
from services.gateway.handlers import SOURCE
from services.gateway.wallets import wallet_available
from shared import events, ledger, outbox, topics
from shared.events import ApplyRepayment, Envelope, OverpaymentRefunded, RepaymentAllocated
from shared.ledger import InsufficientFunds
from shared.runtime import Context


# ---------------------------------------------------------------- Huabei repayments
async def take_repayment(ctx: Context, conn: asyncpg.Connection, user_id: str, amount: int, source: str,
                         card_token: str | None, repayment_id: str) -> tuple[int, dict]:
    """Take the money (wallet or card) into `repayments` and ask billing to allocate it."""
    now = ctx.clock.now()
    transfer_id = f"repayment:{repayment_id}"
    if source == RepaymentSource.BALANCE:
        try:
            await ledger.transfer(conn, transfer_id, wallet(user_id), REPAYMENTS, amount, code="repayment", now=now)
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
        await ledger.transfer(conn, transfer_id, BANK, REPAYMENTS, amount, code="repayment", now=now)
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
    if repayment is None or repayment["state"] == RepaymentState.ALLOCATED:
        return
    now = ctx.clock.now()
    for part, account, amount in (("principal", LENDER, e.principal), ("fees", BILLING, e.fee + e.penalty),
                                  ("overpayment", wallet(e.user_id), e.overpayment)):
        if amount:
            await ledger.transfer(conn, f"repayment:{e.repayment_id}:{part}", REPAYMENTS, account, amount,
                                  code=f"repayment_{part}", now=now)
    await store.allocate_repayment(conn, e.repayment_id, e.model_dump(mode="json"), now)


async def overpayment_refunded(ctx: Context, conn: asyncpg.Connection, env: Envelope, e: OverpaymentRefunded) -> None:
    """A refund of an already repaid Huabei purchase: the lender pays the excess into the wallet."""
    await ledger.transfer(conn, f"overpayment:{e.order_id}:{e.refund_key}", LENDER, wallet(e.user_id), e.amount,
                          code="huabei_overpayment", order_id=e.order_id, now=ctx.clock.now())
