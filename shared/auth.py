"""Access control (docs/contract.md §7): the operator token, or a per-user HS256 JWT (`sub`, `exp`)."""
from __future__ import annotations

import hmac
from dataclasses import dataclass

import jwt
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from shared.errors import ApiError

_bearer = HTTPBearer(auto_error=False, description="The operator token, or a user's JWT (HS256, sub = user id)")


@dataclass(frozen=True)
class Principal:
    operator: bool
    user_id: str | None = None

    def may_act_for(self, *user_ids: str | None) -> bool:
        return self.operator or (self.user_id is not None and self.user_id in user_ids)

    def require_user(self, *user_ids: str | None) -> None:
        """403 unless the caller is the operator or one of `user_ids`."""
        if not self.may_act_for(*user_ids):
            raise ApiError(403, "FORBIDDEN", "this token may not access another user's resources")


def authenticate_token(token: str | None, api_token: str, jwt_secret: str) -> Principal:
    if not token:
        raise ApiError(401, "UNAUTHENTICATED", "missing bearer token")
    if hmac.compare_digest(token.encode(), api_token.encode()):
        return Principal(operator=True)
    try:
        claims = jwt.decode(token, jwt_secret, algorithms=["HS256"], options={"require": ["exp", "sub"]})
    except jwt.ExpiredSignatureError:
        raise ApiError(401, "UNAUTHENTICATED", "token expired") from None
    except jwt.InvalidTokenError:
        raise ApiError(401, "UNAUTHENTICATED", "invalid token") from None
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise ApiError(401, "UNAUTHENTICATED", "invalid token subject")
    return Principal(operator=False, user_id=sub)


def principal(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Principal:
    settings = request.app.state.ctx.settings
    return authenticate_token(credentials.credentials if credentials else None, settings.api_token, settings.jwt_secret)


def operator(caller: Principal = Depends(principal)) -> Principal:
    if not caller.operator:
        raise ApiError(403, "FORBIDDEN", "operator token required")
    return caller
