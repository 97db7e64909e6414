"""Gateway effects for users and their wallets: registration (which opens the wallet's ledger
account), top-ups and withdrawals. Each runs inside the caller's transaction, so the user row,
the ledger transfers and the outbox commit together. Accounts: services/gateway/accounts.py."""
from __future__ import annotations

import asyncpg

from services.gateway import domain, store
from services.gateway.accounts import BANK, REVENUE_WITHDRAWAL_FEE, wallet
from services.gateway.bank import ChargeResult
from services.gateway.domain import Registration
from services.gateway.handlers import SOURCE
from shared import events, ledger, outbox, topics
from shared.events import UserRegistered
from shared.runtime import Context


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
    await ledger.transfer(conn, request_id, BANK, wallet(user_id), amount, code="topup", now=ctx.clock.now())
    return 201, {"user_id": user_id, "amount": amount, "balance": await wallet_available(conn, user_id),
                 "currency": "CNY"}


async def withdraw(ctx: Context, conn: asyncpg.Connection, user_id: str, amount: int, key: str) -> tuple[int, dict]:
    await store.lock_wallet(conn, wallet(user_id))
    fee = domain.withdrawal_fee(amount, await store.lifetime_withdrawn(conn, user_id), ctx.deps.rules)
    available = await wallet_available(conn, user_id)
    if amount + fee > available:
        return 409, {"error": {"code": "INSUFFICIENT_BALANCE",
                               "message": f"withdrawing {amount} fen plus a fee of {fee} fen needs more than "
                                          f"the available {available} fen"}}
    now = ctx.clock.now()
    request_id = f"withdrawal:{user_id}:{key}"
    await ledger.transfer(conn, request_id, wallet(user_id), BANK, amount, code="withdrawal", now=now)
    if fee:
        await ledger.transfer(conn, f"{request_id}:fee", wallet(user_id), REVENUE_WITHDRAWAL_FEE, fee,
                              code="withdrawal_fee", now=now)
    await store.insert_withdrawal(conn, user_id, key, amount, fee, now)
    await ctx.deps.bank.payout(request_id, user_id, amount)
    return 201, {"user_id": user_id, "amount": amount, "fee": fee, "balance": await wallet_available(conn, user_id),
                 "currency": "CNY"}
