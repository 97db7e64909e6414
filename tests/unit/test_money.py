from decimal import Decimal

import pytest

from shared.money import apply_rate, percent


@pytest.mark.parametrize("amount, rate, expected", [
    (10_000, "0.60", 60),
    (250, "0.60", 2),      # 1.5 -> 2 (half up)
    (83, "0.60", 0),       # 0.498 -> 0
    (125, "0.80", 1),      # 1.0
    (1_000_000, "0.05", 500),
    (1, "50", 1),          # 0.5 -> 1
])
def test_apply_rate_rounds_half_up_to_whole_fen(amount, rate, expected):
    assert apply_rate(amount, percent(rate)) == expected


def test_money_is_integers_and_decimals_only():
    with pytest.raises(TypeError):
        apply_rate(100.0, Decimal("0.01"))
    with pytest.raises(TypeError):
        apply_rate(100, 0.01)
    with pytest.raises(TypeError):
        apply_rate(True, Decimal("0.01"))
