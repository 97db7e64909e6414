"""Billing HTTP API: Huabei statements and converting a statement to installments (docs/contract.md §6),
plus a statement's detail (its items and charged overdue days; not part of the contract).

A statement is the sum of the items its cycle carries: the cycle's own purchases (less refunds and
what was converted) and the installment periods due on its due day. `paid` is everything paid on
those items, `outstanding` = principal + fee + penalty - paid. A converted statement shows what it
still carries itself -- the part paid before the conversion and the plan's period 1, which is due
on the same day -- so summing `outstanding` over statements never counts a fen twice; its later
periods appear on the statements of their own due days. The open cycle is listed (status "open",
with the dates it will have) while it carries anything to bill; a cycle that bills nothing (no
purchases, or all of them refunded before its statement day) issues no statement.
"""
from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from services.billing import domain, handlers, store
from services.billing.domain import Period
from shared import projection
from shared.auth import Principal, principal
from shared.errors import ApiError
from shared.http import ERRORS, ctx_of
from shared import idempotency

router = APIRouter(prefix="/v1", responses=ERRORS)

# How long the statements of a user billing does not know wait for the user's UserRegistered
# (read-your-writes): longer than the projection's usual wait, to cover the consumer group's
# rebalance after a billing restart (its session timeout is 10 s), when users.events is applied
# late; only then is the user really unknown (404).
USER_WAIT_SECONDS = 12.0


class Statement(BaseModel):
    statement_id: str
    period: str        # YYYY-MM: the cycle (the month of the purchases)
    issued_on: str     # YYYY-MM-DD (for the open cycle: the day it will be issued)
    due_on: str
    principal: int
    fee: int
    penalty: int
    paid: int
    outstanding: int
    status: str        # open | issued | paid | overdue | installment


class StatementItem(BaseModel):
    item_id: str
    kind: str          # statement | installment
    plan_id: str | None
    period_no: int | None
    due_on: str
    principal: int
    fee: int
    penalty: int
    principal_paid: int
    fee_paid: int
    penalty_paid: int
    overdue_days_charged: int


class StatementDetail(Statement):
    items: list[StatementItem]


class Conversion(BaseModel):
    model_config = ConfigDict(extra="forbid")
    periods: StrictInt
    idempotency_key: Annotated[StrictStr, Field(min_length=1, max_length=64)] | None = None  # or the header


class PlanPeriodView(BaseModel):
    period: int
    due_on: str
    principal: int
    fee: int


class ConversionResult(BaseModel):
    statement_id: str
    periods: list[PlanPeriodView]


async def _bring_up_to_date(ctx, user_id: str, now: datetime) -> bool:
    """Apply what fell due for this user (the timer may not have run yet); False: no account."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        account = await store.lock_account(conn, user_id, skip_locked=True)
        if account is None:
            # Locked by a writer right now (it brings the user up to date itself), or no account.
            return await store.get_account(conn, user_id) is not None
        if account["next_check_at"] <= now:
            account = await handlers.catch_up(ctx, conn, account, now)
            await handlers.settle(ctx, conn, account, now, None)
        return True


def _view(rules: domain.BillingRules, user_id: str, period: Period, totals: dict | None, statement: dict | None,
          now: datetime) -> dict:
    totals = totals or {"principal": 0, "fee": 0, "penalty": 0, "paid": 0}
    issued = statement is not None
    due_on = statement["due_on"] if issued else domain.statement_due_date(period, rules)
    issued_on = statement["issued_on"] if issued else domain.statement_issue_date(period, rules)
    outstanding = totals["principal"] + totals["fee"] + totals["penalty"] - totals["paid"]
    status = domain.statement_status(issued, due_on, now, outstanding,
                                     issued and statement["converted_at"] is not None, rules)
    return {"statement_id": domain.statement_id(user_id, period), "period": str(period),
            "issued_on": issued_on.isoformat(), "due_on": due_on.isoformat(), "principal": totals["principal"],
            "fee": totals["fee"], "penalty": totals["penalty"], "paid": totals["paid"], "outstanding": outstanding,
            "status": status.value}


@router.get("/huabei/{user_id}/statements", response_model=list[Statement], tags=["billing"],
            responses={404: {"description": "USER_NOT_FOUND: billing does not know the user"}})
async def list_statements(user_id: str, request: Request, caller: Principal = Depends(principal)):
    """The user's issued statements, oldest first, and the open cycle when it carries anything;
    [] for a user with no Huabei purchases, 404 USER_NOT_FOUND for a user billing does not know."""
    caller.require_user(user_id)
    ctx = ctx_of(request)
    rules = ctx.deps.rules
    now = ctx.clock.now()
    if not await _bring_up_to_date(ctx, user_id, now):
        # A user registered at the gateway a moment ago may not have reached us yet: wait for it.
        if await projection.wait_for(lambda: store.known_user(ctx.pool, user_id), USER_WAIT_SECONDS) is None:
            raise ApiError(404, "USER_NOT_FOUND", f"no user {user_id} known to the billing service")
        return []
    async with ctx.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        statements = {s["period"]: s for s in await store.statements_of(conn, user_id)}
        totals = await store.period_totals(conn, user_id)
    current = domain.cycle_of(now, rules)
    periods = set(statements) | {p for p, t in totals.items()
                                 if Period.parse(p) <= current and domain.bills_anything([t])}
    return [_view(rules, user_id, Period.parse(p), totals.get(p), statements.get(p), now) for p in sorted(periods)]


@router.get("/huabei/{user_id}/statements/{statement_id}", response_model=StatementDetail, tags=["billing"],
            summary="One statement with the items it carries (not part of the contract)")
async def get_statement(user_id: str, statement_id: str, request: Request, caller: Principal = Depends(principal)):
    caller.require_user(user_id)
    ctx = ctx_of(request)
    rules = ctx.deps.rules
    now = ctx.clock.now()
    parsed = domain.parse_statement_id(statement_id)
    if parsed is None or parsed[1] != user_id or not await _bring_up_to_date(ctx, user_id, now):
        raise ApiError(404, "STATEMENT_NOT_FOUND", f"{user_id} has no statement {statement_id}")
    period = parsed[0]
    async with ctx.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        statement = await store.get_statement(conn, statement_id)
        totals = (await store.period_totals(conn, user_id)).get(str(period))
        items = [i for i in await store.items_of_user(conn, user_id) if i["period"] == str(period)]
        charged = {i["item_id"]: len(await store.penalty_charges(conn, i["item_id"])) for i in items}
    if statement is None and (totals is None or not domain.bills_anything([totals])
                              or period > domain.cycle_of(now, rules)):
        raise ApiError(404, "STATEMENT_NOT_FOUND", f"{user_id} has no statement {statement_id}")
    view = _view(rules, user_id, period, totals, statement, now)
    view["items"] = [{"item_id": i["item_id"], "kind": i["kind"], "plan_id": i["plan_id"], "period_no": i["period_no"],
                      "due_on": i["due_on"].isoformat(), "principal": i["principal"], "fee": i["fee"],
                      "penalty": i["penalty"], "principal_paid": i["principal_paid"], "fee_paid": i["fee_paid"],
                      "penalty_paid": i["penalty_paid"], "overdue_days_charged": charged[i["item_id"]]}
                     for i in items]
    return view


@router.post("/huabei/{user_id}/statements/{statement_id}/installments", status_code=201,
             response_model=ConversionResult, tags=["billing"],
             responses={409: {"description": "STATEMENT_NOT_ISSUED, STATEMENT_ALREADY_CONVERTED, STATEMENT_PAST_DUE, "
                                             "STATEMENT_NOTHING_OWED or IDEMPOTENCY_CONFLICT"}})
async def convert(user_id: str, statement_id: str, body: Conversion, request: Request,
                  caller: Principal = Depends(principal)):
    """Convert an issued statement, before the end of its due day, into 3, 6, 9 or 12 installments
    of its outstanding principal: period 1 due on the statement's own due day, period k k-1 months
    later; the fee per docs/contract.md §5. Idempotent on `idempotency_key` (or the
    `Idempotency-Key` header): the first answer, a refusal included, is the answer to every repeat."""
    caller.require_user(user_id)
    ctx = ctx_of(request)
    key = idempotency.key(request, body.idempotency_key)
    try:
        ctx.deps.rules.installment_fee_rate(body.periods)
    except ValueError as exc:
        raise ApiError(400, "INVALID_REQUEST", f"periods: {exc}") from None

    async def write(conn):
        return await handlers.convert_statement(ctx, conn, user_id, statement_id, body.periods)

    status, result = await idempotency.run_once(ctx.pool, f"billing:installments:{user_id}", key,
                                                {"statement_id": statement_id, "periods": body.periods}, write)
    return JSONResponse(status_code=status, content=result)
