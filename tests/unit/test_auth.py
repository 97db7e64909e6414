from datetime import datetime, timedelta, timezone

import jwt
import pytest

from shared.auth import Principal, authenticate_token
from shared.errors import ApiError

API, SECRET = "operator-token", "secret-for-tests-0123456789abcdef0123"


def token(sub="u-1", seconds=60, secret=SECRET, **extra):
    claims = {"sub": sub, "exp": datetime.now(timezone.utc) + timedelta(seconds=seconds), **extra}
    return jwt.encode(claims, secret, algorithm="HS256")


def status_of(tok):
    with pytest.raises(ApiError) as info:
        authenticate_token(tok, API, SECRET)
    return info.value.status, info.value.code


def test_operator_token_has_full_access():
    caller = authenticate_token(API, API, SECRET)
    assert caller.operator and caller.may_act_for("anyone")


def test_user_token_acts_for_its_own_user_only():
    caller = authenticate_token(token("u-1"), API, SECRET)
    assert caller == Principal(operator=False, user_id="u-1")
    caller.require_user("u-1")
    assert caller.may_act_for("buyer-x", "u-1")
    with pytest.raises(ApiError) as info:
        caller.require_user("u-2")
    assert (info.value.status, info.value.code) == (403, "FORBIDDEN")


@pytest.mark.parametrize("tok", [None, "", "garbage", token(seconds=-5), token(secret="another-secret-0123456789abcdef-xyz")])
def test_bad_tokens_are_401(tok):
    assert status_of(tok) == (401, "UNAUTHENTICATED")


def test_exp_is_required():
    no_exp = jwt.encode({"sub": "u-1"}, SECRET, algorithm="HS256")
    assert status_of(no_exp) == (401, "UNAUTHENTICATED")


def test_other_algorithms_are_refused():
    none_alg = jwt.encode({"sub": "u-1", "exp": 9999999999}, None, algorithm="none")
    assert status_of(none_alg) == (401, "UNAUTHENTICATED")
