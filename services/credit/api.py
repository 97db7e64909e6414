"""Credit HTTP API: Huabei activation and accounts (docs/contract.md §6), and the service's copy of
a user's profile."""
from __future__ import annotations

from datetime import date

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from services.credit import domain, store
from shared.auth import Principal, principal
from shared import projection
from shared.errors import ApiError
from shared.events import rfc3339
from shared.http import ERRORS, ctx_of

router = APIRouter(prefix="/v1", responses=ERRORS)


class Activation(BaseModel):
    status: str
    credit_limit: int
    score: int


class HuabeiAccount(BaseModel):
    status: str
    credit_limit: int
    available: int
    used: int
    reserved: int
    score: int


@router.post("/huabei/{user_id}/activation", status_code=201, response_model=Activation, tags=["huabei"],
             responses={200: {"model": Activation, "description": "Already active: the same account"},
                        422: {"description": "HUABEI_NOT_ELIGIBLE, naming the failed rule"}})
async def activate(user_id: str, request: Request, caller: Principal = Depends(principal)):
    caller.require_user(user_id)
    ctx = ctx_of(request)
    tz = ctx.settings.zone
    # A user registered at the gateway a moment ago may not have reached us yet: wait for it.
    await projection.wait_for(lambda: store.get_profile(ctx.pool, user_id))
    now = ctx.clock.now()
    async with ctx.pool.acquire() as conn, conn.transaction():
        existing = await store.get_account(conn, user_id)
        if existing is None:
            row = await store.get_profile(conn, user_id)
            if row is None:
                raise ApiError(404, "USER_NOT_FOUND", f"no user {user_id} known to the credit service")
            profile, behaviour = store.profile_and_behaviour(row, tz)
            today = now.astimezone(tz).date()
            id_taken, phone_taken = await store.taken(conn, user_id, profile.id_number, profile.phone)
            failure = domain.eligibility_failure(profile, today, id_number_taken=id_taken, phone_taken=phone_taken)
            if failure:
                raise ApiError(422, "HUABEI_NOT_ELIGIBLE", failure)
            score = domain.credit_score(profile, behaviour, today)
            limit = domain.limit_for_score(score)
            if await store.insert_account(conn, user_id, limit, score, profile.id_number, profile.phone, now):
                return JSONResponse(status_code=201, content={
                    "status": domain.AccountStatus.ACTIVE.value, "credit_limit": limit, "score": score})
            existing = await store.get_account(conn, user_id)
            if existing is None:  # a concurrent activation took the id number or phone
                raise ApiError(422, "HUABEI_NOT_ELIGIBLE", "id_number or phone: already used by another Huabei account")
    return JSONResponse(status_code=200, content={"status": existing["status"], "credit_limit": existing["credit_limit"],
                                                  "score": existing["score"]})


@router.get("/huabei/{user_id}", response_model=HuabeiAccount, tags=["huabei"])
async def get_account(user_id: str, request: Request, caller: Principal = Depends(principal)):
    caller.require_user(user_id)
    account = await store.get_account(ctx_of(request).pool, user_id)
    if account is None:
        raise ApiError(404, "HUABEI_NOT_ACTIVE", f"{user_id} has no Huabei account")
    line = store.line_of(account)
    return {"status": account["status"], "credit_limit": line.credit_limit, "available": line.available,
            "used": line.used, "reserved": line.reserved, "score": account["score"]}


class Profile(BaseModel):
    user_id: str
    birth_date: date | None
    phone: str | None = Field(description="masked, e.g. 138****5678")
    id_number: str | None = Field(description="masked: only the last 4 characters")
    real_name_verified: bool
    registered_at: str
    successful_payments: int
    on_time_repayments: int
    late_repayments: int
    days_overdue: int


@router.get("/credit-profiles/{user_id}", response_model=Profile, tags=["profiles"],
            summary="The credit service's copy of a user's profile and behaviour (for operators and the user)")
async def get_profile(user_id: str, request: Request, caller: Principal = Depends(principal)):
    caller.require_user(user_id)
    pool = ctx_of(request).pool
    row = await projection.wait_for(lambda: store.get_profile(pool, user_id))
    if row is None:
        raise ApiError(404, "PROFILE_NOT_FOUND", f"no credit profile for {user_id}")
    # Personal data only masked (shared/pii.py): the clear values are not kept.
    return {**{k: row[k] for k in Profile.model_fields if k not in ("registered_at", "phone", "id_number")},
            "phone": row["phone_masked"], "id_number": row["id_number_masked"],
            "registered_at": rfc3339(row["registered_at"])}
