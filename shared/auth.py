"""Access control (docs/contract.md §7): an operator token, or a per-user HS256 JWT (`sub`, `exp`).

Both rotate without downtime: several operator tokens may be valid at once (the current one and
those being retired), and user tokens are checked against a list of keys, chosen by the JWT's
`kid` header when it has one, otherwise each key is tried."""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import jwt
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from shared.errors import ApiError

_bearer = HTTPBearer(auto_error=False, description="The operator token, or a user's JWT (HS256, sub = user id)")


@dataclass(frozen=True)
class Principal:
    operator: bool
    user_id: str | None = None
    # Which operator token (its fingerprint, never the token): for the audit trail.
    token_id: str | None = field(default=None, compare=False)

    def may_act_for(self, *user_ids: str | None) -> bool:
        return self.operator or (self.user_id is not None and self.user_id in user_ids)

    def require_user(self, *user_ids: str | None) -> None:
        """403 unless the caller is the operator or one of `user_ids`."""
        if not self.may_act_for(*user_ids):
            raise ApiError(403, "FORBIDDEN", "this token may not access another user's resources")


def fingerprint(token: str) -> str:
    """Names an operator token in logs and the audit trail without revealing it:
    `op-` and the first 12 hex digits of its SHA-256."""
    return "op-" + hashlib.sha256(token.encode()).hexdigest()[:12]


def _operator_token(token: str, api_tokens: Sequence[str]) -> str | None:
    """The operator token `token` is, compared in constant time with every candidate (digests of
    equal length, no early exit), or None."""
    digest = hashlib.sha256(token.encode()).digest()
    match = None
    for candidate in api_tokens:
        if hmac.compare_digest(digest, hashlib.sha256(candidate.encode()).digest()) and match is None:
            match = candidate
    return match


def _jwt_claims(token: str, jwt_secrets: Sequence[str], jwt_keys: Mapping[str, str]) -> dict:
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.InvalidTokenError:
        raise ApiError(401, "UNAUTHENTICATED", "invalid token") from None
    if kid is not None:  # a named key, and only that one
        if not isinstance(kid, str) or kid not in jwt_keys:
            raise ApiError(401, "UNAUTHENTICATED", "invalid token: unknown key id")
        candidates = [jwt_keys[kid]]
    else:  # every key: the default secrets first
        candidates = [*jwt_secrets, *jwt_keys.values()]
    for secret in candidates:
        try:
            return jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["exp", "sub"]})
        except jwt.InvalidSignatureError:
            continue  # another key may have signed it
        except jwt.ExpiredSignatureError:
            raise ApiError(401, "UNAUTHENTICATED", "token expired") from None
        except jwt.InvalidTokenError:
            raise ApiError(401, "UNAUTHENTICATED", "invalid token") from None
    raise ApiError(401, "UNAUTHENTICATED", "invalid token")


def authenticate_token(token: str | None, api_tokens: Sequence[str], jwt_secrets: Sequence[str],
                       jwt_keys: Mapping[str, str] | None = None) -> Principal:
    if not token:
        raise ApiError(401, "UNAUTHENTICATED", "missing bearer token")
    operator_token = _operator_token(token, api_tokens)
    if operator_token is not None:
        return Principal(operator=True, token_id=fingerprint(operator_token))
    claims = _jwt_claims(token, jwt_secrets, jwt_keys or {})
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise ApiError(401, "UNAUTHENTICATED", "invalid token subject")
    return Principal(operator=False, user_id=sub)


def authenticate(request: Request, token: str | None) -> Principal:
    settings = request.app.state.ctx.settings
    return authenticate_token(token, settings.api_tokens, settings.jwt_secrets, settings.jwt_keys)


def principal(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Principal:
    return authenticate(request, credentials.credentials if credentials else None)


def operator(caller: Principal = Depends(principal)) -> Principal:
    if not caller.operator:
        raise ApiError(403, "FORBIDDEN", "operator token required")
    return caller
