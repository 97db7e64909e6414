"""Gateway HTTP API (docs/contract.md §6)."""
from __future__ import annotations

import asyncio
import uuid
from datetime import date, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator

from services.gateway import handlers, repayments, store, wallets
from services.gateway.domain import Registration, RepaymentSource, RepaymentState, RiskDecision
from shared import idempotency, pii
from shared.auth import Principal, operator, principal
from shared.errors import ApiError
from shared.events import CardToken, Identifier, rfc3339
from shared.http import ERRORS, ctx_of

router = APIRouter(prefix="/v1", responses=ERRORS)
admin = APIRouter(prefix="/admin", responses=ERRORS, dependencies=[Depends(operator)])


class NewUser(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: Identifier
    full_name: Annotated[StrictStr, Field(min_length=1, max_length=100)]
    birth_date: date
    phone: Annotated[StrictStr, Field(pattern=r"^\+?[0-9]{5,20}$")] | None = None
    id_number: Annotated[StrictStr, Field(pattern=r"^[0-9A-Za-z]{6,32}$")] | None = None
    real_name_verified: StrictBool = False

    @field_validator("birth_date")
    @classmethod
    def _plausible(cls, value: date) -> date:
        if value.year < 1900:
            raise ValueError("birth_date must be a real past date")
        return value  # not in the future: checked against the platform clock in register_user


class User(BaseModel):
    user_id: str
    full_name: str
    birth_date: date | None
    phone: str | None = Field(description="masked, e.g. 138****5678: the platform keeps no clear value")
    id_number: str | None = Field(description="masked: only the last 4 characters (2 when shorter than 10)")
    real_name_verified: bool
    registered_at: str


def _user_out(row: dict) -> dict:
    return {"user_id": row["user_id"], "full_name": row["full_name"], "birth_date": row["birth_date"],
            "phone": row["phone_masked"], "id_number": row["id_number_masked"],
            "real_name_verified": row["real_name_verified"], "registered_at": rfc3339(row["registered_at"])}


@router.post("/users", status_code=201, response_model=User, tags=["users"],
             responses={200: {"model": User, "description": "The same user registered again"}})
async def register_user(body: NewUser, request: Request, caller: Principal = Depends(principal)):
    caller.require_user(body.user_id)
    ctx = ctx_of(request)
    # The platform's clock, not the wall clock: with the test clock moved, "today" is its today.
    if body.birth_date > ctx.clock.now().astimezone(ctx.settings.zone).date():
        raise ApiError(400, "INVALID_REQUEST", "birth_date: must be a real past date")
    async with ctx.pool.acquire() as conn, conn.transaction():
        # Personal data goes no further than this: a keyed hash and a masked value (shared/pii.py).
        outcome, row = await wallets.register_user(ctx, conn, pii.protect(body.model_dump()))
    if outcome is Registration.CONFLICT:
        raise ApiError(409, "USER_EXISTS", f"user {body.user_id} is already registered with different details")
    return JSONResponse(status_code=201 if outcome is Registration.CREATED else 200,
                        content=User(**_user_out(row)).model_dump(mode="json"))


@router.get("/users/{user_id}", response_model=User, tags=["users"])
async def get_user(user_id: str, request: Request, caller: Principal = Depends(principal)):
    caller.require_user(user_id)
    row = await store.get_user(ctx_of(request).pool, user_id)
    if row is None:
        raise ApiError(404, "USER_NOT_FOUND", f"no user {user_id}")
    return _user_out(row)


# ---------------------------------------------------------------- wallets
IdempotencyKey = Annotated[StrictStr, Field(min_length=1, max_length=64)] | None  # or the Idempotency-Key header
Amount = Annotated[StrictInt, Field(ge=1, le=100_000_000)]


class TopUp(BaseModel):
    model_config = ConfigDict(extra="forbid")
    amount: Amount
    card_token: CardToken
    idempotency_key: IdempotencyKey = None


class Withdrawal(BaseModel):
    model_config = ConfigDict(extra="forbid")
    amount: Amount
    idempotency_key: IdempotencyKey = None


class TopUpResult(BaseModel):
    user_id: str
    amount: int
    balance: int
    currency: str


class WithdrawalResult(TopUpResult):
    fee: int


class Wallet(BaseModel):
    user_id: str
    available: int
    currency: str


async def _existing_user(conn, user_id: str) -> None:
    if await store.get_user(conn, user_id) is None:
        raise ApiError(404, "USER_NOT_FOUND", f"no user {user_id}")


async def _user_write(request: Request, user_id: str, scope: str, body, action) -> tuple[int, dict]:
    """An idempotent write on an existing user's money: `action(ctx, conn, key)` runs once per key,
    the `Idempotency-Key` header or the body's `idempotency_key` (shared/idempotency.py)."""
    ctx = ctx_of(request)
    key = idempotency.key(request, body.idempotency_key)

    async def write(conn):
        await _existing_user(conn, user_id)
        return await action(ctx, conn, key)
    return await idempotency.run_once(ctx.pool, f"{scope}:{user_id}", key, fingerprint(body, key), write)


def fingerprint(body: BaseModel, key: str) -> dict:
    """What a repeat of the request must match: the body with the key in it, wherever the key
    came from (the header form and the body form of a request are the same request, and keys
    stored before the header was accepted still match their repeats)."""
    return {**body.model_dump(), "idempotency_key": key}


@router.post("/wallets/{user_id}/top-ups", status_code=201, response_model=TopUpResult, tags=["wallets"],
             responses={402: {"description": "CARD_DECLINED or CHANNEL_TIMEOUT"}})
async def top_up(user_id: str, body: TopUp, request: Request, caller: Principal = Depends(principal)):
    caller.require_user(user_id)
    status, result = await _user_write(request, user_id, "top-up", body, lambda ctx, conn, key: wallets.top_up(
        ctx, conn, user_id, body.amount, body.card_token, key))
    return JSONResponse(status_code=status, content=result)


@router.post("/wallets/{user_id}/withdrawals", status_code=201, response_model=WithdrawalResult, tags=["wallets"],
             responses={409: {"description": "INSUFFICIENT_BALANCE or IDEMPOTENCY_CONFLICT"}})
async def withdraw(user_id: str, body: Withdrawal, request: Request, caller: Principal = Depends(principal)):
    caller.require_user(user_id)
    status, result = await _user_write(request, user_id, "withdrawal", body, lambda ctx, conn, key: wallets.withdraw(
        ctx, conn, user_id, body.amount, key))
    return JSONResponse(status_code=status, content=result)


@router.get("/wallets/{user_id}", response_model=Wallet, tags=["wallets"])
async def get_wallet(user_id: str, request: Request, caller: Principal = Depends(principal)):
    caller.require_user(user_id)
    pool = ctx_of(request).pool
    await _existing_user(pool, user_id)
    return {"user_id": user_id, "available": await wallets.wallet_available(pool, user_id), "currency": "CNY"}


# ---------------------------------------------------------------- Huabei repayments
class Repayment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    amount: Amount
    source: RepaymentSource
    card_token: CardToken | None = None
    idempotency_key: IdempotencyKey = None

    @model_validator(mode="after")
    def _card_only_for_cards(self) -> "Repayment":
        if (self.source is RepaymentSource.BANK_CARD) != (self.card_token is not None):
            raise ValueError("card_token is required with source bank_card and only then")
        return self


ALLOCATION_WAIT_SECONDS = 10


@router.post("/huabei/{user_id}/repayments", status_code=201, tags=["huabei"],
             responses={402: {"description": "CARD_DECLINED or CHANNEL_TIMEOUT"},
                        409: {"description": "INSUFFICIENT_BALANCE or IDEMPOTENCY_CONFLICT"}})
async def repay(user_id: str, body: Repayment, request: Request, caller: Principal = Depends(principal)):
    """Take the repayment from the wallet or a card; billing allocates it (oldest due first;
    penalty, then fee, then principal) and the answer says how. If billing has not answered
    within 10 s the answer is 201 with status "pending"; asking again with the same
    idempotency key returns the allocation once it is known."""
    caller.require_user(user_id)
    ctx = ctx_of(request)
    status, result = await _user_write(request, user_id, "repayment", body,
                                       lambda ctx, conn, key: repayments.take_repayment(
                                           ctx, conn, user_id, body.amount, body.source, body.card_token,
                                           f"rp_{uuid.uuid4().hex}"))
    if status == 201:
        deadline = asyncio.get_running_loop().time() + ALLOCATION_WAIT_SECONDS
        while True:
            row = await store.get_repayment(ctx.pool, result["repayment_id"])
            if row["state"] == RepaymentState.ALLOCATED or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.05)
        if row["state"] == RepaymentState.ALLOCATED:
            a = row["allocation"]
            result = {**result, "status": "allocated", **{k: a[k] for k in ("principal", "fee", "penalty",
                                                                             "overpayment", "lines")}}
    return JSONResponse(status_code=status, content=result)


# ---------------------------------------------------------------- payments
class Payment(BaseModel):
    order_id: str
    status: str
    amount: int
    payment_method: str
    payment_id: str | None
    buyer_id: str
    seller_id: str
    installments: int
    reason_code: str | None
    message: str | None
    refunded: int
    risk_decision: str | None
    risk_rules: list[str] | None
    risk_message: str | None
    released_gross: int | None
    fee_amount: int | None
    net_amount: int | None
    accepted_at: str
    updated_at: str


@router.get("/payments/{order_id}", response_model=Payment, tags=["payments"])
async def get_payment(order_id: str, request: Request, caller: Principal = Depends(principal)):
    row = await store.get_payment(ctx_of(request).pool, order_id)
    if row is None:
        raise ApiError(404, "PAYMENT_NOT_FOUND", f"no payment for order {order_id}")
    caller.require_user(row["buyer_id"], row["seller_id"])  # the buyer, the seller or the operator
    return {k: row[k] for k in Payment.model_fields if k not in ("accepted_at", "updated_at")} | {
        "accepted_at": rfc3339(row["accepted_at"]), "updated_at": rfc3339(row["updated_at"])}


# ---------------------------------------------------------------- risk review (operators)
class ReviewDecision(BaseModel):
    model_config = ConfigDict(extra="forbid")
    decision: Literal["approve", "reject"]


@admin.post("/payments/{order_id}/risk-review", tags=["risk"],
            responses={409: {"description": "NOT_IN_REVIEW: the payment is not waiting for a review"}})
async def review_payment(order_id: str, body: ReviewDecision, request: Request):
    """An operator approves or rejects a payment the risk engine sent to review."""
    ctx = ctx_of(request)
    async with ctx.pool.acquire() as conn, conn.transaction():
        if not await handlers.review_decided(ctx, conn, order_id, body.decision == RiskDecision.APPROVE):
            if await store.get_payment(conn, order_id) is None:
                raise ApiError(404, "PAYMENT_NOT_FOUND", f"no payment for order {order_id}")
            raise ApiError(409, "NOT_IN_REVIEW", f"the payment for order {order_id} is not waiting for a review")
    return await get_payment(order_id, request, Principal(operator=True))


@admin.get("/parked-events", tags=["operations"])
async def list_parked_events(request: Request):
    """Upstream events waiting for an order the platform has not seen yet (a shipment or a
    confirmation published before its OrderPlaced), oldest first, with when each expires."""
    ctx = ctx_of(request)
    ttl = timedelta(seconds=ctx.deps.rules.parked_event_ttl_seconds)
    return [{"event_id": e["event_id"], "order_id": e["order_id"], "type": e["type"],
             "received_at": rfc3339(e["received_at"]), "expires_at": rfc3339(e["received_at"] + ttl)}
            for e in await store.parked_events(ctx.pool)]
