"""Money is integer fen; rates are Decimal. One round_half_up per computed item (docs/contract.md)."""
from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal


def apply_rate(amount_fen: int, rate: Decimal) -> int:
    """round_half_up(amount * rate) to whole fen."""
    if not isinstance(amount_fen, int) or isinstance(amount_fen, bool):
        raise TypeError("amounts are integer fen")
    if not isinstance(rate, Decimal):
        raise TypeError("rates are Decimal")
    return int((Decimal(amount_fen) * rate).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def percent(text: str) -> Decimal:
    """'0.60' (percent) -> Decimal('0.0060')."""
    return Decimal(text) / Decimal(100)
