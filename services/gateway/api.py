"""Gateway HTTP API (CONTRACT.md §6)."""
from __future__ import annotations

from datetime import date
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator

from services.gateway import handlers, store
from services.gateway.domain import Registration
from shared.auth import Principal, principal
from shared.errors import ApiError
from shared.events import Identifier, rfc3339
from shared.http import ERRORS, ctx_of

router = APIRouter(prefix="/v1", responses=ERRORS)


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
    def _not_future(cls, value: date) -> date:
        if value > date.today() or value.year < 1900:
            raise ValueError("birth_date must be a real past date")
        return value


class User(BaseModel):
    user_id: str
    full_name: str
    birth_date: date | None
    phone: str | None
    id_number: str | None
    real_name_verified: bool
    registered_at: str


def _user_out(row: dict) -> dict:
    return {**row, "registered_at": rfc3339(row["registered_at"])}


@router.post("/users", status_code=201, response_model=User, tags=["users"],
             responses={200: {"model": User, "description": "The same user registered again"}})
async def register_user(body: NewUser, request: Request, caller: Principal = Depends(principal)):
    caller.require_user(body.user_id)
    ctx = ctx_of(request)
    async with ctx.pool.acquire() as conn, conn.transaction():
        outcome, row = await handlers.register_user(ctx, conn, body.model_dump())
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


class Payment(BaseModel):
    order_id: str
    status: str
    amount: int
    payment_method: str
    buyer_id: str
    seller_id: str
    installments: int
    reason_code: str | None
    accepted_at: str
    updated_at: str


@router.get("/payments/{order_id}", response_model=Payment, tags=["payments"])
async def get_payment(order_id: str, request: Request, caller: Principal = Depends(principal)):
    row = await store.get_payment(ctx_of(request).pool, order_id)
    if row is None:
        raise ApiError(404, "PAYMENT_NOT_FOUND", f"no payment for order {order_id}")
    if not caller.may_act_for(row["buyer_id"], row["seller_id"]):
        raise ApiError(403, "FORBIDDEN", "only the buyer, the seller or the operator may read this payment")
    return {k: row[k] for k in ("order_id", "status", "amount", "payment_method", "buyer_id", "seller_id",
                                "installments", "reason_code")} | {
        "accepted_at": rfc3339(row["accepted_at"]), "updated_at": rfc3339(row["updated_at"])}
