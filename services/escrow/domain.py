"""Escrow rules, pure: no I/O. One order's escrow as a state machine.

Each `on_*` function takes the current escrow (None: no row yet) and a command and returns a
`Decision`: the new state to save, the ledger transfers to make, the refund to record and the
events to emit. handlers.py applies decisions; nothing here touches a database or the clock.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Mapping

from shared.events import (ClawbackRequested, EscrowRefunded, EscrowRefundRejected, EscrowReleased, FundsHeld,
                           HoldFunds, HoldRefused, RefundOrder, Strict)
from shared.money import apply_rate, percent
from shared.settings import env_percent


class Status(StrEnum):
    HELD = "HELD"            # money held (possibly partly refunded already)
    RELEASED = "RELEASED"    # what was still held went to the seller (later refunds are clawbacks)
    REFUNDED = "REFUNDED"    # everything held went back to the buyer before release
    CANCELLED = "CANCELLED"  # cancelled before any hold: a marker so a late HoldFunds is refused


class RefundKind(StrEnum):
    FROM_HOLD = "from_hold"  # before release: taken from the hold
    CLAWBACK = "clawback"    # after release: taken back from the seller's wallet by the gateway


class RefundState(StrEnum):
    COMPLETED = "completed"
    PENDING = "pending"      # a clawback the gateway has not settled yet; reserved in the sum rule
    REJECTED = "rejected"


# ---------------------------------------------------------------- settings
FEE_SETTINGS = {"balance": "MERCHANT_FEE_BALANCE_PCT", "bank_card": "MERCHANT_FEE_BANK_CARD_PCT",
                "huabei": "MERCHANT_FEE_HUABEI_PCT"}


@dataclass(frozen=True)
class FeeRates:
    """Merchant fee on release by funding source (docs/contract.md §5), as fractions (0.006 = 0.60 %)."""
    balance: Decimal = percent("0.60")
    bank_card: Decimal = percent("0.60")
    huabei: Decimal = percent("0.80")

    def for_method(self, method: str) -> Decimal:
        return {"balance": self.balance, "bank_card": self.bank_card, "huabei": self.huabei}[method]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "FeeRates":
        """Percent strings ("0.60") from MERCHANT_FEE_*_PCT; unset or blank keeps the default; a
        bad value is a SettingsError naming the variable."""
        default = cls()
        return cls(**{method: env_percent(name, getattr(default, method), environ=env)
                      for method, name in FEE_SETTINGS.items()})


# ---------------------------------------------------------------- state
@dataclass(frozen=True)
class Escrow:
    order_id: str
    status: Status
    payment_id: str | None = None
    buyer_id: str | None = None
    seller_id: str | None = None
    payment_method: str | None = None
    installments: int = 1
    amount: int = 0                 # paid into escrow
    auto_confirm_days: int = 0
    auto_confirm_at: datetime | None = None  # set by the first shipment: the timer
    refunded_from_hold: int = 0     # refunds taken from the hold (incl. a cancel's)
    clawed_back: int = 0            # completed refunds after release
    pending_clawbacks: int = 0      # clawbacks requested, not settled yet
    released_gross: int = 0
    fee_amount: int = 0
    net_amount: int = 0
    released_at: datetime | None = None

    @property
    def held(self) -> int:
        """What is still in escrow."""
        return self.amount - self.refunded_from_hold - self.released_gross

    @property
    def refunded_total(self) -> int:
        """Completed refunds, before and after release."""
        return self.refunded_from_hold + self.clawed_back


@dataclass(frozen=True)
class Refund:
    order_id: str
    refund_id: str | None  # None: the refund of a cancel
    amount: int
    kind: RefundKind
    state: RefundState
    reason_code: str | None = None  # why it was rejected


@dataclass(frozen=True)
class Transfer:
    """A ledger transfer (shared.ledger.transfer); ids are deterministic so a retry is a no-op."""
    id: str
    debit: str
    credit: str
    amount: int
    code: str


@dataclass(frozen=True)
class Decision:
    escrow: Escrow | None = None        # the new state to save; None: unchanged
    transfers: tuple[Transfer, ...] = ()
    refund: Refund | None = None        # a refund to record (new, or a pending one settled)
    emit: tuple[Strict, ...] = ()       # escrow.events, keyed by the order

    @property
    def changes_nothing(self) -> bool:
        return self.escrow is None and not self.transfers and self.refund is None and not self.emit


NOTHING = Decision()

# Ledger accounts of escrow (shared/ledger.py).
GATEWAY = "gateway"                     # what escrow received from the gateway (debit-normal)
FEE_REVENUE = "revenue:merchant_fee"
HOLD_PREFIX = "hold:"                   # one per order: what escrow holds for it


def hold_account(order_id: str) -> str:
    return f"{HOLD_PREFIX}{order_id}"


def _transfers(*candidates: Transfer) -> tuple[Transfer, ...]:
    return tuple(t for t in candidates if t.amount > 0)  # a ledger transfer moves at least 1 fen


# ---------------------------------------------------------------- hold
def on_hold(escrow: Escrow | None, cmd: HoldFunds) -> Decision:
    if escrow is None:
        held = Escrow(order_id=cmd.order_id, status=Status.HELD, payment_id=cmd.payment_id, buyer_id=cmd.buyer_id,
                      seller_id=cmd.seller_id, payment_method=cmd.payment_method, installments=cmd.installments,
                      amount=cmd.amount, auto_confirm_days=cmd.auto_confirm_days)
        return Decision(
            escrow=held,
            transfers=_transfers(Transfer(f"hold:{cmd.order_id}", GATEWAY, hold_account(cmd.order_id), cmd.amount,
                                          "hold")),
            emit=(FundsHeld(order_id=cmd.order_id, payment_id=cmd.payment_id, amount=cmd.amount),))
    if escrow.status is Status.CANCELLED:
        return Decision(emit=(HoldRefused(order_id=cmd.order_id, payment_id=cmd.payment_id,
                                          reason_code="ORDER_CANCELLED",
                                          message=f"order {cmd.order_id} was cancelled before its payment was held"),))
    if escrow.payment_id == cmd.payment_id:
        # The gateway re-sends HoldFunds when our answer is late: answer again, change nothing.
        return Decision(emit=(FundsHeld(order_id=cmd.order_id, payment_id=cmd.payment_id, amount=escrow.amount),))
    return Decision(emit=(HoldRefused(order_id=cmd.order_id, payment_id=cmd.payment_id,
                                      reason_code="DUPLICATE_ORDER",
                                      message=f"order {cmd.order_id} already holds payment {escrow.payment_id}"),))


# ---------------------------------------------------------------- ship, confirm, release
def on_ship(escrow: Escrow | None, now: datetime) -> Decision:
    """Start the auto-confirm timer; shipping again does not move it."""
    if escrow is None or escrow.status is not Status.HELD or escrow.held <= 0 or escrow.auto_confirm_at is not None:
        return NOTHING
    return Decision(escrow=replace(escrow, auto_confirm_at=now + timedelta(days=escrow.auto_confirm_days)))


def release_amounts(gross: int, method: str, rates: FeeRates) -> tuple[int, int, int]:
    """(gross, fee, net): one round_half_up of gross × the method's fee rate."""
    fee = apply_rate(gross, rates.for_method(method))
    return gross, fee, gross - fee


def release(escrow: Escrow | None, trigger: str, now: datetime, rates: FeeRates) -> Decision:
    """Pay the seller what is still held, less the merchant fee. Nothing held: nothing happens."""
    if escrow is None or escrow.status is not Status.HELD or escrow.held <= 0:
        return NOTHING
    gross, fee, net = release_amounts(escrow.held, escrow.payment_method, rates)
    order_id, hold = escrow.order_id, hold_account(escrow.order_id)
    return Decision(
        escrow=replace(escrow, status=Status.RELEASED, released_gross=gross, fee_amount=fee, net_amount=net,
                       released_at=now),
        transfers=_transfers(Transfer(f"release-fee:{order_id}", hold, FEE_REVENUE, fee, "fee"),
                             Transfer(f"release-net:{order_id}", hold, GATEWAY, net, "release")),
        emit=(EscrowReleased(order_id=order_id, buyer_id=escrow.buyer_id, seller_id=escrow.seller_id,
                             payment_method=escrow.payment_method, gross_amount=gross, fee_amount=fee,
                             net_amount=net, trigger=trigger),))


def on_confirm(escrow: Escrow | None, now: datetime, rates: FeeRates) -> Decision:
    return release(escrow, "confirmed", now, rates)


def due_for_auto_confirm(escrow: Escrow, now: datetime) -> bool:
    return (escrow.status is Status.HELD and escrow.held > 0 and escrow.auto_confirm_at is not None
            and escrow.auto_confirm_at <= now)


def on_auto_confirm(escrow: Escrow, now: datetime, rates: FeeRates) -> Decision:
    return release(escrow, "auto_confirm", now, rates) if due_for_auto_confirm(escrow, now) else NOTHING


# ---------------------------------------------------------------- cancel, refund
def _take_from_hold(escrow: Escrow, refund_id: str | None, amount: int) -> Decision:
    refunded = escrow.refunded_from_hold + amount
    status = Status.REFUNDED if refunded >= escrow.amount else escrow.status
    # The cancel's transfer id must not collide with a refund_id (which may well be "cancel").
    transfer_id = f"refund:{escrow.order_id}:{refund_id}" if refund_id else f"cancel:{escrow.order_id}"
    return Decision(
        escrow=replace(escrow, refunded_from_hold=refunded, status=status),
        transfers=_transfers(Transfer(transfer_id, hold_account(escrow.order_id), GATEWAY, amount, "refund")),
        refund=Refund(escrow.order_id, refund_id, amount, RefundKind.FROM_HOLD, RefundState.COMPLETED),
        emit=(EscrowRefunded(order_id=escrow.order_id, refund_id=refund_id, buyer_id=escrow.buyer_id,
                             payment_method=escrow.payment_method, amount=amount),))


def _reject(order_id: str, refund_id: str | None, reason_code: str, record: Refund | None = None) -> Decision:
    return Decision(refund=record,
                    emit=(EscrowRefundRejected(order_id=order_id, refund_id=refund_id, reason_code=reason_code),))


def on_cancel(escrow: Escrow | None, order_id: str) -> Decision:
    """Before release, refund everything still held; before any hold, leave a marker."""
    if escrow is None:
        return Decision(escrow=Escrow(order_id=order_id, status=Status.CANCELLED))
    if escrow.status is Status.CANCELLED:
        return NOTHING
    if escrow.status is Status.RELEASED:
        return _reject(order_id, None, "ALREADY_RELEASED")
    if escrow.held > 0:
        return _take_from_hold(escrow, None, escrow.held)
    return _reject(order_id, None, "REFUND_EXCEEDS_PAID")  # refunded already


def on_refund(escrow: Escrow | None, cmd: RefundOrder, seen_before: bool) -> Decision:
    """`seen_before`: this refund_id was already decided for this order (then: no effect)."""
    if seen_before:
        return NOTHING
    released = escrow is not None and escrow.status is Status.RELEASED
    kind = RefundKind.CLAWBACK if released else RefundKind.FROM_HOLD

    def rejected(code: str) -> Decision:
        # Recorded so that the same refund_id again has no effect.
        return _reject(cmd.order_id, cmd.refund_id, code,
                       Refund(cmd.order_id, cmd.refund_id, cmd.amount, kind, RefundState.REJECTED, code))

    if escrow is None or escrow.status is Status.CANCELLED:
        return rejected("NOT_PAID")
    # Pending clawbacks count: two refunds racing for the same money cannot both win.
    if escrow.refunded_total + escrow.pending_clawbacks + cmd.amount > escrow.amount:
        return rejected("REFUND_EXCEEDS_PAID")
    if not released:
        return _take_from_hold(escrow, cmd.refund_id, cmd.amount)
    return Decision(
        escrow=replace(escrow, pending_clawbacks=escrow.pending_clawbacks + cmd.amount),
        refund=Refund(cmd.order_id, cmd.refund_id, cmd.amount, RefundKind.CLAWBACK, RefundState.PENDING),
        emit=(ClawbackRequested(order_id=cmd.order_id, refund_id=cmd.refund_id, buyer_id=escrow.buyer_id,
                                seller_id=escrow.seller_id, payment_method=escrow.payment_method,
                                amount=cmd.amount),))


def on_clawback_settled(escrow: Escrow | None, refund: Refund | None, ok: bool) -> Decision:
    """The gateway took the money back from the seller (ok) or could not: settle the pending
    refund either way. The gateway publishes the public outcome; escrow emits nothing."""
    if escrow is None or refund is None or refund.state is not RefundState.PENDING:
        return NOTHING  # unknown or already settled
    pending = escrow.pending_clawbacks - refund.amount
    if ok:
        return Decision(escrow=replace(escrow, pending_clawbacks=pending,
                                       clawed_back=escrow.clawed_back + refund.amount),
                        refund=replace(refund, state=RefundState.COMPLETED))
    return Decision(escrow=replace(escrow, pending_clawbacks=pending),
                    refund=replace(refund, state=RefundState.REJECTED, reason_code="SELLER_INSUFFICIENT_FUNDS"))
