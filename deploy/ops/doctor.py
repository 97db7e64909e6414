"""Stuck work (`./danbao doctor`): what is late, backed up or broken, and whether a human is needed.

Each check gives `ok`, `warn` (worth a look; the platform deals with it by itself) or `fail`
(something needs a human, or the platform is not recovering). The command exits 1 when any
check fails, so it can run from cron or as a health check. Time-based checks use the platform's
clock (the test clock when the services run on it) and allow `grace` seconds, because a timer
falls due a little before the worker that handles it wakes up.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.protocol.admin import DescribeGroupsRequest, DescribeGroupsRequest_v2

from deploy.audit import audit_settled
from deploy.ops import dlq
from deploy.ops.common import SERVICES, Databases, kafka_kwargs, operator_client, platform_now, short_time, url
from services.gateway.domain import SagaState

IN_PROGRESS = [s.value for s in SagaState if s.in_progress]


@dataclass
class Check:
    name: str
    status: str = "ok"  # ok | warn | fail
    summary: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Report:
    checks: list[Check]
    now: Any

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "now": self.now,
                "checks": [{"name": c.name, "status": c.status, "summary": c.summary, "rows": c.rows} for c in self.checks]}


async def _health() -> Check:
    check = Check("services")
    async with httpx.AsyncClient(timeout=3) as http:
        for s in (*SERVICES, "risk"):
            try:
                r = await http.get(f"{url(s)}/health")
                state = "up" if r.status_code == 200 else f"unhealthy ({r.status_code})"
            except httpx.HTTPError as exc:
                state = f"down ({type(exc).__name__})"
            check.rows.append({"service": s, "state": state})
    down = [r["service"] for r in check.rows if r["state"] != "up"]
    check.status, check.summary = ("fail", "not healthy: " + ", ".join(down)) if down else ("ok", "all healthy")
    return check


async def _late(db: Databases, now, grace: timedelta) -> list[Check]:
    cutoff = now - grace
    sagas = Check("sagas past their deadline", rows=await db.fetch(
        "gateway", """SELECT order_id, saga_state, payment_method, deadline_at, attempts FROM gateway.payments
                      WHERE saga_state = ANY($1::text[]) AND deadline_at < $2 ORDER BY deadline_at LIMIT 50""",
        IN_PROGRESS, cutoff))
    in_flight = (await db.fetch("gateway", """SELECT count(*) AS n FROM gateway.payments
                                              WHERE saga_state = ANY($1::text[])""", IN_PROGRESS) or [{"n": 0}])[0]["n"]
    holds = Check("holds past their auto-confirm time", rows=await db.fetch(
        "escrow", """SELECT order_id, amount, auto_confirm_at FROM escrow.escrows
                     WHERE status = 'HELD' AND auto_confirm_at < $1 ORDER BY auto_confirm_at LIMIT 50""", cutoff))
    reservations = Check("credit reservations past expiry", rows=await db.fetch(
        "credit", """SELECT order_id, user_id, amount, expires_at FROM credit.reservations
                     WHERE state = 'reserved' AND expires_at < $1 ORDER BY expires_at LIMIT 50""", cutoff))
    for c in (sagas, holds, reservations):
        c.status = "fail" if c.rows else "ok"
        c.summary = f"{len(c.rows)}{'+' if len(c.rows) == 50 else ''} late" if c.rows else "none"
    sagas.summary += f" ({in_flight} sagas in progress)"
    return [sagas, holds, reservations]


async def _outboxes(db: Databases, max_age: timedelta) -> Check:
    check = Check("outbox backlog")
    for s in SERVICES:
        row = (await db.fetch(s, f"""SELECT count(*) AS waiting, now() - min(created_at) AS oldest
                                     FROM {s}.outbox WHERE published_at IS NULL""") or [{"waiting": 0, "oldest": None}])[0]
        check.rows.append({"service": s, "waiting": row["waiting"],
                           "oldest_seconds": round(row["oldest"].total_seconds(), 1) if row["oldest"] else None})
    stuck = [r for r in check.rows if r["oldest_seconds"] and r["oldest_seconds"] > max_age.total_seconds()]
    total = sum(r["waiting"] for r in check.rows)
    check.status = "fail" if stuck else "ok"
    check.summary = (f"not draining at {', '.join(r['service'] for r in stuck)}" if stuck else f"{total} waiting")
    return check


async def _parked(db: Databases) -> Check:
    rows = await db.fetch("gateway", """SELECT type, count(*) AS n, min(received_at) AS oldest FROM gateway.order_events
                                        WHERE state = 'parked' GROUP BY type ORDER BY type""")
    n = sum(r["n"] for r in rows)
    return Check("parked events", "warn" if n else "ok",
                 f"{n} waiting for their OrderPlaced (they expire by themselves)" if n else "none", rows)


class _DescribeGroupsV2(DescribeGroupsRequest):
    """DescribeGroups pinned to v2: aiokafka's v3 request names the v2 response layout, so the
    answer of a broker that speaks v3 (Kafka 3.x) fails to decode. v2 carries all we read."""

    def build(self, request_struct_class):
        return DescribeGroupsRequest_v2(self._groups)


async def _group_states(admin: AIOKafkaAdminClient, groups: list[str]) -> dict[str, str]:
    by_coordinator: dict[int, list[str]] = {}
    for g in groups:
        by_coordinator.setdefault(await admin.find_coordinator(g), []).append(g)
    states = {}
    for node, names in by_coordinator.items():
        response = await admin._send_request(_DescribeGroupsV2(names), node)  # noqa: SLF001 - see the class
        states.update({g[1]: g[2] for g in response.groups})
    return states


async def consumer_lag() -> list[dict[str, Any]]:
    """Committed offset and lag of every consumer group, per partition, with the group's state
    (`Stable` while it has members; `Empty` once they are all gone)."""
    admin = AIOKafkaAdminClient(**kafka_kwargs())
    await admin.start()
    rows = []
    try:
        groups = sorted(g[0] for g in await admin.list_consumer_groups())
        states = await _group_states(admin, groups)
        committed: dict[str, dict[TopicPartition, int]] = {}
        for g in groups:
            offsets = await admin.list_consumer_group_offsets(g)
            committed[g] = {tp: om.offset for tp, om in offsets.items() if om.offset >= 0}
    finally:
        await admin.close()
    tps = sorted({tp for c in committed.values() for tp in c})
    if not tps:
        return rows
    consumer = AIOKafkaConsumer(**kafka_kwargs(), enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(tps)  # every topic's metadata in one request (else one retry round per topic: 100 ms each)
        end = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    for g in groups:
        for tp, offset in sorted(committed[g].items()):
            rows.append({"group": g, "state": states.get(g, "?"), "topic": tp.topic, "partition": tp.partition,
                         "committed": offset, "end": end[tp], "lag": max(0, end[tp] - offset)})
    return rows


async def _lag(max_lag: int) -> Check:
    try:
        rows = await consumer_lag()
    except Exception as exc:  # noqa: BLE001 - Kafka away is itself the finding
        return Check("consumer lag", "fail", f"Kafka not reachable: {exc!r}")
    # A group with no members left (an old test run, a renamed app) is not the platform's work;
    # a service that is down shows in the services check.
    active = [r for r in rows if r["state"] not in ("Empty", "Dead")]
    idle = {r["group"] for r in rows} - {r["group"] for r in active}
    by_group: dict[str, int] = {}
    for r in active:
        by_group[r["group"]] = by_group.get(r["group"], 0) + r["lag"]
    behind = {g: n for g, n in by_group.items() if n > max_lag}
    summary = (("behind: " + ", ".join(f"{g} {n}" for g, n in behind.items())) if behind
               else f"{len(by_group)} active groups, {sum(by_group.values())} records behind in all")
    return Check("consumer lag", "warn" if behind else "ok", summary + (f"; {len(idle)} idle groups left out" if idle else ""),
                 [r for r in active if r["lag"]][:100])


async def _dead_letters() -> Check:
    try:
        letters = await dlq.read()
        replayed = {r["dead_letter"] for r in await dlq.history(10_000)}
    except Exception as exc:  # noqa: BLE001
        return Check("dead letters", "fail", f"could not read them: {exc!r}")
    open_ = [d.summary() for d in letters if d.position not in replayed]
    return Check("dead letters", "warn" if open_ else "ok",
                 f"{len(open_)} not replayed ({len(letters)} in all): ./danbao dlq list" if open_ else
                 f"none waiting ({len(letters)} in all)", open_[-20:])


async def _audit(wait: float) -> Check:
    try:
        report = await audit_settled(wait)
    except Exception as exc:  # noqa: BLE001
        return Check("audit", "fail", f"could not run: {exc!r}")
    return Check("audit", "ok" if report.ok else "fail",
                 "every fen is accounted for" if report.ok else "; ".join(report.problems),
                 [{"figure": k, "fen": v} for k, v in report.figures.items()])


async def diagnose(*, grace_seconds: float = 60, max_lag: int = 10_000, audit_wait: float = 5) -> Report:
    async with operator_client() as http:
        now = await platform_now(http)
    checks = [await _health()]
    grace = timedelta(seconds=grace_seconds)
    async with Databases() as db:
        checks += await _late(db, now, grace)
        checks.append(await _outboxes(db, grace))
        checks.append(await _parked(db))
    checks.append(await _lag(max_lag))
    checks.append(await _dead_letters())
    checks.append(await _audit(audit_wait))
    return Report(checks, now)


_COLUMNS = {"dead letters": ("position", "code", "type", "key", "message"),
            "audit": ("figure", "fen")}


def render(report: Report) -> str:
    mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
    lines = [f"Danbao doctor (platform time {short_time(report.now)})"]
    for c in report.checks:
        lines.append(f"  [{mark[c.status]}] {c.name}: {c.summary}")
        if c.status != "ok" or c.name == "outbox backlog":
            for r in c.rows[:10]:
                shown = {k: v for k, v in r.items() if k in _COLUMNS.get(c.name, r)}
                lines.append("           " + ", ".join(f"{k}={short_time(v) if hasattr(v, 'tzinfo') else v}"
                                                      for k, v in shown.items())[:200])
            if len(c.rows) > 10:
                lines.append(f"           … {len(c.rows) - 10} more (--json shows all)")
    lines.append("  needs a human: " + ("no" if report.ok else "YES"))
    return "\n".join(lines)
