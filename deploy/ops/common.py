"""What every ops tool needs: where the services' databases, HTTP APIs and Kafka are."""
from __future__ import annotations

import json
import os
from datetime import date, datetime, timezone
from typing import Any

import asyncpg
import httpx

from deploy.audit import dsn  # noqa: F401 - the audit says where each service keeps its schema
from shared.settings import DEFAULT_URLS

SERVICES = ("gateway", "escrow", "credit", "billing")


def url(service: str) -> str:
    if service == "risk":
        return (os.environ.get("RISK_URL") or f"http://127.0.0.1:{os.environ.get('RISK_WEB_PORT', '8005')}").rstrip("/")
    return (os.environ.get(f"{service.upper()}_URL") or DEFAULT_URLS[service]).rstrip("/")


def kafka_bootstrap() -> str:
    return os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or "127.0.0.1:9092"


def kafka_kwargs() -> dict[str, Any]:
    """Connection arguments for every aiokafka client the ops tools make."""
    try:  # the platform's own client settings (security protocol, SASL, TLS) when it has them
        from shared.kafka import client_kwargs  # type: ignore[attr-defined]
        return client_kwargs()
    except ImportError:
        return {"bootstrap_servers": kafka_bootstrap()}


def operator_client(timeout: float = 5.0) -> httpx.AsyncClient:
    token = os.environ.get("DANBAO_API_TOKEN", "").split(",")[0].strip()
    return httpx.AsyncClient(timeout=timeout, headers={"Authorization": f"Bearer {token}"} if token else {})


class Databases:
    """One connection per service schema (the same database unless a service has its own URL)."""

    def __init__(self) -> None:
        self.conns: dict[str, asyncpg.Connection] = {}

    async def __aenter__(self) -> "Databases":
        by_dsn: dict[str, asyncpg.Connection] = {}
        for s in SERVICES:
            d = dsn(s)
            if d not in by_dsn:
                by_dsn[d] = await asyncpg.connect(d)
            self.conns[s] = by_dsn[d]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for conn in {id(c): c for c in self.conns.values()}.values():
            await conn.close()

    def __getitem__(self, service: str) -> asyncpg.Connection:
        return self.conns[service]

    async def fetch(self, service: str, sql: str, *args: Any) -> list[dict[str, Any]]:
        """Rows as dicts; [] when the table does not exist (a service that never started)."""
        try:
            return [dict(r) for r in await self.conns[service].fetch(sql, *args)]
        except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError, asyncpg.UndefinedColumnError):
            return []


async def platform_now(http: httpx.AsyncClient | None = None) -> datetime:
    """The platform's clock: the test clock when the services run on it (asked of the first
    service that answers: the clock is shared), else the wall clock."""
    own = http is None
    http = http or operator_client()
    try:
        for service in SERVICES:
            try:
                r = await http.get(f"{url(service)}/admin/clock", timeout=2)
            except httpx.HTTPError:
                continue  # that service is down: ask the next
            if r.status_code == 200:
                return datetime.fromisoformat(r.json()["now"].replace("Z", "+00:00"))
            if r.status_code == 404:
                break  # the test clock is off: the wall clock is the platform's
    finally:
        if own:
            await http.aclose()
    return datetime.now(timezone.utc)


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.hex()
    return value


def dumps(value: Any) -> str:
    return json.dumps(jsonable(value), indent=2, ensure_ascii=False)


def fen(amount: int | None) -> str:
    return "-" if amount is None else f"{amount:,} fen".replace(",", " ")


def short_time(value: Any) -> str:
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"
    return str(value or "")
