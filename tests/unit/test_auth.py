from datetime import datetime, timedelta, timezone

import jwt
import pytest

from shared.auth import Principal, authenticate_token, fingerprint
from shared.errors import ApiError

API, SECRET = "operator-token", "secret-for-tests-0123456789abcdef0123"


def token(sub="u-1", seconds=60, secret=SECRET, kid=None, **extra):
    claims = {"sub": sub, "exp": datetime.now(timezone.utc) + timedelta(seconds=seconds), **extra}
    return jwt.encode(claims, secret, algorithm="HS256", headers={"kid": kid} if kid is not None else None)


def status_of(tok):
    with pytest.raises(ApiError) as info:
        authenticate_token(tok, [API], [SECRET])
    return info.value.status, info.value.code


def test_operator_token_has_full_access():
    caller = authenticate_token(API, [API], [SECRET])
    assert caller.operator and caller.may_act_for("anyone")


def test_user_token_acts_for_its_own_user_only():
    caller = authenticate_token(token("u-1"), [API], [SECRET])
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


# ---------------------------------------------------------------- rotation (docs/contract.md §7)
OLD, NEW = "operator-token-old", "operator-token-new"
K1, K2 = "key-one-secret-0123456789abcdef0123456789", "key-two-secret-0123456789abcdef0123456789"


def auth(tok, tokens=(NEW, OLD), secrets=(SECRET,), keys=None):
    return authenticate_token(tok, tokens, secrets, {"k1": K1, "k2": K2} if keys is None else keys)


def refused(tok, **kw):
    with pytest.raises(ApiError) as info:
        auth(tok, **kw)
    return info.value.status, info.value.code, info.value.message


def test_old_operator_token_works_during_rotation_and_is_named_by_its_fingerprint():
    old, new = auth(OLD), auth(NEW)
    assert old.operator and new.operator
    assert (old.token_id, new.token_id) == (fingerprint(OLD), fingerprint(NEW))
    assert old.token_id != new.token_id and OLD not in old.token_id and old.token_id.startswith("op-")


def test_removed_operator_token_fails():
    assert refused(OLD, tokens=(NEW,))[:2] == (401, "UNAUTHENTICATED")
    assert refused(NEW + "x")[:2] == (401, "UNAUTHENTICATED")
    assert refused(NEW[:-1])[:2] == (401, "UNAUTHENTICATED")


def test_every_candidate_is_compared_in_constant_time(monkeypatch):
    """No early exit: hmac.compare_digest runs once per candidate token, whichever matches."""
    import shared.auth as auth_mod
    calls = []
    real = auth_mod.hmac.compare_digest
    monkeypatch.setattr(auth_mod.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    auth(NEW, tokens=(NEW, OLD, "third"))
    assert len(calls) == 3


def test_kid_selects_the_key():
    assert auth(token("u-1", secret=K2, kid="k2")).user_id == "u-1"
    assert auth(token("u-1", secret=K1, kid="k1")).user_id == "u-1"
    # Signed by k1 but naming k2: only k2 is tried.
    assert refused(token("u-1", secret=K1, kid="k2"))[:2] == (401, "UNAUTHENTICATED")
    # The default secret has no kid: a token naming a kid is not checked against it.
    assert refused(token("u-1", secret=SECRET, kid="k1"))[:2] == (401, "UNAUTHENTICATED")


def test_unknown_kid_is_401():
    status, code, message = refused(token("u-1", secret=K1, kid="k9"))
    assert (status, code) == (401, "UNAUTHENTICATED") and "unknown key id" in message
    assert refused(token("u-1", secret=K1, kid="k1"), keys={})[:2] == (401, "UNAUTHENTICATED")


def test_without_kid_every_key_is_tried():
    for secret in (SECRET, K1, K2):
        assert auth(token("u-2", secret=secret)).user_id == "u-2"
    # A previous default secret still listed in DANBAO_JWT_SECRET works; once removed it fails.
    old_secret = "old-default-secret-0123456789abcdef01234"
    assert auth(token("u-2", secret=old_secret), secrets=(SECRET, old_secret)).user_id == "u-2"
    assert refused(token("u-2", secret=old_secret))[:2] == (401, "UNAUTHENTICATED")
    # A key removed from DANBAO_JWT_KEYS no longer verifies anything.
    assert refused(token("u-2", secret=K2), keys={"k1": K1})[:2] == (401, "UNAUTHENTICATED")
    assert refused(token("u-2", secret=K2, kid="k2"), keys={"k1": K1})[:2] == (401, "UNAUTHENTICATED")


def test_expired_token_signed_by_any_key_is_401_expired():
    assert refused(token("u-1", secret=K2, seconds=-5))[2] == "token expired"
    assert refused(token("u-1", secret=K1, kid="k1", seconds=-5))[2] == "token expired"


def test_a_kid_that_is_not_a_string_is_refused():
    import base64, hashlib, hmac, json
    part = lambda obj: base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()
    signing_input = f"{part({'alg': 'HS256', 'typ': 'JWT', 'kid': 1})}.{part({'sub': 'u', 'exp': 9999999999})}"
    sig = base64.urlsafe_b64encode(hmac.new(K1.encode(), signing_input.encode(), hashlib.sha256).digest()).rstrip(b"=")
    tok = f"{signing_input}.{sig.decode()}"
    assert refused(tok)[:2] == (401, "UNAUTHENTICATED")
