"""The typed setting helpers of shared/settings.py: blank means the default, a bad value is one
SettingsError naming the variable."""
from __future__ import annotations

from decimal import Decimal

import pytest

from shared.settings import (SettingsError, env, env_bool, env_choice, env_fraction, env_int, env_non_negative_int,
                             env_percent, env_zone)


@pytest.mark.parametrize("environ", [{}, {"X": ""}, {"X": "   "}])
def test_unset_or_blank_is_the_default(environ):
    assert env("X", "d", environ=environ) == "d"
    assert env_int("X", 7, environ=environ) == 7  # never int("")
    assert env_non_negative_int("X", 0, environ=environ) == 0
    assert env_percent("X", Decimal("0.006"), environ=environ) == Decimal("0.006")
    assert env_bool("X", True, environ=environ) is True
    assert env_choice("X", "a", ("a", "b"), environ=environ) == "a"
    assert env_zone("X", "Asia/Shanghai", environ=environ) == "Asia/Shanghai"
    assert env_fraction("X", 0.5, environ=environ) == 0.5


def test_good_values():
    assert env("X", "d", environ={"X": " v "}) == "v"
    assert env_int("X", 1, environ={"X": " 42 "}) == 42
    assert env_int("X", 1, minimum=-5, environ={"X": "-5"}) == -5
    assert env_non_negative_int("X", 1, environ={"X": "0"}) == 0
    assert env_percent("X", Decimal(0), environ={"X": "0.60"}) == Decimal("0.006")
    assert env_percent("X", Decimal(0), environ={"X": "100"}) == 1
    assert [env_bool("X", False, environ={"X": v}) for v in ("true", "1", "YES", "on")] == [True] * 4
    assert [env_bool("X", True, environ={"X": v}) for v in ("false", "0", "No", "OFF")] == [False] * 4
    assert env_choice("X", "a", ("a", "b"), environ={"X": "b"}) == "b"
    assert env_zone("X", "UTC", environ={"X": "Europe/Berlin"}) == "Europe/Berlin"
    assert env_fraction("X", 1.0, environ={"X": "0.25"}) == 0.25


@pytest.mark.parametrize("helper, raw", [
    (lambda e: env_int("X", 1, environ=e), "1.5"),
    (lambda e: env_int("X", 1, environ=e), "ten"),
    (lambda e: env_int("X", 1, environ=e), "1e3"),
    (lambda e: env_int("X", 1, minimum=1, environ=e), "0"),
    (lambda e: env_int("X", 1, maximum=28, environ=e), "29"),
    (lambda e: env_non_negative_int("X", 1, environ=e), "-1"),
    (lambda e: env_percent("X", Decimal(0), environ=e), "abc"),
    (lambda e: env_percent("X", Decimal(0), environ=e), "-0.1"),
    (lambda e: env_percent("X", Decimal(0), environ=e), "101"),
    (lambda e: env_percent("X", Decimal(0), environ=e), "NaN"),
    (lambda e: env_percent("X", Decimal(0), environ=e), "Infinity"),
    (lambda e: env_fraction("X", 1.0, environ=e), "half"),
    (lambda e: env_fraction("X", 1.0, environ=e), "1.5"),
    (lambda e: env_fraction("X", 1.0, environ=e), "nan"),
    (lambda e: env_bool("X", True, environ=e), "maybe"),
    (lambda e: env_choice("X", "a", ("a", "b"), environ=e), "c"),
    (lambda e: env_zone("X", "UTC", environ=e), "Mars/Olympus"),
])
def test_a_bad_value_is_one_error_naming_the_variable(helper, raw):
    with pytest.raises(SettingsError, match=r"^X must ") as info:
        helper({"X": raw})
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)  # the pure rules' from_env keep raising ValueError


def test_the_environment_is_read_when_no_mapping_is_given(monkeypatch):
    monkeypatch.setenv("DANBAO_TEST_SETTING", "12")
    assert env_int("DANBAO_TEST_SETTING", 1) == 12
    monkeypatch.setenv("DANBAO_TEST_SETTING", "")
    assert env_int("DANBAO_TEST_SETTING", 1) == 1
