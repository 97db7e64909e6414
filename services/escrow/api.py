"""Escrow HTTP API (docs/contract.md §6)."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from services.escrow import store
from shared.auth import Principal, principal
from shared.errors import ApiError
from shared.events import rfc3339
from shared.http import ERRORS, ctx_of

router = APIRouter(prefix="/v1", responses=ERRORS)


class EscrowView(BaseModel):
    order_id: str
    status: str                  # HELD | RELEASED | REFUNDED | CANCELLED
    held: int                    # still in escrow
    released: int                # gross released to the seller (0 before release)
    refunded: int                # completed refunds, before and after release
    auto_confirm_at: str | None  # set by the first shipment
    amount: int                  # paid into escrow
    payment_method: str | None
    buyer_id: str | None
    seller_id: str | None
    fee_amount: int
    net_amount: int


@router.get("/escrows/{order_id}", response_model=EscrowView, tags=["escrows"])
async def get_escrow(order_id: str, request: Request, caller: Principal = Depends(principal)):
    escrow = await store.get(ctx_of(request).pool, order_id)
    if escrow is None:
        raise ApiError(404, "ESCROW_NOT_FOUND", f"no escrow for order {order_id}")
    caller.require_user(escrow.buyer_id, escrow.seller_id)  # the buyer, the seller or the operator
    return EscrowView(
        order_id=escrow.order_id, status=escrow.status.value, held=escrow.held, released=escrow.released_gross,
        refunded=escrow.refunded_total,
        auto_confirm_at=rfc3339(escrow.auto_confirm_at) if escrow.auto_confirm_at else None,
        amount=escrow.amount, payment_method=escrow.payment_method, buyer_id=escrow.buyer_id,
        seller_id=escrow.seller_id, fee_amount=escrow.fee_amount, net_amount=escrow.net_amount)
