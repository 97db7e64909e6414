"""Gateway rules, pure: no I/O."""
from __future__ import annotations

from enum import Enum


class PaymentStatus(str, Enum):
    PENDING = "PENDING"
    FAILED = "FAILED"
    HELD = "HELD"
    RELEASED = "RELEASED"
    REFUNDED = "REFUNDED"
    PARTIALLY_REFUNDED = "PARTIALLY_REFUNDED"


class Registration(str, Enum):
    CREATED = "created"      # 201
    REPEATED = "repeated"    # 200: the same body again
    CONFLICT = "conflict"    # 409: the same user_id with a different body


USER_FIELDS = ("user_id", "full_name", "birth_date", "phone", "id_number", "real_name_verified")


def registration_outcome(existing: dict | None, requested: dict) -> Registration:
    if existing is None:
        return Registration.CREATED
    same = all(existing.get(f) == requested.get(f) for f in USER_FIELDS)
    return Registration.REPEATED if same else Registration.CONFLICT


def duplicate_order_message(order_id: str) -> str:
    return f"order {order_id} was already placed by another event"
