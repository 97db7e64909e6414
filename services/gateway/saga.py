"""The payment saga's core, pure: no I/O, no clock reads.

`decide(payment, event, now, rules)` takes a payment as it stands and one thing that happened to
it, and returns a `Decision`: the payment's new state (its timers `next_action_at` and
`deadline_at` included), the ledger transfers, the bank channel calls and the events to emit,
and what becomes of the upstream events kept for the order. handlers.py loads the payment,
calls `decide` and applies the decision in one place (`handlers.apply`; the set paths apply
many at once); tests/unit/test_saga_simulation.py drives the same function through a simulated
bus. Events the payment's state does not expect (late, repeated, or after the end) change
nothing: `decide` returns `NOTHING`.

Inputs: the consumed events themselves (`RiskDecided`, `CreditReserved`, `CreditRefused`,
`DrawdownCommitted`, `FundsHeld`, `HoldRefused`, `EscrowReleased`, `EscrowRefunded`,
`ClawbackRequested`), and `Placed` (the payment row was just created), `ReviewDecided` (an
operator), `Due` (the saga worker: the payment's `next_action_at` has come, with the card's answer
when `charges_card`), `CancelRequested` (an upstream cancel while the payment is in flight), and
`Short` (the same event again, when its first transfer would have overdrawn a wallet: the applier
found that out).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from datetime import datetime, timedelta
from enum import StrEnum

from services.gateway.accounts import BANK, ESCROW, LENDER, wallet
from services.gateway.bank import ChargeResult
from services.gateway.domain import (PaymentMethod, PaymentStatus, RiskDecision, Route, Rules, SagaState,
                                     counted_by_risk_engine, outcome_for_kept_event, payment_status, risk_fallback,
                                     validation_failure)
from shared import topics
from shared.events import (CancelCredit, CancelOrder, CardDeclined, ClawbackRequested, ClawbackSettled, CommitCredit,
                           ConfirmOrder, CreditRefused, CreditReserved, DrawdownCommitted, EscrowRefunded,
                           EscrowRefundRejected, EscrowReleased, FundsHeld, FundsReleased, HoldFunds, HoldRefused,
                           OrderPlaced, PaymentAbandoned, PaymentFailed, PaymentSucceeded, RefundCompleted,
                           RefundOrder, RefundRejected, ReserveCredit, RestoreCredit, RiskCheckRequested, RiskDecided,
                           ShipOrder, Strict)


def refund_account(payment_method: str, buyer_id: str) -> str:
    """Refunds go back the way the money came: the wallet, the card (bank) or the lender."""
    return {PaymentMethod.BANK_CARD: BANK, PaymentMethod.HUABEI: LENDER}.get(payment_method) or wallet(buyer_id)


def refund_key(refund_id: str | None) -> str:
    return f"r:{refund_id}" if refund_id else "cancel"


# ---------------------------------------------------------------- the payment
@dataclass(frozen=True)
class Payment:
    """The saga's view of a payments row (the columns it reads or writes)."""
    order_id: str
    payment_id: str
    buyer_id: str
    seller_id: str
    amount: int
    payment_method: str  # a PaymentMethod value
    card_token: str | None
    installments: int
    auto_confirm_days: int
    accepted_at: datetime
    placed_event_id: str = ""
    currency: str = "CNY"
    state: SagaState = SagaState.NEW
    status: PaymentStatus = PaymentStatus.PENDING
    reason_code: str | None = None
    message: str | None = None
    next_action_at: datetime | None = None  # when the saga worker looks again (a retry or a deadline)
    deadline_at: datetime | None = None     # when the current step gives up
    attempts: int = 0
    cancel_requested: bool = False
    risk_decision: str | None = None
    risk_rules: tuple[str, ...] = ()
    risk_message: str | None = None
    refunded: int = 0
    released_gross: int | None = None
    fee_amount: int | None = None
    net_amount: int | None = None

    @classmethod
    def new(cls, order: OrderPlaced, event_id: str, now: datetime) -> "Payment":
        return cls(order_id=order.order_id, payment_id=f"pay_{order.order_id}", buyer_id=order.buyer_id,
                   seller_id=order.seller_id, amount=order.amount, payment_method=order.payment_method,
                   card_token=order.card_token, installments=order.installments,
                   auto_confirm_days=order.auto_confirm_days, accepted_at=now, placed_event_id=event_id,
                   currency=order.currency)

    @classmethod
    def from_row(cls, row) -> "Payment":
        p = object.__new__(cls)  # the fields as they are in the row: no __init__ (the per-event path is hot)
        p.__dict__.update({f: row[f] for f in _ROW_FIELDS}, state=SagaState(row["saga_state"]),
                          status=PaymentStatus(row["status"]), risk_rules=tuple(row["risk_rules"] or ()))
        return p

    def but(self, **changes) -> "Payment":
        """A copy with `changes` (dataclasses.replace without re-running __init__: ten times faster)."""
        if not changes.keys() <= _FIELDS:
            raise TypeError(f"no such payment fields: {sorted(changes.keys() - _FIELDS)}")
        p = object.__new__(Payment)
        p.__dict__.update(self.__dict__, **changes)
        return p


_FIELDS = frozenset(f.name for f in fields(Payment))
_ROW_FIELDS = tuple(f for f in _FIELDS if f not in ("state", "status", "risk_rules"))
_MUTABLE = ("state", "status", "reason_code", "message", "next_action_at", "deadline_at", "attempts",
            "cancel_requested", "risk_decision", "risk_rules", "risk_message", "refunded", "released_gross",
            "fee_amount", "net_amount")
COLUMNS = {"state": "saga_state"}  # field -> column where the names differ


def column_values(p: Payment) -> dict:
    """Every column the saga writes, as the database takes it."""
    return {COLUMNS.get(f, f): _db(getattr(p, f)) for f in _MUTABLE}


def changes(old: Payment, new: Payment) -> dict:
    """The columns that differ between two states of a payment, as the database takes them."""
    return {COLUMNS.get(f, f): _db(getattr(new, f)) for f in _MUTABLE if getattr(old, f) != getattr(new, f)}


def _db(value):
    if isinstance(value, (SagaState, PaymentStatus)):
        return value.value
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------- inputs that are not events
@dataclass(frozen=True)
class Placed:
    """The payment row was just created from its OrderPlaced."""
    buyer_registered_at: datetime | None  # None: the buyer is not a registered user
    seller_known: bool


@dataclass(frozen=True)
class ReviewDecided:
    approve: bool


@dataclass(frozen=True)
class Due:
    """The payment's next_action_at has come. `card`: the bank's answer to the authorization
    the worker asked for (only when `charges_card`)."""
    card: ChargeResult | None = None


@dataclass(frozen=True)
class CancelRequested:
    """An OrderCancelled while the payment is in flight (forwarded to escrow by the caller)."""


@dataclass(frozen=True)
class Short:
    """`event` again: its first transfer would overdraw a wallet that has `available` fen."""
    event: object
    available: int


# ---------------------------------------------------------------- the decision
@dataclass(frozen=True)
class Transfer:
    """A ledger transfer (shared.ledger.transfer): deterministic id, so a retry is a no-op. A
    transfer that debits a wallet may be refused; a decision has at most one, and first."""
    id: str
    debit: str
    credit: str
    amount: int
    code: str
    pending: bool = False


@dataclass(frozen=True)
class Resolve:
    """Post (or void) a pending transfer."""
    id: str
    pending_id: str
    post: bool


class BankOp(StrEnum):
    """What a decision asks of the bank channel (authorize is the worker's, before deciding)."""
    CAPTURE = "capture"  # take the authorized amount: escrow holds the order
    VOID = "void"        # drop the authorization: the saga compensates
    REFUND = "refund"    # give a captured amount back


@dataclass(frozen=True)
class Bank:
    """A bank channel call."""
    op: BankOp
    request_id: str
    amount: int = 0
    charge_id: str | None = None


@dataclass(frozen=True)
class Emit:
    topic: str
    key: str
    data: Strict


@dataclass(frozen=True)
class Kept:
    """The payment has its outcome: the upstream events kept for it go on (failed_reason None:
    forwarded to escrow, oldest first) or get theirs (see `kept_outcomes`)."""
    failed_reason: str | None


@dataclass(frozen=True)
class Decision:
    payment: Payment | None = None      # the new state; None: unchanged
    ledger: tuple[Transfer | Resolve, ...] = ()
    bank: tuple[Bank, ...] = ()
    emit: tuple[Emit, ...] = ()
    kept: Kept | None = None

    @property
    def changes_nothing(self) -> bool:
        return self.payment is None and not self.ledger and not self.bank and not self.emit and self.kept is None


NOTHING = Decision()


def charges_card(p: Payment) -> bool:
    """Whether the worker asks the bank to authorize the card before deciding `Due`."""
    return p.state is SagaState.FUNDING and not p.cancel_requested


def kept_outcomes(failed_reason: str, cancels_in_flight: list[dict], pending: list[dict]) -> list[tuple[dict, str]]:
    """For a failed payment: (kept event, who caused the answer: "payment" or "event") for each
    kept event that gets a RefundRejected NOT_PAID. A cancel that stopped the payment has the
    PaymentFailed ORDER_CANCELLED as its outcome; any other cancel or a refund is NOT_PAID."""
    rejected = [] if failed_reason == "ORDER_CANCELLED" else [(c, "payment") for c in cancels_in_flight]
    return rejected + [(e, "event") for e in pending
                       if outcome_for_kept_event(e["type"], failed_reason) is Route.REJECT_NOT_PAID]


# ---------------------------------------------------------------- building blocks
def _payment_event(p: Payment, data: Strict) -> Emit:
    return Emit(topics.PAYMENTS, p.order_id, data)


def _fail(p: Payment, reason_code: str, message: str, rules: Rules, *, risk_before: str | None,
          ledger: tuple = (), bank: tuple = (), emit: tuple = ()) -> Decision:
    """End in FAILED with one PaymentFailed (compensation, if any, in `ledger`/`bank`/`emit`).
    `risk_before`: the risk decision the payment had before this step (see counted_by_risk_engine)."""
    failed = p.but(state=SagaState.FAILED, status=PaymentStatus.FAILED, reason_code=reason_code, message=message,
                   next_action_at=None)
    out = emit + (_payment_event(p, PaymentFailed(order_id=p.order_id, reason_code=reason_code, message=message)),)
    if rules.risk_enabled and counted_by_risk_engine(reason_code, risk_before):
        out += (Emit(topics.RISK_REQUESTS, p.buyer_id, PaymentAbandoned(
            order_id=p.order_id, buyer_id=p.buyer_id, amount=p.amount, card_token=p.card_token,
            accepted_at=p.accepted_at)),)
    return Decision(payment=failed, ledger=ledger, bank=bank, emit=out, kept=Kept(reason_code))


def hold_command(p: Payment) -> HoldFunds:
    return HoldFunds(order_id=p.order_id, payment_id=p.payment_id, buyer_id=p.buyer_id, seller_id=p.seller_id,
                     amount=p.amount, payment_method=p.payment_method, installments=p.installments,
                     auto_confirm_days=p.auto_confirm_days)


def _reserve_command(p: Payment) -> ReserveCredit:
    return ReserveCredit(order_id=p.order_id, user_id=p.buyer_id, amount=p.amount, installments=p.installments)


def _start_holding(p: Payment, now: datetime, rules: Rules, ledger: tuple = ()) -> Decision:
    """HoldFunds to escrow (again, on a retry), re-sent every hold_retry_seconds until answered."""
    holding = p.but(state=SagaState.HOLDING, attempts=p.attempts + 1,
                    next_action_at=now + timedelta(seconds=rules.hold_retry_seconds))
    return Decision(payment=holding, ledger=ledger, emit=(Emit(topics.ESCROW_COMMANDS, p.order_id, hold_command(p)),))


def _fund(p: Payment, now: datetime, rules: Rules, short: int | None, risk_before: str | None) -> Decision:
    """Move the buyer's money toward escrow: wallet (two-phase), Huabei (try) or card (worker)."""
    if p.payment_method == PaymentMethod.BALANCE:
        if short is not None:
            return _fail(p, "INSUFFICIENT_BALANCE",
                         f"the wallet has {short} fen available, the order needs {p.amount} fen", rules,
                         risk_before=risk_before)
        # Two-phase: reserved now, posted when escrow holds it, voided if the saga compensates.
        reserve = Transfer(f"payment:{p.order_id}", wallet(p.buyer_id), ESCROW, p.amount, "payment", pending=True)
        return _start_holding(p, now, rules, ledger=(reserve,))
    if p.payment_method == PaymentMethod.HUABEI:
        # Try: the credit service reserves the drawdown; confirmed once escrow holds the money.
        return Decision(payment=p.but(state=SagaState.RESERVING,
                                      next_action_at=now + timedelta(seconds=rules.credit_reserve_retry_seconds)),
                        emit=(Emit(topics.CREDIT_COMMANDS, p.order_id, _reserve_command(p)),))
    # bank_card: the saga worker charges the card, outside the consumer's batch.
    return Decision(payment=p.but(state=SagaState.FUNDING, next_action_at=now,
                                  deadline_at=now + timedelta(seconds=rules.channel_timeout_seconds)))


def _risk_decision(p: Payment, decision: str, risk_rules: tuple[str, ...], message: str, now: datetime, rules: Rules,
                   short: int | None) -> Decision:
    """approve -> fund; reject -> RISK_REJECTED; review -> wait for an operator (or the deadline)."""
    before = p.risk_decision
    p = p.but(risk_decision=decision, risk_rules=risk_rules, risk_message=message)
    if decision == RiskDecision.APPROVE:
        return _fund(p, now, rules, short, before)
    if decision == RiskDecision.REJECT:
        return _fail(p, "RISK_REJECTED", message, rules, risk_before=before)
    deadline = now + timedelta(seconds=rules.review_timeout_seconds)
    return Decision(payment=p.but(state=SagaState.REVIEW, next_action_at=deadline, deadline_at=deadline))


# ---------------------------------------------------------------- the saga
def _placed(p: Payment, e: Placed, now: datetime, rules: Rules, short: int | None) -> Decision:
    if p.state is not SagaState.NEW:
        return NOTHING
    failure = validation_failure(buyer_known=e.buyer_registered_at is not None, seller_known=e.seller_known)
    if failure:
        return _fail(p, *failure, rules, risk_before=p.risk_decision)
    if not rules.risk_enabled:
        return _fund(p, now, rules, short, p.risk_decision)
    # The risk engine decides before any money moves; its deadline is the saga's timer.
    deadline = now + timedelta(seconds=rules.risk_timeout_seconds)
    request = RiskCheckRequested(order_id=p.order_id, buyer_id=p.buyer_id, seller_id=p.seller_id, amount=p.amount,
                                 payment_method=p.payment_method, card_token=p.card_token, accepted_at=p.accepted_at,
                                 buyer_registered_at=e.buyer_registered_at)
    return Decision(payment=p.but(state=SagaState.RISK_CHECK, next_action_at=deadline, deadline_at=deadline),
                    emit=(Emit(topics.RISK_REQUESTS, p.buyer_id, request),))


def _risk_decided(p: Payment, e: RiskDecided, now: datetime, rules: Rules, short: int | None) -> Decision:
    if p.state is not SagaState.RISK_CHECK:
        return NOTHING  # late (the fallback decided) or repeated
    return _risk_decision(p, e.decision, tuple(e.rules), e.message, now, rules, short)


def _review_decided(p: Payment, e: ReviewDecided, now: datetime, rules: Rules, short: int | None) -> Decision:
    if p.state is not SagaState.REVIEW:
        return NOTHING
    if e.approve:
        return _risk_decision(p, RiskDecision.APPROVE, p.risk_rules, "approved by an operator after review", now,
                              rules, short)
    message = f"rejected by an operator after review ({', '.join(p.risk_rules)})"
    return _risk_decision(p, RiskDecision.REJECT, p.risk_rules, message, now, rules, short)


def _due(p: Payment, e: Due, now: datetime, rules: Rules, short: int | None) -> Decision:
    state = p.state
    if state is SagaState.RISK_CHECK:
        # The engine is down or slow: the documented fallback keeps the saga moving.
        decision = risk_fallback(p.amount, rules)
        approves = decision == RiskDecision.APPROVE
        message = (f"risk engine did not answer within {rules.risk_timeout_seconds} s: fallback "
                   f"{'approves' if approves else 'rejects'} amounts {'up to' if approves else 'above'} "
                   f"{rules.risk_fallback_approve_max} fen")
        return _risk_decision(p, decision, ("risk_engine_timeout",), message, now, rules, short)
    if state is SagaState.REVIEW:
        return _risk_decision(p, RiskDecision.REJECT, p.risk_rules,
                              f"review not decided within {rules.review_timeout_seconds} s", now, rules, short)
    if state is SagaState.RESERVING:  # credit has not answered: ReserveCredit is idempotent, send it again
        return Decision(payment=p.but(attempts=p.attempts + 1,
                                      next_action_at=now + timedelta(seconds=rules.credit_reserve_retry_seconds)),
                        emit=(Emit(topics.CREDIT_COMMANDS, p.order_id, _reserve_command(p)),))
    if state is SagaState.COMMITTING:  # CommitCredit is idempotent too (credit answers it again)
        return _start_committing(p, now, rules)
    if state is SagaState.HOLDING:  # escrow has not answered: HoldFunds is idempotent, send it again
        return _start_holding(p, now, rules)
    if state is not SagaState.FUNDING:
        return NOTHING
    charge = f"charge:{p.order_id}"
    if p.cancel_requested:
        return _fail(p, "ORDER_CANCELLED", "the order was cancelled before it was paid", rules,
                     risk_before=p.risk_decision, bank=(Bank(BankOp.VOID, charge),))
    if e.card is ChargeResult.APPROVED:
        # Authorized only: captured once escrow holds the order, voided if the saga compensates.
        return _start_holding(p, now, rules)
    if e.card is ChargeResult.DECLINED:
        failed = _fail(p, "CARD_DECLINED", "the bank declined the card", rules, risk_before=p.risk_decision)
        if not rules.risk_enabled:
            return failed
        declined = CardDeclined(order_id=p.order_id, buyer_id=p.buyer_id, card_token=p.card_token, declined_at=now)
        return replace(failed, emit=failed.emit + (Emit(topics.RISK_REQUESTS, p.buyer_id, declined),))
    if p.deadline_at is not None and now >= p.deadline_at:
        # Whatever the channel may still do, nothing is charged.
        return _fail(p, "CHANNEL_TIMEOUT", f"the bank channel did not answer within {rules.channel_timeout_seconds} s",
                     rules, risk_before=p.risk_decision, bank=(Bank(BankOp.VOID, charge),))
    next_at = now + timedelta(seconds=1)
    if p.deadline_at is not None:
        next_at = min(next_at, p.deadline_at)
    return Decision(payment=p.but(attempts=p.attempts + 1, next_action_at=next_at))


def _cancel_requested(p: Payment, e: CancelRequested, now: datetime, rules: Rules, short: int | None) -> Decision:
    if not p.state.in_progress or p.cancel_requested:
        return NOTHING
    return Decision(payment=p.but(cancel_requested=True))


def _start_committing(p: Payment, now: datetime, rules: Rules) -> Decision:
    """CommitCredit (confirm) to credit, re-sent at the reservation's pace until answered."""
    committing = p.but(state=SagaState.COMMITTING, attempts=p.attempts + 1,
                       next_action_at=now + timedelta(seconds=rules.credit_reserve_retry_seconds))
    commit = CommitCredit(order_id=p.order_id)
    return Decision(payment=committing, emit=(Emit(topics.CREDIT_COMMANDS, p.order_id, commit),))


def _credit_reserved(p: Payment, e: CreditReserved, now: datetime, rules: Rules, short: int | None) -> Decision:
    """Confirm the drawdown before any money moves. This answer may come after the reservation
    expired and its credit went to other orders: credit then checks the line again and may
    refuse, which is only safe while escrow holds nothing (docs/design.md, Credit)."""
    if p.state is not SagaState.RESERVING:
        return NOTHING  # the answer to a re-sent reservation: already applied
    if p.cancel_requested:  # escrow will refuse the hold: release the credit now, nothing was drawn
        cancel = Emit(topics.CREDIT_COMMANDS, p.order_id, CancelCredit(order_id=p.order_id))
        return _fail(p, "ORDER_CANCELLED", "the order was cancelled before it was paid", rules,
                     risk_before=p.risk_decision, emit=(cancel,))
    return _start_committing(p, now, rules)


def _credit_refused(p: Payment, e: CreditRefused, now: datetime, rules: Rules, short: int | None) -> Decision:
    """Refused at the reservation, or at the commit of one that had expired: nothing moved yet."""
    if p.state not in (SagaState.RESERVING, SagaState.COMMITTING):
        return NOTHING
    return _fail(p, e.reason_code, e.message, rules, risk_before=p.risk_decision)


def _drawdown_committed(p: Payment, e: DrawdownCommitted, now: datetime, rules: Rules,
                        short: int | None) -> Decision:
    """The buyer owes the lender now: the lender's money goes to escrow."""
    if p.state is not SagaState.COMMITTING:
        return NOTHING  # the answer to a re-sent commit: already applied
    lent = Transfer(f"huabei:{p.order_id}", LENDER, ESCROW, p.amount, "huabei_payment")
    return _start_holding(p, now, rules, ledger=(lent,))


def _funds_held(p: Payment, e: FundsHeld, now: datetime, rules: Rules, short: int | None) -> Decision:
    if p.state is not SagaState.HOLDING:
        return NOTHING  # the answer to a re-sent hold: already applied
    o, ledger, bank = p.order_id, (), ()
    if p.payment_method == PaymentMethod.BALANCE:
        ledger = (Resolve(f"payment-post:{o}", f"payment:{o}", post=True),)
    elif p.payment_method == PaymentMethod.BANK_CARD:
        bank = (Bank(BankOp.CAPTURE, f"charge:{o}", p.amount),)
        ledger = (Transfer(f"charge:{o}", BANK, ESCROW, p.amount, "card_payment"),)
    # huabei: nothing left to settle, the drawdown was committed before the hold
    succeeded = PaymentSucceeded(order_id=o, payment_id=p.payment_id, buyer_id=p.buyer_id, seller_id=p.seller_id,
                                 amount=p.amount, payment_method=p.payment_method, installments=p.installments)
    return Decision(payment=p.but(state=SagaState.COMPLETED, status=PaymentStatus.HELD, next_action_at=None),
                    ledger=ledger, bank=bank, emit=(_payment_event(p, succeeded),), kept=Kept(None))


def _hold_refused(p: Payment, e: HoldRefused, now: datetime, rules: Rules, short: int | None) -> Decision:
    """The order was cancelled (or is a duplicate) at escrow: compensate the funding, then fail."""
    if p.state is not SagaState.HOLDING:
        return NOTHING
    o, ledger, bank, emit = p.order_id, (), (), ()
    if p.payment_method == PaymentMethod.BALANCE:
        ledger = (Resolve(f"payment-void:{o}", f"payment:{o}", post=False),)
    elif p.payment_method == PaymentMethod.HUABEI:  # the lender's money back; credit reverses the drawdown
        ledger = (Transfer(f"huabei-return:{o}", ESCROW, LENDER, p.amount, "huabei_cancel"),)
        emit = (Emit(topics.CREDIT_COMMANDS, o, CancelCredit(order_id=o)),)
    else:  # bank_card: authorized, never captured
        bank = (Bank(BankOp.VOID, f"charge:{o}"),)
    return _fail(p, e.reason_code, e.message, rules, risk_before=p.risk_decision, ledger=ledger, bank=bank, emit=emit)


# ---------------------------------------------------------------- after the payment: escrow's money
def _with_status(p: Payment, **changes) -> Payment:
    p = p.but(**changes)
    return p.but(status=payment_status(amount=p.amount, failed=False, held=True,
                                       released=p.released_gross is not None, refunded=p.refunded))


def _escrow_released(p: Payment, e: EscrowReleased, now: datetime, rules: Rules, short: int | None) -> Decision:
    """The seller's share into their wallet; FundsReleased."""
    if p.released_gross is not None:
        return NOTHING  # released once
    ledger = (Transfer(f"release:{p.order_id}", ESCROW, wallet(e.seller_id), e.net_amount, "release"),) \
        if e.net_amount else ()
    released = FundsReleased(order_id=p.order_id, seller_id=e.seller_id, gross_amount=e.gross_amount,
                             fee_amount=e.fee_amount, net_amount=e.net_amount, trigger=e.trigger)
    return Decision(payment=_with_status(p, released_gross=e.gross_amount, fee_amount=e.fee_amount,
                                         net_amount=e.net_amount),
                    ledger=ledger, emit=(_payment_event(p, released),))


def _restore(p: Payment, e, cause_refund_id: str | None) -> tuple[Emit, ...]:
    if e.payment_method != PaymentMethod.HUABEI:
        return ()
    return (Emit(topics.CREDIT_COMMANDS, p.order_id, RestoreCredit(
        order_id=p.order_id, user_id=e.buyer_id, amount=e.amount, refund_key=refund_key(cause_refund_id))),)


def _escrow_refunded(p: Payment, e: EscrowRefunded, now: datetime, rules: Rules, short: int | None) -> Decision:
    """Refunded from the hold: back the way the money came."""
    # A cancel's refund has no refund_id; its own id space keeps it apart from a refund named "cancel".
    transfer_id = f"refund:{p.order_id}:{e.refund_id}" if e.refund_id else f"cancel-refund:{p.order_id}"
    bank = (Bank(BankOp.REFUND, transfer_id, e.amount, f"charge:{p.order_id}"),) \
        if e.payment_method == PaymentMethod.BANK_CARD else ()
    completed = RefundCompleted(order_id=p.order_id, refund_id=e.refund_id, amount=e.amount,
                                payment_method=e.payment_method)
    return Decision(payment=_with_status(p, refunded=p.refunded + e.amount),
                    ledger=(Transfer(transfer_id, ESCROW, refund_account(e.payment_method, e.buyer_id), e.amount,
                                     "refund"),),
                    bank=bank, emit=_restore(p, e, e.refund_id) + (_payment_event(p, completed),))


def _clawback_requested(p: Payment, e: ClawbackRequested, now: datetime, rules: Rules, short: int | None) -> Decision:
    """A refund after release: from the seller's wallet back the way the money came, or rejected."""
    transfer_id = f"clawback:{p.order_id}:{e.refund_id}"
    if short is not None:
        rejected = RefundRejected(order_id=p.order_id, refund_id=e.refund_id, reason_code="SELLER_INSUFFICIENT_FUNDS")
        return Decision(emit=(_payment_event(p, rejected), Emit(topics.ESCROW_COMMANDS, p.order_id, ClawbackSettled(
            order_id=p.order_id, refund_id=e.refund_id, amount=e.amount, ok=False))))
    bank = (Bank(BankOp.REFUND, transfer_id, e.amount, f"charge:{p.order_id}"),) \
        if e.payment_method == PaymentMethod.BANK_CARD else ()
    completed = RefundCompleted(order_id=p.order_id, refund_id=e.refund_id, amount=e.amount,
                                payment_method=e.payment_method)
    return Decision(payment=_with_status(p, refunded=p.refunded + e.amount),
                    ledger=(Transfer(transfer_id, wallet(e.seller_id), refund_account(e.payment_method, e.buyer_id),
                                     e.amount, "clawback"),),
                    bank=bank,
                    emit=_restore(p, e, e.refund_id) + (_payment_event(p, completed), Emit(
                        topics.ESCROW_COMMANDS, p.order_id, ClawbackSettled(order_id=p.order_id, refund_id=e.refund_id,
                                                                            amount=e.amount, ok=True))))


def refund_rejected(e: EscrowRefundRejected) -> Decision:
    """Escrow refused a refund or a cancel: the public outcome (no payment needed)."""
    return Decision(emit=(Emit(topics.PAYMENTS, e.order_id, RefundRejected(
        order_id=e.order_id, refund_id=e.refund_id, reason_code=e.reason_code)),))


def duplicate_order(order: OrderPlaced) -> Decision:
    """docs/contract.md §3: the same order_id from another event is refused and changes nothing."""
    return Decision(emit=(Emit(topics.PAYMENTS, order.order_id, PaymentFailed(
        order_id=order.order_id, reason_code="DUPLICATE_ORDER",
        message=f"order {order.order_id} was already placed by another event")),))


def forward_command(event_type: str, data: dict) -> Strict:
    """The escrow command for an upstream order event the gateway forwards."""
    order_id = data["order_id"]
    if event_type == "OrderShipped":
        return ShipOrder(order_id=order_id)
    if event_type == "OrderConfirmed":
        return ConfirmOrder(order_id=order_id)
    if event_type == "OrderCancelled":
        return CancelOrder(order_id=order_id, reason=data["reason"])
    return RefundOrder(order_id=order_id, refund_id=data["refund_id"], amount=data["amount"], reason=data["reason"])


_RULES = {
    Placed: _placed,
    RiskDecided: _risk_decided,
    ReviewDecided: _review_decided,
    Due: _due,
    CancelRequested: _cancel_requested,
    CreditReserved: _credit_reserved,
    CreditRefused: _credit_refused,
    DrawdownCommitted: _drawdown_committed,
    FundsHeld: _funds_held,
    HoldRefused: _hold_refused,
    EscrowReleased: _escrow_released,
    EscrowRefunded: _escrow_refunded,
    ClawbackRequested: _clawback_requested,
}
EVENT_TYPES = tuple(_RULES)


def decide(p: Payment, event, now: datetime, rules: Rules) -> Decision:
    """What `event` does to payment `p` at `now`. Pure; see the module's docstring."""
    short = None
    if isinstance(event, Short):
        event, short = event.event, event.available
    return _RULES[type(event)](p, event, now, rules, short)
