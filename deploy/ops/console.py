"""The ops console: the ops tools (story, dlq, doctor) as server-rendered pages in a browser.

`python -m deploy.ops.console` (`./danbao console`) serves it on CONSOLE_PORT (8006) at HTTP_HOST
(127.0.0.1). Every page but /health and /login needs an operator token, one of
DANBAO_API_TOKEN's (a comma-separated list, compared in constant time): as an
`Authorization: Bearer` header, or logged in once through /login, which sets a session cookie
(HttpOnly, SameSite=Strict, Secure over https) naming the token by its fingerprint and signed
with an HMAC keyed by the token itself, so that retiring a token ends its sessions. Forms that
change something carry a CSRF token derived from the session. A replay is recorded as done by
`console:<fingerprint of the token>`.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import secrets
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, quote

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from deploy.ops import dlq, doctor, overview, story
from deploy.ops.common import jsonable, platform_now, short_time
from deploy.ops.console_templates import TEMPLATES
from shared.auth import authenticate_token, fingerprint
from shared.errors import ApiError

SESSION_COOKIE = "danbao_console"
LOGIN_COOKIE = "danbao_console_login"
SESSION_SECONDS = 12 * 3600
DEAD_LETTERS_SHOWN = 200  # the newest; ?all=1 shows every one
COLOURS = ["#2457c5", "#11702c", "#a86400", "#7b3fb0"]


def operator_tokens() -> tuple[str, ...]:
    return tuple(t.strip() for t in os.environ.get("DANBAO_API_TOKEN", "").split(",") if t.strip())


@dataclass(frozen=True)
class Caller:
    operator: str       # console:<fingerprint of the token>
    csrf: str
    by_cookie: bool


def _key(token: str) -> bytes:
    return hashlib.sha256(b"danbao-console-session\0" + token.encode()).digest()


def _sign(token: str, message: str) -> str:
    return hmac.new(_key(token), message.encode(), hashlib.sha256).hexdigest()


def make_session(token: str, now: float | None = None) -> str:
    body = f"{fingerprint(token)}.{int(now if now is not None else time.time())}"
    return f"{body}.{_sign(token, body)}"


def check_session(cookie: str | None, tokens: tuple[str, ...], now: float | None = None) -> str | None:
    """The token a valid, unexpired session cookie was made with, else None."""
    try:
        fp, issued, sig = (cookie or "").split(".")
        age = (now if now is not None else time.time()) - int(issued)
    except ValueError:
        return None
    if not 0 <= age <= SESSION_SECONDS:
        return None
    found = None
    for token in tokens:  # every token is tried: no early exit
        if hmac.compare_digest(_sign(token, f"{fp}.{issued}"), sig) and fingerprint(token) == fp:
            found = token
    return found


def csrf_for(token: str, session: str) -> str:
    return _sign(token, "csrf\0" + session)


def caller_of(request: Request, tokens: tuple[str, ...]) -> Caller | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        try:
            who = authenticate_token(header[7:].strip(), tokens, ())
        except ApiError:
            return None
        return Caller(f"console:{who.token_id}", "", by_cookie=False) if who.operator else None
    session = request.cookies.get(SESSION_COOKIE)
    token = check_session(session, tokens)
    if token is None:
        return None
    return Caller(f"console:{fingerprint(token)}", csrf_for(token, session), by_cookie=True)


def _safe_next(value: str | None) -> str:
    return value if value and value.startswith("/") and not value.startswith("//") and "\\" not in value else "/"


def _when(value: Any) -> Any:
    return short_time(value) if isinstance(value, datetime) else ("" if value is None else value)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.DictLoader(TEMPLATES), autoescape=True, undefined=jinja2.ChainableUndefined)
    env.filters["tojson_pretty"] = lambda v: json.dumps(jsonable(v), indent=2, ensure_ascii=False, default=str)
    env.globals.update(when=_when, colours=COLOURS)
    return env


async def _form(request: Request) -> dict[str, str]:
    body = (await request.body()).decode("utf-8", "replace")
    return {k: v[0] for k, v in parse_qs(body, keep_blank_values=True).items()}


def create_app(tokens: tuple[str, ...] | None = None) -> FastAPI:
    tokens = operator_tokens() if tokens is None else tokens
    if not tokens:
        raise SystemExit("DANBAO_API_TOKEN is not set: the console lets in only operators")
    app = FastAPI(title="Danbao ops console", docs_url=None, redoc_url=None, openapi_url=None)
    pages = _environment()

    def page(name: str, status: int = 200, **context: Any) -> HTMLResponse:
        return HTMLResponse(pages.get_template(name).render(**context), status_code=status,
                            headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                                     "Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'; "
                                                                "img-src 'self' data:; frame-ancestors 'none'"})

    def login_redirect(request: Request) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)

    def authorised(request: Request) -> Caller | None:
        return caller_of(request, tokens)

    async def checked_form(request: Request, caller: Caller) -> dict[str, str] | None:
        form = await _form(request)
        if caller.by_cookie and not hmac.compare_digest(form.get("csrf", ""), caller.csrf):
            return None
        return form

    @app.exception_handler(Exception)
    async def unavailable(request: Request, exc: Exception) -> Response:
        """A page whose data cannot be read (Postgres or Kafka away) says so instead of a bare 500."""
        caller = authorised(request)
        return page("error", 503, caller=caller, error=f"{type(exc).__name__}: {exc}" if caller else "unavailable")

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "service": "console"})

    @app.get("/login")
    async def login_page(request: Request, next: str = "/") -> Response:  # noqa: A002 - the query parameter
        nonce = secrets.token_urlsafe(24)
        response = page("login", csrf=nonce, next=_safe_next(next), caller=None)
        response.set_cookie(LOGIN_COOKIE, nonce, httponly=True, samesite="strict", path="/login",
                            secure=request.url.scheme == "https", max_age=3600)
        return response

    @app.post("/login")
    async def login(request: Request) -> Response:
        form = await _form(request)
        nonce = request.cookies.get(LOGIN_COOKIE, "")
        target = _safe_next(form.get("next"))
        if not nonce or not hmac.compare_digest(form.get("csrf", ""), nonce):
            return page("login", 403, error="The log-in form expired: try again.", csrf=nonce, next=target, caller=None)
        try:
            who = authenticate_token(form.get("token", "").strip(), tokens, ())
        except ApiError:
            who = None
        if who is None or not who.operator:
            return page("login", 401, error="That is not an operator token.", csrf=nonce, next=target, caller=None)
        token = next(t for t in tokens if fingerprint(t) == who.token_id)  # keys the session
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(SESSION_COOKIE, make_session(token), httponly=True, samesite="strict", path="/",
                            secure=request.url.scheme == "https", max_age=SESSION_SECONDS)
        response.delete_cookie(LOGIN_COOKIE, path="/login")
        return response

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        caller = authorised(request)
        if caller is None or await checked_form(request, caller) is None:
            return Response("forbidden", status_code=403)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @app.get("/")
    async def home(request: Request) -> Response:
        caller = authorised(request)
        if caller is None:
            return login_redirect(request)
        errors: list[str] = []

        async def attempt(name: str, coro: Any, default: Any) -> Any:
            try:
                return await coro
            except Exception as exc:  # noqa: BLE001 - one part failing leaves the others on the page
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
                return default
        report, sagas, lag, money = await asyncio.gather(
            attempt("doctor", doctor.diagnose(audit_wait=0), None),
            attempt("sagas", overview.sagas_by_state(), []),
            attempt("consumer lag", doctor.consumer_lag(), []),
            attempt("money", overview.money_over_time(), {"bucket": "hour", "rows": [], "totals": {}}))
        series = list(overview.MONEY_CODES.values())
        checks = {c.name: {"status": c.status, "summary": c.summary, "rows": c.rows} for c in report.checks} if report else {}
        return page("overview", caller=caller, report=report, checks=checks, sagas=sagas,
                    lag=overview.lag_by_group(lag), money=money, chart=overview.bar_chart(money["rows"], series),
                    now=_when(report.now if report else await platform_now()), errors=errors)

    @app.get("/search")
    async def search(request: Request, q: str = "") -> Response:
        caller = authorised(request)
        if caller is None:
            return login_redirect(request)
        q = q.strip()
        if not q:
            return RedirectResponse("/", status_code=303)
        if await overview.kind_of(q) == "user":
            return page("user", caller=caller, s=await story.user_story(q), q=q)
        s = await story.order_story(q)  # an order, or whatever the services published about it
        return page("order", 200 if s["found"] else 404, caller=caller, s=s, q=q)

    @app.get("/orders/{order_id}")
    async def order(request: Request, order_id: str) -> Response:
        caller = authorised(request)
        if caller is None:
            return login_redirect(request)
        s = await story.order_story(order_id)
        return page("order", 200 if s["found"] else 404, caller=caller, s=s, q=order_id)

    @app.get("/users/{user_id}")
    async def user(request: Request, user_id: str) -> Response:
        caller = authorised(request)
        if caller is None:
            return login_redirect(request)
        s = await story.user_story(user_id)
        return page("user", 200 if s["found"] else 404, caller=caller, s=s, q=user_id)

    @app.get("/dead-letters")
    async def dead_letters(request: Request) -> Response:
        caller = authorised(request)
        if caller is None:
            return login_redirect(request)
        errors = []
        try:
            letters = await dlq.read()
            replays = {r["dead_letter"]: r for r in await dlq.history(10_000)}
        except Exception as exc:  # noqa: BLE001
            letters, replays = [], {}
            errors.append(f"could not read the dead letters: {type(exc).__name__}: {exc}")
        rows = [{**d.summary(), "replay": replays.get(d.position)} for d in letters]
        shown = rows if request.query_params.get("all") else rows[-DEAD_LETTERS_SHOWN:]
        return page("dead_letters", caller=caller, letters=shown, total=len(rows),
                    open=sum(1 for r in rows if not r["replay"]), errors=errors)

    async def letter_page(caller: Caller, position: str, *, status: int = 200, value: str | None = None,
                          error: dlq.ReplayError | None = None, result: dict | None = None) -> Response:
        d = replay = None
        try:
            letter = await dlq.show(position)
            d = letter.detail()
            replay = next((r for r in await dlq.history(10_000) if r["dead_letter"] == position), None)
            if value is None:
                value = (json.dumps(d["value"], indent=2, ensure_ascii=False) if d["value_is_json"] else d["value"] or "")
        except dlq.ReplayError as exc:
            error, status = error or exc, 404 if exc.code in ("NOT_FOUND", "INVALID_POSITION") else status
        return page("dead_letter", status, caller=caller, position=position, d=d, replay=replay, value=value or "",
                    error=error, result=result)

    @app.get("/dead-letters/{position}")
    async def dead_letter(request: Request, position: str) -> Response:
        caller = authorised(request)
        if caller is None:
            return login_redirect(request)
        return await letter_page(caller, position)

    @app.post("/dead-letters/{position}/replay")
    async def replay(request: Request, position: str) -> Response:
        caller = authorised(request)
        if caller is None:
            return Response("log in first", status_code=401)
        form = await checked_form(request, caller)
        if form is None:
            return Response("missing or wrong CSRF token: reload the page", status_code=403)
        edited = form.get("value")
        value: bytes | None = None
        try:
            if edited is not None and edited.strip():
                original = dlq.decoded((await dlq.show(position)).value)
                try:
                    unchanged = original is not None and json.loads(edited) == original
                except ValueError:
                    unchanged = False
                value = None if unchanged else edited.encode("utf-8")
            result = await dlq.replay(position, value=value, operator=caller.operator)
        except dlq.ReplayError as exc:
            status = {"ALREADY_REPLAYED": 409, "NOT_FOUND": 404, "INVALID_POSITION": 404}.get(exc.code, 422)
            return await letter_page(caller, position, status=status, value=edited, error=exc)
        return await letter_page(caller, position, result=result, value=edited)  # what was sent stays in view

    return app


def main() -> None:
    import uvicorn

    host = os.environ.get("HTTP_HOST", "127.0.0.1")
    port = int(os.environ.get("CONSOLE_PORT", "8006"))
    app = create_app()
    print(f"Danbao ops console on http://{host}:{port}/ (log in with an operator token)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level=os.environ.get("CONSOLE_LOG_LEVEL", "warning"))


if __name__ == "__main__":
    main()
