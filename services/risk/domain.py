"""The risk rules and the window state they read: pure functions and dataclasses, no I/O.

Four rules (`RULES`), every threshold a setting (`RiskSettings`); the decision is `reject` if a
reject rule fired, else `review` if a review rule did, else `approve`. Windows follow the
platform's time as written in the events (`accepted_at`, `declined_at`), never the wall clock;
an entry exactly W seconds old has left a W-second window. Rule windows hold exact entries (at
most `MAX_ENTRIES` a key), the informational statistics one-minute buckets. The rules, what
counts where and the window semantics in full: services/risk/README.md and docs/contract.md §5.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from typing import Any, Mapping

from shared.settings import SettingsError, env as env_text, env_int

class Outcome(StrEnum):
    """A rule's outcome and the decision (RiskDecided.decision); state read back from the
    changelog holds the plain strings, which compare equal."""
    APPROVE = "approve"
    REVIEW = "review"
    REJECT = "reject"


APPROVE, REVIEW, REJECT = Outcome.APPROVE, Outcome.REVIEW, Outcome.REJECT

BUYER_VELOCITY = "buyer_velocity"
BUYER_DAILY_AMOUNT = "buyer_daily_amount"
CARD_DECLINE_BURST = "card_decline_burst"
NEW_BUYER_LARGE_AMOUNT = "new_buyer_large_amount"

# rule name -> outcome when it fires, in the order rules are listed in decisions.
RULES: dict[str, Outcome] = {
    BUYER_VELOCITY: REJECT,
    BUYER_DAILY_AMOUNT: REJECT,
    CARD_DECLINE_BURST: REJECT,
    NEW_BUYER_LARGE_AMOUNT: REVIEW,
}

MAX_ENTRIES = 1000          # cap of exact entries kept per key for velocity / declines / dedupe
BUCKET_MS = 60_000          # informational statistics: one-minute buckets
STATS_WINDOWS = {"1m": 60, "1h": 3_600, "24h": 86_400}
STATS_HORIZON_MS = max(STATS_WINDOWS.values()) * 1000
RECENT_IDS = 200            # event ids remembered per card / seller to ignore redeliveries

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_DECISION_NS = uuid.UUID("6f1d3c52-2b7e-4a53-9a0c-5b1f0e6c9d21")


# ---------------------------------------------------------------- settings
# The setting of each field; the defaults are the dataclass's (docs/contract.md §5).
_SETTINGS_ENV = {
    "buyer_velocity_max": "RISK_BUYER_VELOCITY_MAX",
    "buyer_velocity_window_seconds": "RISK_BUYER_VELOCITY_WINDOW_SECONDS",
    "buyer_daily_amount_max_fen": "RISK_BUYER_DAILY_AMOUNT_MAX_FEN",
    "buyer_daily_amount_window_seconds": "RISK_BUYER_DAILY_AMOUNT_WINDOW_SECONDS",
    "card_decline_max": "RISK_CARD_DECLINE_MAX",
    "card_decline_window_seconds": "RISK_CARD_DECLINE_WINDOW_SECONDS",
    "new_buyer_seconds": "RISK_NEW_BUYER_SECONDS",
    "new_buyer_amount_fen": "RISK_NEW_BUYER_AMOUNT_FEN",
}


@dataclass(frozen=True)
class RiskSettings:
    buyer_velocity_max: int = 20
    buyer_velocity_window_seconds: int = 60
    buyer_daily_amount_max_fen: int = 5_000_000
    buyer_daily_amount_window_seconds: int = 86_400
    card_decline_max: int = 5
    card_decline_window_seconds: int = 3_600
    new_buyer_seconds: int = 86_400
    new_buyer_amount_fen: int = 1_000_000
    disabled_rules: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        for name in _SETTINGS_ENV:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SettingsError(f"{_SETTINGS_ENV[name]} must be a whole number >= 0, not {value!r}")
        for name in ("buyer_velocity_window_seconds", "buyer_daily_amount_window_seconds",
                     "card_decline_window_seconds", "card_decline_max"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{_SETTINGS_ENV[name]} must be >= 1")
        if self.buyer_velocity_max >= MAX_ENTRIES or self.card_decline_max > MAX_ENTRIES:
            raise SettingsError(f"RISK_BUYER_VELOCITY_MAX and RISK_CARD_DECLINE_MAX must stay below {MAX_ENTRIES}")
        unknown = set(self.disabled_rules) - set(RULES)
        if unknown:
            raise SettingsError(f"RISK_DISABLED_RULES names unknown rules: {sorted(unknown)}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "RiskSettings":
        default = cls()
        values: dict[str, Any] = {name: env_int(var, getattr(default, name), environ=env)
                                  for name, var in _SETTINGS_ENV.items()}
        disabled = env_text("RISK_DISABLED_RULES", "", environ=env)
        values["disabled_rules"] = frozenset(r.strip() for r in disabled.split(",") if r.strip())
        return cls(**values)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {var: getattr(self, name) for name, var in _SETTINGS_ENV.items()}
        out["RISK_DISABLED_RULES"] = sorted(self.disabled_rules)
        return out


# ---------------------------------------------------------------- the rules
@dataclass(frozen=True)
class Request:
    """What the rules need to know about one payment."""
    amount: int
    accepted_at: datetime
    buyer_registered_at: datetime | None = None
    card_token: str | None = None


@dataclass(frozen=True)
class Windows:
    """What the windows hold before this request is added (the request itself is not included)."""
    buyer_orders: int = 0           # the buyer's requests within the velocity window, any decision
    buyer_accepted_amount: int = 0  # the buyer's approved/reviewed amount within the daily window
    card_declines: int = 0          # declines on the request's card within the decline window


@dataclass(frozen=True)
class Fired:
    rule: str
    outcome: Outcome
    detail: str


@dataclass(frozen=True)
class Decision:
    decision: Outcome
    rules: tuple[str, ...]
    message: str


def duration(seconds: int) -> str:
    """60 -> '60 s', 3600 -> '1 h', 86400 -> '24 h'."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    return f"{seconds} s"


def buyer_velocity(req: Request, w: Windows, s: RiskSettings) -> Fired | None:
    n = w.buyer_orders + 1
    if n > s.buyer_velocity_max:
        return Fired(BUYER_VELOCITY, REJECT, f"{n} orders within {duration(s.buyer_velocity_window_seconds)} "
                                             f"(max {s.buyer_velocity_max})")
    return None


def buyer_daily_amount(req: Request, w: Windows, s: RiskSettings) -> Fired | None:
    total = w.buyer_accepted_amount + req.amount
    if total > s.buyer_daily_amount_max_fen:
        return Fired(BUYER_DAILY_AMOUNT, REJECT,
                     f"{total} fen accepted within {duration(s.buyer_daily_amount_window_seconds)} with this order "
                     f"(max {s.buyer_daily_amount_max_fen})")
    return None


def card_decline_burst(req: Request, w: Windows, s: RiskSettings) -> Fired | None:
    if req.card_token is not None and w.card_declines >= s.card_decline_max:
        return Fired(CARD_DECLINE_BURST, REJECT,
                     f"{w.card_declines} declines on card {req.card_token} within "
                     f"{duration(s.card_decline_window_seconds)} (limit {s.card_decline_max})")
    return None


def new_buyer_large_amount(req: Request, w: Windows, s: RiskSettings) -> Fired | None:
    if req.buyer_registered_at is None:
        return None  # registration time unknown: the rule cannot tell, so it does not fire
    age = req.accepted_at - req.buyer_registered_at
    if age < timedelta(seconds=s.new_buyer_seconds) and req.amount > s.new_buyer_amount_fen:
        secs = max(age, timedelta(0)) // timedelta(seconds=1)
        return Fired(NEW_BUYER_LARGE_AMOUNT, REVIEW,
                     f"buyer registered {secs // 3600}:{secs // 60 % 60:02d}:{secs % 60:02d} before the order "
                     f"(less than {duration(s.new_buyer_seconds)}), amount {req.amount} fen > {s.new_buyer_amount_fen}")
    return None


_CHECKS = {BUYER_VELOCITY: buyer_velocity, BUYER_DAILY_AMOUNT: buyer_daily_amount,
           CARD_DECLINE_BURST: card_decline_burst, NEW_BUYER_LARGE_AMOUNT: new_buyer_large_amount}


def fired_rules(req: Request, w: Windows, s: RiskSettings) -> list[Fired]:
    out = []
    for name in RULES:
        if name in s.disabled_rules:
            continue
        hit = _CHECKS[name](req, w, s)
        if hit is not None:
            out.append(hit)
    return out


def decide(req: Request, w: Windows, s: RiskSettings) -> Decision:
    """The decision for one request given what the windows hold before it."""
    fired = fired_rules(req, w, s)
    rejects = [f for f in fired if f.outcome == REJECT]
    reviews = [f for f in fired if f.outcome == REVIEW]
    names = tuple(f.rule for f in fired)

    def listing(items: list[Fired]) -> str:
        return "; ".join(f"{f.rule}: {f.detail}" for f in items)

    if rejects:
        message = f"rejected by {listing(rejects)}"
        if reviews:
            message += f" (also fired: {listing(reviews)})"
        return Decision(REJECT, names, message)
    if reviews:
        return Decision(REVIEW, names, f"review required by {listing(reviews)}")
    return Decision(APPROVE, (), "approved: no rule fired")


def decision_event_id(request_event_id: str) -> str:
    """The RiskDecided event_id for a request: deterministic, so a re-sent decision is the same event."""
    return str(uuid.uuid5(_DECISION_NS, request_event_id))


# ---------------------------------------------------------------- time and windows
def to_ms(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def in_window(ts_ms: int, at_ms: int, window_seconds: int) -> bool:
    return ts_ms > at_ms - window_seconds * 1000


def _bucket_add(buckets: list[list[int]], at_ms: int, amount: int) -> list[list[int]]:
    start = at_ms - at_ms % BUCKET_MS
    out = [list(b) for b in buckets]
    for b in out:
        if b[0] == start:
            b[1] += 1
            b[2] += amount
            break
    else:
        out.append([start, 1, amount])
        out.sort()
    return out


def _bucket_prune(buckets: list[list[int]], newest_ms: int) -> list[list[int]]:
    return [b for b in buckets if b[0] + BUCKET_MS > newest_ms - STATS_HORIZON_MS]


def bucket_stats(buckets: list[list[int]], at_ms: int) -> dict[str, dict[str, int]]:
    """{"1m": {"count", "amount"}, "1h": …, "24h": …}: buckets that overlap each window."""
    out = {}
    for label, seconds in STATS_WINDOWS.items():
        inside = [b for b in buckets if b[0] + BUCKET_MS > at_ms - seconds * 1000]
        out[label] = {"count": sum(b[1] for b in inside), "amount": sum(b[2] for b in inside)}
    return out


def _remember(ids: list[str], event_id: str) -> list[str]:
    return (ids + [event_id])[-RECENT_IDS:]


# ---------------------------------------------------------------- per-buyer state
@dataclass(frozen=True)
class BuyerState:
    """One buyer's windows. JSON-able (it is the value of the faust `buyers` table)."""
    orders: tuple[int, ...] = ()                  # accepted_at (ms) of every request in the velocity window
    accepted: tuple[tuple[int, int], ...] = ()    # (accepted_at ms, amount) of approved/reviewed orders
    decided: tuple[tuple, ...] = ()               # (event_id, accepted_at ms, decision, rules, message)
    newest: int = 0                               # latest accepted_at seen (ms); windows are pruned to it

    def to_json(self) -> dict[str, Any]:
        return {"orders": list(self.orders), "accepted": [list(a) for a in self.accepted],
                "decided": [[e, ts, d, list(r), m] for e, ts, d, r, m in self.decided], "newest": self.newest}

    @classmethod
    def from_json(cls, value: Mapping[str, Any] | None) -> "BuyerState":
        if not value:
            return cls()
        return cls(orders=tuple(value["orders"]), accepted=tuple((a[0], a[1]) for a in value["accepted"]),
                   decided=tuple((e, ts, d, tuple(r), m) for e, ts, d, r, m in value["decided"]),
                   newest=value["newest"])

    def windows(self, at_ms: int, s: RiskSettings) -> tuple[int, int]:
        """(requests in the velocity window, accepted amount in the daily window) at `at_ms`."""
        orders = sum(1 for ts in self.orders if in_window(ts, at_ms, s.buyer_velocity_window_seconds))
        amount = sum(a for ts, a in self.accepted if in_window(ts, at_ms, s.buyer_daily_amount_window_seconds))
        return orders, amount

    def stats(self, at_ms: int) -> dict[str, dict[str, int]]:
        """Approved/reviewed count and amount over 1 min / 1 h / 24 h (exact)."""
        out = {}
        for label, seconds in STATS_WINDOWS.items():
            inside = [a for ts, a in self.accepted if in_window(ts, at_ms, seconds)]
            out[label] = {"count": len(inside), "amount": sum(inside)}
        return out

    def find(self, event_id: str) -> Decision | None:
        for e, _ts, d, r, m in self.decided:
            if e == event_id:
                return Decision(d, tuple(r), m)
        return None


def buyer_apply(state: BuyerState, event_id: str, req: Request, card_declines: int,
                s: RiskSettings) -> tuple[BuyerState, Decision, bool]:
    """Decide one request and add it to the buyer's windows -> (new state, decision, duplicate).

    A request whose event_id was already decided gets that decision again and changes nothing.
    """
    known = state.find(event_id)
    if known is not None:
        return state, known, True
    at = to_ms(req.accepted_at)
    orders, amount = state.windows(at, s)
    decision = decide(req, Windows(buyer_orders=orders, buyer_accepted_amount=amount, card_declines=card_declines), s)

    newest = max(state.newest, at)
    keep_velocity = [ts for ts in (*state.orders, at) if in_window(ts, newest, s.buyer_velocity_window_seconds)]
    keep_velocity = sorted(keep_velocity)[-MAX_ENTRIES:]
    accepted = list(state.accepted)
    if decision.decision != REJECT:
        accepted.append((at, req.amount))
    accepted = [(ts, a) for ts, a in accepted if in_window(ts, newest, s.buyer_daily_amount_window_seconds)]
    horizon = max(s.buyer_velocity_window_seconds, s.buyer_daily_amount_window_seconds)
    decided = [d for d in (*state.decided, (event_id, at, decision.decision, decision.rules, decision.message))
               if in_window(d[1], newest, horizon)][-MAX_ENTRIES:]
    return (BuyerState(orders=tuple(keep_velocity), accepted=tuple(accepted), decided=tuple(decided), newest=newest),
            decision, False)


def buyer_forget(state: BuyerState, event_id: str, accepted_at: datetime, amount: int) -> BuyerState:
    """A payment this buyer's window counted failed later: take its amount out of the daily
    window (one entry with its time and amount; none: nothing to do). Once per event_id."""
    if state.find(event_id) is not None:
        return state
    at = to_ms(accepted_at)
    accepted = list(state.accepted)
    if (at, amount) not in accepted:
        return state
    accepted.remove((at, amount))
    decided = [*state.decided, (event_id, at, "forgotten", (), f"payment of {amount} fen failed")][-MAX_ENTRIES:]
    return replace(state, accepted=tuple(accepted), decided=tuple(decided))


# ---------------------------------------------------------------- per-card state
@dataclass(frozen=True)
class CardState:
    declines: tuple[tuple[int, str], ...] = ()   # (declined_at ms, event_id) within the decline window
    attempts: tuple[tuple[int, int, int], ...] = ()  # (bucket start ms, count, amount) of payment requests
    recent: tuple[tuple[str, int], ...] = ()     # (event_id, decline count given) of the last requests
    newest: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"declines": [list(d) for d in self.declines], "attempts": [list(b) for b in self.attempts],
                "recent": [list(r) for r in self.recent], "newest": self.newest}

    @classmethod
    def from_json(cls, value: Mapping[str, Any] | None) -> "CardState":
        if not value:
            return cls()
        return cls(declines=tuple((d[0], d[1]) for d in value["declines"]),
                   attempts=tuple(tuple(b) for b in value["attempts"]),
                   recent=tuple((r[0], r[1]) for r in value["recent"]), newest=value["newest"])

    def decline_count(self, at_ms: int, s: RiskSettings) -> int:
        return sum(1 for ts, _ in self.declines if in_window(ts, at_ms, s.card_decline_window_seconds))

    def stats(self, at_ms: int) -> dict[str, dict[str, int]]:
        return bucket_stats([list(b) for b in self.attempts], at_ms)


def card_decline(state: CardState, event_id: str, declined_at: datetime, s: RiskSettings) -> tuple[CardState, bool]:
    """Add a decline -> (new state, duplicate)."""
    if any(e == event_id for _, e in state.declines):
        return state, True
    at = to_ms(declined_at)
    newest = max(state.newest, at)
    declines = sorted((d for d in (*state.declines, (at, event_id))
                       if in_window(d[0], newest, s.card_decline_window_seconds)))[-MAX_ENTRIES:]
    return replace(state, declines=tuple(declines), newest=newest), False


def card_request(state: CardState, event_id: str, amount: int, accepted_at: datetime,
                 s: RiskSettings) -> tuple[CardState, int]:
    """A payment request with the card -> (new state, declines on the card within the window).

    The count is remembered with the event id, so a redelivered request gets the same count
    again (and is not counted twice in the attempt statistics): a replay decides the same.
    """
    for known_id, declines in state.recent:
        if known_id == event_id:
            return state, declines
    at = to_ms(accepted_at)
    declines = state.decline_count(at, s)
    newest = max(state.newest, at)
    buckets = _bucket_prune(_bucket_add([list(b) for b in state.attempts], at, amount), newest)
    recent = (*state.recent, (event_id, declines))[-RECENT_IDS:]
    return replace(state, attempts=tuple(tuple(b) for b in buckets), recent=recent, newest=newest), declines


# ---------------------------------------------------------------- per-seller state (statistics)
@dataclass(frozen=True)
class SellerState:
    orders: tuple[tuple[int, int, int], ...] = ()    # buckets of every decided request
    accepted: tuple[tuple[int, int, int], ...] = ()  # buckets of approved/reviewed requests
    recent: tuple[str, ...] = ()
    newest: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"orders": [list(b) for b in self.orders], "accepted": [list(b) for b in self.accepted],
                "recent": list(self.recent), "newest": self.newest}

    @classmethod
    def from_json(cls, value: Mapping[str, Any] | None) -> "SellerState":
        if not value:
            return cls()
        return cls(orders=tuple(tuple(b) for b in value["orders"]), accepted=tuple(tuple(b) for b in value["accepted"]),
                   recent=tuple(value["recent"]), newest=value["newest"])

    def stats(self, at_ms: int) -> dict[str, Any]:
        return {"orders": bucket_stats([list(b) for b in self.orders], at_ms),
                "accepted": bucket_stats([list(b) for b in self.accepted], at_ms)}


def seller_add(state: SellerState, event_id: str, amount: int, accepted_at: datetime, decision: str) -> SellerState:
    if event_id in state.recent:
        return state
    at = to_ms(accepted_at)
    newest = max(state.newest, at)
    orders = _bucket_prune(_bucket_add([list(b) for b in state.orders], at, amount), newest)
    accepted = [list(b) for b in state.accepted]
    if decision != REJECT:
        accepted = _bucket_add(accepted, at, amount)
    accepted = _bucket_prune(accepted, newest)
    return SellerState(orders=tuple(tuple(b) for b in orders), accepted=tuple(tuple(b) for b in accepted),
                       recent=tuple(_remember(list(state.recent), event_id)), newest=newest)
