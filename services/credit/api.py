"""Credit HTTP API."""
from __future__ import annotations

from datetime import date

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from services.credit import store
from shared.auth import Principal, principal
from shared.errors import ApiError
from shared.events import rfc3339
from shared.http import ERRORS, ctx_of

router = APIRouter(prefix="/v1", responses=ERRORS)


class Profile(BaseModel):
    user_id: str
    birth_date: date | None
    phone: str | None
    id_number: str | None
    real_name_verified: bool
    registered_at: str


@router.get("/credit-profiles/{user_id}", response_model=Profile, tags=["profiles"],
            summary="The credit service's copy of a user's profile (internal, for operators and the user)")
async def get_profile(user_id: str, request: Request, caller: Principal = Depends(principal)):
    caller.require_user(user_id)
    row = await store.get_profile(ctx_of(request).pool, user_id)
    if row is None:
        raise ApiError(404, "PROFILE_NOT_FOUND", f"no credit profile for {user_id}")
    return {**{k: row[k] for k in Profile.model_fields if k != "registered_at"},
            "registered_at": rfc3339(row["registered_at"])}
