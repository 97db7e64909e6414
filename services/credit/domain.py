"""Credit rules, pure: no I/O."""
from __future__ import annotations

from shared.events import UserRegistered


def profile_from(event: UserRegistered) -> dict:
    """The profile fields the credit service keeps from a registration."""
    return {
        "user_id": event.user_id,
        "birth_date": event.birth_date,
        "phone": event.phone,
        "id_number": event.id_number,
        "real_name_verified": event.real_name_verified,
        "registered_at": event.registered_at,
    }
