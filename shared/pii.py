"""Personal data (docs/design.md, "Personal data"): a user's `phone` and `id_number` are never
stored, published or logged in clear. What is kept of each:

- a keyed hash, HMAC-SHA256 with the secret DANBAO_PII_KEY over `<field>:<value>` (64 hex
  digits): equal values give equal hashes, so "one Huabei account per phone / id number" and
  "the same registration again" still work, but without the key nobody can test guesses;
- a masked value for people to read: a phone keeps its first 3 and last 4 digits
  (`138****5678`), an id number its last 4 (`**************0022`; the last 2 when shorter than
  10 characters).

The key comes from the environment only; losing or changing it breaks the comparison with the
hashes already stored."""
from __future__ import annotations

import hashlib
import hmac
import re

from shared.settings import env

KEY_ENV = "DANBAO_PII_KEY"
FIELDS = ("phone", "id_number")
HASH_PATTERN = r"^[0-9a-f]{64}$"


class MissingKey(RuntimeError):
    pass


def key() -> bytes:
    value = env(KEY_ENV, "")
    if not value:
        raise MissingKey(f"{KEY_ENV} must be set (the key of the personal data hashes)")
    return value.encode()


def digest(field: str, value: str, secret: bytes | None = None) -> str:
    return hmac.new(secret if secret is not None else key(), f"{field}:{value}".encode(), hashlib.sha256).hexdigest()


def mask_phone(phone: str) -> str:
    keep_head = 3 if len(phone) >= 11 else 0
    keep_tail = 4 if len(phone) >= 8 else 2
    return phone[:keep_head] + "*" * (len(phone) - keep_head - keep_tail) + phone[-keep_tail:]


def mask_id_number(id_number: str) -> str:
    keep_tail = 4 if len(id_number) >= 10 else 2
    return "*" * (len(id_number) - keep_tail) + id_number[-keep_tail:]


MASKS = {"phone": mask_phone, "id_number": mask_id_number}


def protect(record: dict, secret: bytes | None = None) -> dict:
    """The record with `phone` and `id_number` replaced by `<field>_hash` and `<field>_masked`
    (both None when the value is None). Fields already protected are kept."""
    out = {k: v for k, v in record.items() if k not in FIELDS}
    for field in FIELDS:
        value = record.get(field)
        if value is not None:
            out[f"{field}_hash"], out[f"{field}_masked"] = digest(field, value, secret), MASKS[field](value)
        else:
            out.setdefault(f"{field}_hash", None)
            out.setdefault(f"{field}_masked", None)
    return out


_CLEAR = re.compile(r"\d{5,}")


def looks_masked(value: str | None) -> bool:
    """No run of 5 or more digits in clear (for tests and checks)."""
    return value is None or not _CLEAR.search(value)
