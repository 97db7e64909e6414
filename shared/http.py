"""What every service's HTTP API has: the error shape, /health, /metrics, /openapi.json, the
test clock's /admin/clock, and request metrics."""
from __future__ import annotations

import asyncio
import json
import re

from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictFloat, StrictInt, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared import audit, auth, metrics
from shared.clock import ClockMovedBack
from shared.errors import ApiError
from shared.events import _has_nul, rfc3339


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


log = structlog.get_logger("http")

ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 403, 404, 409, 422)}


def ctx_of(request: Request):
    return request.app.state.ctx


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"code": code, "message": message}})


_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


async def _valid_path_ids(request: Request) -> None:
    """Every id in a path follows the id pattern of the events (letters, digits, _ and -, at most
    64): anything else (a NUL, a slash, 65 characters, ...) is a malformed request, 400, on every
    service, rather than an unknown id (404) or a database error (500)."""
    for name, value in request.path_params.items():
        if name.endswith("_id") and not _ID.match(value):
            raise ApiError(400, "INVALID_REQUEST", f"{name}: must match {_ID.pattern}")


async def _no_nul_in_body(request: Request) -> None:
    """No text in a JSON body may hold a NUL: Postgres text cannot store one, so it would be a 500
    half-way through a write. Parsed only when the escape (or a raw NUL) appears at all."""
    if request.method not in ("POST", "PUT", "PATCH"):
        return
    body = await request.body()  # cached by Starlette: the endpoint reads it again for free
    if b"\\u0000" not in body and b"\x00" not in body:
        return
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if b"\x00" in body or _has_nul(parsed):
        raise ApiError(400, "INVALID_REQUEST", "text fields must not contain the NUL character (\\u0000)")


def create_app(service: str, routers: list[APIRouter]) -> FastAPI:
    app = FastAPI(title=f"Danbao {service}", version="1", openapi_url="/openapi.json", docs_url="/docs",
                  redoc_url=None, dependencies=[Depends(_valid_path_ids), Depends(_no_nul_in_body)])

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return _error(400, "INVALID_REQUEST", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(exc.status_code, "HTTP_ERROR")
        return _error(exc.status_code, code, str(exc.detail))

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.HTTP_REQUESTS.labels(request.method, getattr(route, "path", "unmatched"), response.status_code).inc()
        return response

    @app.middleware("http")
    async def _audit(request: Request, call_next):
        """The audit trail (shared/audit.py): every /admin/* call that may change something, on
        every service, recorded before it runs and completed with its status."""
        if not audit.audited(request.method, request.url.path):
            return await call_next(request)
        who = _caller_of(request)
        try:
            entry = await audit.start(ctx_of(request).pool, operator=request.headers.get("x-operator"),
                                      token_id=who, method=request.method, path=request.url.path,
                                      body=audit.body_summary(await request.body()))
        except Exception as exc:  # no trail, no operator action
            log.error("audit trail unavailable; operator action refused", error=repr(exc))
            return _error(503, "AUDIT_UNAVAILABLE", "the audit trail cannot be written; try again")
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            log.info("operator action", audit_id=entry, token_id=who, method=request.method,
                     path=audit.clean(request.url.path, 300), status=status)
            try:
                await audit.finish(ctx_of(request).pool, entry, status)
            except Exception as exc:
                log.error("audit outcome not written", audit_id=entry, status=status, error=repr(exc))

    app.include_router(_common_router())
    for router in routers:
        app.include_router(router)
    return app


def _caller_of(request: Request) -> str | None:
    """Who calls, for the audit trail: the operator token's fingerprint, `user:<id>` for a user
    token, None without a valid token. Never the token itself."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    try:
        caller = auth.authenticate(request, token.strip())
    except ApiError:
        return None
    return caller.token_id if caller.operator else f"user:{caller.user_id}"


class AuditEntry(BaseModel):
    id: int
    at: str
    operator: str | None
    token_id: str | None
    method: str
    path: str
    body: Any
    status: int | None
    finished_at: str | None


class ClockMove(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # At most a hundred years at a time: a date beyond year 9999 cannot be represented.
    advance_seconds: Annotated[StrictInt | StrictFloat, Field(ge=0, le=100 * 366 * 86_400)] | None = None
    set: AwareDatetime | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "ClockMove":
        if (self.advance_seconds is None) == (self.set is None):
            raise ValueError("give exactly one of advance_seconds and set")
        return self


class ClockNow(BaseModel):
    now: str


def _common_router() -> APIRouter:
    router = APIRouter()

    @router.get("/health", tags=["operations"])
    async def health(request: Request):
        ctx = ctx_of(request)
        checks = {}
        try:
            await asyncio.wait_for(ctx.pool.fetchval("SELECT 1"), 3)
            checks["postgres"] = "ok"
        except Exception as exc:
            checks["postgres"] = f"error: {exc!r}"
        try:
            await asyncio.wait_for(ctx.producer.client.fetch_all_metadata(), 3)
            checks["kafka"] = "ok"
        except Exception as exc:
            checks["kafka"] = f"error: {exc!r}"
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse(status_code=200 if ok else 503,
                            content={"status": "ok" if ok else "unavailable", "service": ctx.settings.service, **checks})

    @router.get("/metrics", tags=["operations"])
    async def prometheus_metrics():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    def controllable_clock(request: Request):
        clock = ctx_of(request).clock
        if not clock.controllable:
            raise ApiError(404, "NOT_FOUND", "the test clock is off (DANBAO_CLOCK=system)")
        return clock

    @router.get("/admin/clock", response_model=ClockNow, responses=ERRORS, tags=["test clock"],
                dependencies=[Depends(auth.operator)])
    async def get_clock(request: Request):
        clock = controllable_clock(request)
        return {"now": rfc3339(await clock.refresh())}

    @router.post("/admin/clock", response_model=ClockNow, responses=ERRORS, tags=["test clock"],
                 dependencies=[Depends(auth.operator)])
    async def move_clock(move: ClockMove, request: Request):
        clock = controllable_clock(request)
        try:
            if move.set is not None:
                now = await clock.set(move.set)
            else:
                now = await clock.advance(move.advance_seconds)
        except ClockMovedBack as exc:
            raise ApiError(409, "CLOCK_MOVED_BACK", str(exc)) from None
        ctx_of(request).clock_moved.set()
        return {"now": rfc3339(now)}

    @router.get("/admin/audit-log", response_model=list[AuditEntry], responses=ERRORS, tags=["operations"],
                dependencies=[Depends(auth.operator)])
    async def audit_log(request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                        before: Annotated[int | None, Query(ge=1, description="page back: entries older than this id")] = None):
        """Operator actions on this service (every /admin/* call that may change something, refused
        ones too), newest first: who (X-Operator, the token's fingerprint), what (method, path, a
        summary of the body without secrets or personal data), when, and the HTTP status."""
        return [{**e, "at": rfc3339(e["at"]), "finished_at": e["finished_at"] and rfc3339(e["finished_at"])}
                for e in await audit.recent(ctx_of(request).pool, limit, before)]

    return router
