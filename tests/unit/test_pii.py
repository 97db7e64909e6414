"""Personal data (shared/pii.py): keyed hashes keep equality for the rules, masks are all people
see, and nothing in clear is left in what is stored."""
from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given, strategies as st

from shared import pii

KEY = b"unit-test-pii-key"


@pytest.mark.parametrize("phone, masked", [
    ("13812345678", "138****5678"),
    ("+8613812345678", "+86*******5678"),
    ("02112345678", "021****5678"),
    ("1234567", "*****67"),
    ("12345", "***45"),
])
def test_phone_mask(phone, masked):
    assert pii.mask_phone(phone) == masked


@pytest.mark.parametrize("id_number, masked", [
    ("310101199506150022", "**************0022"),
    ("11010119900307451X", "**************451X"),
    ("ABC1234567", "******4567"),
    ("ABC123", "****23"),
])
def test_id_number_mask_shows_only_the_end(id_number, masked):
    assert pii.mask_id_number(id_number) == masked


@given(st.from_regex(r"^\+?[0-9]{5,20}$", fullmatch=True))
def test_a_masked_phone_never_shows_five_digits_in_a_row(phone):
    masked = pii.mask_phone(phone)
    assert len(masked) == len(phone) and pii.looks_masked(masked) and masked.count("*") >= len(phone) // 3


@given(st.from_regex(r"^[0-9A-Za-z]{6,32}$", fullmatch=True))
def test_a_masked_id_number_shows_at_most_its_last_4(id_number):
    masked = pii.mask_id_number(id_number)
    shown = masked.lstrip("*")
    assert len(masked) == len(id_number) and id_number.endswith(shown) and len(shown) <= 4
    assert len(shown) < len(id_number) / 2


def test_the_hash_is_hmac_sha256_keyed_and_per_field():
    h = pii.digest("phone", "13812345678", KEY)
    assert h == hmac.new(KEY, b"phone:13812345678", hashlib.sha256).hexdigest() and len(h) == 64
    assert h == pii.digest("phone", "13812345678", KEY)                      # equality is kept
    assert h != pii.digest("phone", "13812345679", KEY)
    assert h != pii.digest("phone", "13812345678", b"another key")           # needs the key
    assert h != pii.digest("id_number", "13812345678", KEY)                  # per field
    assert h != hashlib.sha256(b"13812345678").hexdigest()                   # not a plain hash


def test_protect_replaces_clear_values_by_hash_and_mask():
    user = {"user_id": "u-1", "full_name": "Han", "phone": "13812345678", "id_number": "310101199506150022"}
    out = pii.protect(user, KEY)
    assert "phone" not in out and "id_number" not in out
    assert out["phone_masked"] == "138****5678" and out["id_number_masked"] == "**************0022"
    assert out["phone_hash"] == pii.digest("phone", "13812345678", KEY)
    assert out["id_number_hash"] == pii.digest("id_number", "310101199506150022", KEY)
    assert "13812345678" not in repr(out) and "310101199506150022" not in repr(out)
    none = pii.protect({"user_id": "u-2", "phone": None, "id_number": None}, KEY)
    assert none == {"user_id": "u-2", "phone_hash": None, "phone_masked": None, "id_number_hash": None,
                    "id_number_masked": None}
    assert pii.protect(out, KEY) == out  # already protected: unchanged


def test_the_key_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("DANBAO_PII_KEY", "k1")
    first = pii.digest("phone", "13812345678")
    monkeypatch.setenv("DANBAO_PII_KEY", "k2")
    assert pii.digest("phone", "13812345678") != first
    monkeypatch.delenv("DANBAO_PII_KEY")
    with pytest.raises(pii.MissingKey):
        pii.digest("phone", "13812345678")
