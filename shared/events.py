"""The event envelope and every event model: the single source of truth for what crosses Kafka.

Public events follow docs/contract.md §2–4 letter by letter. Models are strict: unknown fields,
wrong types (a float or a bool where fen are expected), missing fields and out-of-range values
are rejected. `python -m shared.events` writes them as JSON Schema files under docs/schemas/.
"""
from __future__ import annotations

import json
import uuid
from datetime import date, datetime, timezone
from typing import Annotated, Any, Literal

import orjson
from pydantic import (AwareDatetime, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr,
                      ValidationError, model_validator)

from shared import topics

Identifier = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Fen = Annotated[StrictInt, Field(ge=0)]
PositiveFen = Annotated[StrictInt, Field(ge=1)]
CardToken = Annotated[StrictStr, Field(pattern=r"^tok_[A-Za-z0-9_-]{1,60}$")]
Reason = Annotated[StrictStr, Field(max_length=200)]
PaymentMethod = Literal["balance", "bank_card", "huabei"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- envelope (§2)
class Envelope(Strict):
    event_id: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    type: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    version: Literal[1]
    occurred_at: AwareDatetime
    source: Annotated[StrictStr, Field(min_length=1, max_length=128)]
    correlation_id: Annotated[StrictStr, Field(max_length=128)] | None = None
    causation_id: Annotated[StrictStr, Field(max_length=128)] | None = None
    data: dict[str, Any]


# ---------------------------------------------------------------- orders.events (§3, input)
class OrderPlaced(Strict):
    order_id: Identifier
    buyer_id: Identifier
    seller_id: Identifier
    amount: Annotated[StrictInt, Field(ge=1, le=100_000_000)]
    currency: Literal["CNY"]
    payment_method: PaymentMethod
    card_token: CardToken | None = None
    installments: Literal[1, 3, 6, 9, 12] = 1
    auto_confirm_days: Annotated[StrictInt, Field(ge=1, le=30)] = 10

    @model_validator(mode="after")
    def _method_fields(self) -> "OrderPlaced":
        if self.payment_method == "bank_card" and self.card_token is None:
            raise ValueError("card_token is required when payment_method is bank_card")
        if self.payment_method != "bank_card" and "card_token" in self.model_fields_set:
            raise ValueError("card_token is only allowed when payment_method is bank_card")
        if self.payment_method != "huabei" and self.installments != 1:
            raise ValueError("installments other than 1 are only allowed when payment_method is huabei")
        return self


class OrderShipped(Strict):
    order_id: Identifier


class OrderConfirmed(Strict):
    order_id: Identifier


class OrderCancelled(Strict):
    order_id: Identifier
    reason: Reason


class RefundRequested(Strict):
    order_id: Identifier
    refund_id: Identifier
    amount: Annotated[StrictInt, Field(ge=1, le=100_000_000)]
    reason: Reason


# ---------------------------------------------------------------- payments.events (§4, output)
class PaymentSucceeded(Strict):
    order_id: Identifier
    payment_id: StrictStr
    buyer_id: Identifier
    seller_id: Identifier
    amount: Fen
    payment_method: PaymentMethod
    installments: StrictInt


PaymentFailureCode = Literal[
    "DUPLICATE_ORDER", "UNKNOWN_BUYER", "UNKNOWN_SELLER", "INSUFFICIENT_BALANCE", "CARD_DECLINED",
    "CHANNEL_TIMEOUT", "HUABEI_NOT_ACTIVE", "HUABEI_FROZEN", "CREDIT_LIMIT_EXCEEDED", "RISK_REJECTED",
    "ORDER_CANCELLED",
]
RefundRejectionCode = Literal[
    "UNKNOWN_ORDER", "NOT_PAID", "ALREADY_RELEASED", "REFUND_EXCEEDS_PAID", "SELLER_INSUFFICIENT_FUNDS",
]


class PaymentFailed(Strict):
    order_id: Identifier
    reason_code: PaymentFailureCode
    message: StrictStr


class FundsReleased(Strict):
    order_id: Identifier
    seller_id: Identifier
    gross_amount: Fen
    fee_amount: Fen
    net_amount: Fen
    trigger: Literal["confirmed", "auto_confirm"]


class RefundCompleted(Strict):
    order_id: Identifier
    refund_id: Identifier | None  # null for the refund a cancel triggers, as in RefundRejected
    amount: Fen
    payment_method: PaymentMethod


class RefundRejected(Strict):
    order_id: Identifier
    refund_id: Identifier | None
    reason_code: RefundRejectionCode


# ---------------------------------------------------------------- internal events
PiiHash = Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$", description="HMAC-SHA256 (shared/pii.py)")]
Masked = Annotated[StrictStr, Field(max_length=32, description="masked for display, e.g. 138****5678")]


class UserRegistered(Strict):
    """gateway -> users.events: the part of a user other services may keep (event-carried state).
    Personal data only as keyed hashes and masked values (shared/pii.py), never in clear."""
    user_id: Identifier
    birth_date: date | None
    phone_hash: PiiHash | None = None
    phone_masked: Masked | None = None
    id_number_hash: PiiHash | None = None
    id_number_masked: Masked | None = None
    real_name_verified: StrictBool
    registered_at: AwareDatetime
    # Events published before the hashing carried the clear values: still read (the consumer
    # hashes them and keeps only the hash and the mask), never written by the gateway.
    phone: StrictStr | None = Field(default=None, exclude_if=lambda v: v is None, description="legacy: read, never written")
    id_number: StrictStr | None = Field(default=None, exclude_if=lambda v: v is None,
                                        description="legacy: read, never written")


# escrow.commands (gateway -> escrow), keyed by order_id, so escrow sees one order's commands
# in the order the gateway sent them.
class HoldFunds(Strict):
    """The payment is funded: hold it. Re-sent on timeout; escrow answers a repeat again."""
    order_id: Identifier
    payment_id: StrictStr
    buyer_id: Identifier
    seller_id: Identifier
    amount: PositiveFen
    payment_method: PaymentMethod
    installments: StrictInt
    auto_confirm_days: StrictInt


class ShipOrder(Strict):
    order_id: Identifier


class ConfirmOrder(Strict):
    order_id: Identifier


class CancelOrder(Strict):
    """Forwarded as soon as the gateway sees OrderCancelled, even before the hold exists."""
    order_id: Identifier
    reason: StrictStr


class RefundOrder(Strict):
    order_id: Identifier
    refund_id: Identifier
    amount: PositiveFen
    reason: StrictStr


class ClawbackSettled(Strict):
    """The gateway's answer to ClawbackRequested: the seller's wallet paid the refund, or could not."""
    order_id: Identifier
    refund_id: Identifier
    amount: PositiveFen
    ok: StrictBool


# escrow.events (escrow -> gateway), keyed by order_id. The gateway moves the wallet/card money
# and publishes the public payments.events outcome in the same transaction.
class FundsHeld(Strict):
    order_id: Identifier
    payment_id: StrictStr
    amount: PositiveFen


class HoldRefused(Strict):
    order_id: Identifier
    payment_id: StrictStr
    reason_code: PaymentFailureCode
    message: StrictStr


class EscrowReleased(Strict):
    order_id: Identifier
    buyer_id: Identifier
    seller_id: Identifier
    payment_method: PaymentMethod
    gross_amount: Fen
    fee_amount: Fen
    net_amount: Fen
    trigger: Literal["confirmed", "auto_confirm"]


class EscrowRefunded(Strict):
    """Refunded from the hold (before release): pay the buyer back the way the money came."""
    order_id: Identifier
    refund_id: Identifier | None  # None: the refund of a cancel
    buyer_id: Identifier
    payment_method: PaymentMethod
    amount: PositiveFen


class ClawbackRequested(Strict):
    """A refund after release: take `amount` from the seller's wallet and pay the buyer back."""
    order_id: Identifier
    refund_id: Identifier
    buyer_id: Identifier
    seller_id: Identifier
    payment_method: PaymentMethod
    amount: PositiveFen


class EscrowRefundRejected(Strict):
    order_id: Identifier
    refund_id: Identifier | None  # None: a cancel
    reason_code: RefundRejectionCode


# credit.commands (gateway -> credit), keyed by order_id: Huabei drawdowns as try/confirm/cancel.
class ReserveCredit(Strict):
    """Try: reserve `amount` of the buyer's available credit for this order (idempotent per order)."""
    order_id: Identifier
    user_id: Identifier
    amount: PositiveFen
    installments: Literal[1, 3, 6, 9, 12]


class CommitCredit(Strict):
    """Confirm, before escrow holds the money: the reservation becomes a drawdown (a loan to the
    buyer), or is refused if it expired and the line no longer has room for it."""
    order_id: Identifier


class CancelCredit(Strict):
    """Cancel: the saga compensates; the reservation is released (a committed drawdown reversed)."""
    order_id: Identifier


class RestoreCredit(Strict):
    """Refunded principal of a Huabei-funded order goes back to the lender: the line is restored."""
    order_id: Identifier
    user_id: Identifier
    amount: PositiveFen
    refund_key: StrictStr  # unique per refund (refund_id, or "cancel"), for idempotence


# credit.events (credit -> gateway, billing), keyed by order_id (drawdowns) or user_id.
class CreditReserved(Strict):
    order_id: Identifier
    user_id: Identifier
    amount: PositiveFen


class CreditRefused(Strict):
    order_id: Identifier
    user_id: Identifier
    reason_code: Literal["HUABEI_NOT_ACTIVE", "HUABEI_FROZEN", "CREDIT_LIMIT_EXCEEDED"]
    message: StrictStr


class DrawdownCommitted(Strict):
    order_id: Identifier
    user_id: Identifier
    amount: PositiveFen
    installments: Literal[1, 3, 6, 9, 12]
    committed_at: AwareDatetime


class DrawdownRefunded(Strict):
    order_id: Identifier
    user_id: Identifier
    amount: PositiveFen
    refund_key: StrictStr
    refunded_at: AwareDatetime


# billing.commands (gateway -> billing), keyed by user_id.
class ApplyRepayment(Strict):
    """The gateway has taken `amount` from the wallet or card; billing allocates it."""
    repayment_id: StrictStr
    user_id: Identifier
    amount: PositiveFen
    requested_at: AwareDatetime


# billing.events (billing -> gateway, credit), keyed by user_id.
class AllocationLine(Strict):
    item_id: StrictStr          # what was paid: a statement or an installment period
    kind: Literal["statement", "installment", "open_cycle"]
    statement_id: StrictStr | None
    due_on: date | None
    penalty: Fen
    fee: Fen
    principal: Fen


class RepaymentAllocated(Strict):
    """How a repayment was allocated (oldest due first; penalty, then fee, then principal).
    The gateway sends principal to the lender, fee + penalty to billing, the overpayment back
    to the wallet."""
    repayment_id: StrictStr
    user_id: Identifier
    amount: PositiveFen
    principal: Fen
    fee: Fen
    penalty: Fen
    overpayment: Fen
    lines: list[AllocationLine]


class OverpaymentRefunded(Strict):
    """A refund of an already repaid Huabei purchase: the excess goes to the buyer's wallet."""
    user_id: Identifier
    order_id: Identifier
    refund_key: StrictStr
    amount: PositiveFen


# billing.events (billing -> credit), keyed by user_id: repayment behaviour and overdue status.
class RepaymentApplied(Strict):
    user_id: Identifier
    repayment_id: StrictStr
    principal: Fen           # repaid principal: restores the credit line
    on_time: StrictBool      # paid by the end of the due day of what it paid
    applied_at: AwareDatetime


class AccountOverdue(Strict):
    """Something is overdue: freeze Huabei for new purchases."""
    user_id: Identifier
    days_overdue: StrictInt
    as_of: AwareDatetime


class AccountSettled(Strict):
    """Every overdue amount is repaid: unfreeze."""
    user_id: Identifier
    as_of: AwareDatetime


# risk.requests (gateway -> risk engine), keyed by buyer_id: the payment saga asks before funding.
class RiskCheckRequested(Strict):
    order_id: Identifier
    buyer_id: Identifier
    seller_id: Identifier
    amount: PositiveFen
    payment_method: PaymentMethod
    card_token: CardToken | None
    accepted_at: AwareDatetime  # when the platform accepted the order, by its clock: windows use this
    buyer_registered_at: AwareDatetime | None


class CardDeclined(Strict):
    """gateway -> risk.requests (keyed by buyer_id): a card charge was declined, for card_decline_burst."""
    order_id: Identifier
    buyer_id: Identifier
    card_token: CardToken
    declined_at: AwareDatetime


class PaymentAbandoned(Strict):
    """gateway -> risk.requests (keyed by buyer_id): a payment the risk engine let through failed
    later (or an operator rejected it after review): its amount leaves the buyer's daily window.
    Travels the same way as the order's RiskCheckRequested (by card when it had one), so it is
    never applied before it."""
    order_id: Identifier
    buyer_id: Identifier
    amount: PositiveFen
    card_token: CardToken | None
    accepted_at: AwareDatetime  # of the order, as in its RiskCheckRequested


# risk.decisions (risk engine -> gateway), keyed by order_id.
class RiskDecided(Strict):
    order_id: Identifier
    decision: Literal["approve", "review", "reject"]
    rules: list[StrictStr]  # names of the rules that fired (empty for a plain approve)
    message: StrictStr


# Which event types each consumed topic carries.
SCHEMAS: dict[str, dict[str, type[Strict]]] = {
    topics.ORDERS: {m.__name__: m for m in (OrderPlaced, OrderShipped, OrderConfirmed, OrderCancelled, RefundRequested)},
    topics.PAYMENTS: {m.__name__: m for m in (PaymentSucceeded, PaymentFailed, FundsReleased, RefundCompleted, RefundRejected)},
    topics.USERS: {m.__name__: m for m in (UserRegistered,)},
    topics.ESCROW_COMMANDS: {m.__name__: m for m in (HoldFunds, ShipOrder, ConfirmOrder, CancelOrder, RefundOrder,
                                                     ClawbackSettled)},
    topics.CREDIT_COMMANDS: {m.__name__: m for m in (ReserveCredit, CommitCredit, CancelCredit, RestoreCredit)},
    topics.CREDIT_EVENTS: {m.__name__: m for m in (CreditReserved, CreditRefused, DrawdownCommitted,
                                                   DrawdownRefunded)},
    topics.BILLING_COMMANDS: {m.__name__: m for m in (ApplyRepayment,)},
    topics.BILLING_EVENTS: {m.__name__: m for m in (RepaymentApplied, AccountOverdue, AccountSettled,
                                                    RepaymentAllocated, OverpaymentRefunded)},
    topics.RISK_REQUESTS: {m.__name__: m for m in (RiskCheckRequested, CardDeclined, PaymentAbandoned)},
    topics.RISK_DECISIONS: {m.__name__: m for m in (RiskDecided,)},
    topics.ESCROW_EVENTS: {m.__name__: m for m in (FundsHeld, HoldRefused, EscrowReleased, EscrowRefunded,
                                                   ClawbackRequested, EscrowRefundRejected)},
}


# ---------------------------------------------------------------- decoding
class DecodeError(Exception):
    """A record that can never be accepted; `code` goes to the DLQ's `error.code` header."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _describe(exc: ValidationError, prefix: str) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{prefix}{where}: {err['msg']}")
    return "; ".join(parts)


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _loads(raw: bytes) -> Any:
    """orjson (UTF-8 only, as docs/contract.md §2 wants; several times faster than the json
    module). What it refuses goes through the json module, which is more lenient (NaN,
    Infinity), so every record gets the same outcome and error code as before. An integer beyond
    64 bits comes out of orjson as a float: every integer field is a strict, bounded int, so such
    a record is INVALID_DATA either way."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        # json.loads would also take UTF-16 and UTF-32 bytes: decoded as UTF-8 first.
        return json.loads(raw.decode("utf-8"))


def decode(raw: bytes | None, schemas: dict[str, type[Strict]], topic: str = "") -> tuple[Envelope, Strict]:
    """Bytes -> (envelope, typed data) for a topic carrying `schemas` (type -> model), or
    DecodeError with INVALID_JSON, INVALID_ENVELOPE, UNKNOWN_EVENT_TYPE or INVALID_DATA."""
    try:
        obj = _loads(raw) if raw is not None else None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError("INVALID_JSON", f"value is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise DecodeError("INVALID_ENVELOPE", "value must be a JSON object")
    # No text may hold a NUL (Postgres text cannot store one): a record the schema accepts
    # must be one the platform can carry out. Checked only when the escape appears at all.
    nul = b"\\u0000" in raw
    if nul and _has_nul({k: v for k, v in obj.items() if k != "data"}):
        raise DecodeError("INVALID_ENVELOPE", "text fields must not contain the NUL character (\\u0000)")
    try:
        env = Envelope.model_validate(obj)
    except ValidationError as exc:
        raise DecodeError("INVALID_ENVELOPE", _describe(exc, "")) from None
    if nul and _has_nul(env.data):
        raise DecodeError("INVALID_DATA", "data: text fields must not contain the NUL character (\\u0000)")
    model = schemas.get(env.type)
    if model is None:
        raise DecodeError("UNKNOWN_EVENT_TYPE", f"unknown event type {env.type!r}" + (f" on {topic}" if topic else ""))
    try:
        data = model.model_validate(env.data)
    except ValidationError as exc:
        raise DecodeError("INVALID_DATA", _describe(exc, "data.")) from None
    return env, data


# ---------------------------------------------------------------- encoding
def rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_event(data: Strict, *, source: str, occurred_at: datetime, correlation_id: str | None = None,
              causation_id: str | None = None, event_id: str | None = None) -> dict[str, Any]:
    """An envelope as a JSON-ready dict."""
    return {
        "event_id": event_id or str(uuid.uuid4()),
        "type": type(data).__name__,
        "version": 1,
        "occurred_at": rfc3339(occurred_at),
        "source": source,
        "correlation_id": correlation_id,
        "causation_id": causation_id,
        "data": data.model_dump(mode="json"),
    }


def encode(envelope: dict[str, Any]) -> bytes:
    # The same bytes as json.dumps(separators=(",", ":"), ensure_ascii=False).encode(), faster.
    return orjson.dumps(envelope, option=orjson.OPT_NON_STR_KEYS)


# ---------------------------------------------------------------- JSON Schema export
def write_schemas(folder: str) -> list[str]:
    import pathlib

    out = pathlib.Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    models = [Envelope] + [m for by_type in SCHEMAS.values() for m in by_type.values()] + [AllocationLine]
    for model in models:
        path = out / f"{model.__name__}.json"
        path.write_text(json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n")
        written.append(str(path))
    return written


if __name__ == "__main__":
    import sys

    for p in write_schemas(sys.argv[1] if len(sys.argv) > 1 else "docs/schemas"):
        print(p)
