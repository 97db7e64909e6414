"""The bank channel: the one way money enters or leaves the platform (top-ups, card payments,
card refunds, withdrawals). Every call carries a request id, so a retried call is recognised.

A card payment is two-phase, like the ledger: `authorize` reserves the amount on the card,
`capture` takes it (once escrow holds the order), `void` drops an authorization the saga no
longer wants (nothing was taken, so nothing needs refunding), `refund` gives captured money back.

`SimulatedBank` stands in for the real channel (docs/contract.md §5 test card tokens): `tok_decline`
is declined, `tok_timeout` never answers, every other `tok_…` approves. Its answers depend only
on the token, so it is idempotent and restart-safe by construction. A real adapter implements
the same interface over the network, with its own timeouts.
"""
from __future__ import annotations

from enum import StrEnum
from typing import Protocol


class ChargeResult(StrEnum):
    """The answer to an authorization."""
    APPROVED = "approved"
    DECLINED = "declined"
    NO_ANSWER = "no_answer"  # the channel has not answered (yet); the caller's deadline decides


class BankChannel(Protocol):
    async def authorize(self, request_id: str, card_token: str, amount: int) -> ChargeResult: ...

    async def capture(self, request_id: str, amount: int) -> None:
        """Take an authorized amount."""

    async def void(self, request_id: str) -> None:
        """Drop an authorization that may or may not exist (after no answer, or a compensation)."""

    async def refund(self, request_id: str, charge_request_id: str, amount: int) -> None: ...

    async def payout(self, request_id: str, user_id: str, amount: int) -> None: ...


class SimulatedBank:
    async def authorize(self, request_id: str, card_token: str, amount: int) -> ChargeResult:
        if card_token == "tok_decline":
            return ChargeResult.DECLINED
        if card_token == "tok_timeout":
            return ChargeResult.NO_ANSWER
        return ChargeResult.APPROVED

    async def capture(self, request_id: str, amount: int) -> None:
        return None

    async def void(self, request_id: str) -> None:
        return None

    async def refund(self, request_id: str, charge_request_id: str, amount: int) -> None:
        return None

    async def payout(self, request_id: str, user_id: str, amount: int) -> None:
        return None
