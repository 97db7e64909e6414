"""Figures for the ops console's overview: sagas by state, consumer lag by group, and the money
escrow held, released, refunded and earned over time (from escrow's ledger, by transfer code)."""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from deploy.ops.common import Databases

# Escrow ledger codes (services/escrow/domain.py) and what the console calls them.
MONEY_CODES = {"hold": "held", "release": "released", "refund": "refunded", "fee": "fee revenue"}


async def sagas_by_state() -> list[dict[str, Any]]:
    """How many payments are in each saga state and status."""
    async with Databases() as db:
        return await db.fetch("gateway", """SELECT saga_state, status, count(*)::bigint AS n FROM gateway.payments
                                            GROUP BY saga_state, status ORDER BY saga_state, status""")


def lag_by_group(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """doctor.consumer_lag's rows (one a partition) summed per consumer group."""
    groups: dict[str, dict[str, Any]] = {}
    for r in rows:
        g = groups.setdefault(r["group"], {"group": r["group"], "state": r["state"], "topics": set(),
                                           "partitions": 0, "lag": 0})
        g["topics"].add(r["topic"])
        g["partitions"] += 1
        g["lag"] += r["lag"]
    return [{**g, "topics": ", ".join(sorted(g["topics"]))} for g in sorted(groups.values(), key=lambda g: g["group"])]


def bucket_for(span: timedelta) -> str:
    """Hours while the ledger covers two days or less, else days."""
    return "hour" if span <= timedelta(days=2) else "day"


async def money_over_time(max_buckets: int = 30) -> dict[str, Any]:
    """Posted escrow transfers summed by code per hour or day (UTC, on the platform's clock, which
    wrote the transfers), the last `max_buckets` buckets that have any, and the totals of all time."""
    async with Databases() as db:
        span = (await db.fetch("escrow", """SELECT min(created_at) AS first, max(created_at) AS last
                                           FROM escrow.ledger_transfers""") or [{"first": None}])[0]
        if span["first"] is None:
            return {"bucket": "hour", "rows": [], "totals": {label: 0 for label in MONEY_CODES.values()}}
        bucket = bucket_for(span["last"] - span["first"])
        rows = await db.fetch("escrow", """SELECT date_trunc($1, created_at AT TIME ZONE 'UTC') AS bucket, code,
                                                  sum(amount)::bigint AS amount
                                           FROM escrow.ledger_transfers
                                           WHERE kind IN ('posted', 'post_pending') AND code = ANY($2::text[])
                                           GROUP BY 1, 2 ORDER BY 1""", bucket, list(MONEY_CODES))
    by_bucket: dict[Any, dict[str, Any]] = {}
    totals = {label: 0 for label in MONEY_CODES.values()}
    for r in rows:
        row = by_bucket.setdefault(r["bucket"], {"bucket": r["bucket"], **{label: 0 for label in MONEY_CODES.values()}})
        row[MONEY_CODES[r["code"]]] += r["amount"]
        totals[MONEY_CODES[r["code"]]] += r["amount"]
    fmt = "%Y-%m-%d %H:00" if bucket == "hour" else "%Y-%m-%d"
    out = [{**row, "bucket": row["bucket"].strftime(fmt)} for row in by_bucket.values()][-max_buckets:]
    return {"bucket": bucket, "rows": out, "totals": totals}


def bar_chart(rows: list[dict[str, Any]], series: list[str], *, height: int = 180, width: int = 900) -> dict[str, Any]:
    """Geometry of a grouped bar chart (one group a row, one bar a series) for an inline SVG:
    bars 20 px above the bottom (the labels), at most `height` - 36 px tall (the scale on top)."""
    top = max([r[s] for r in rows for s in series] or [0]) or 1
    bar = max(4, min(16, (width - 40) // max(1, len(rows)) // max(1, len(series)) - 2))
    group = bar * len(series) + 8
    bars = []
    for i, r in enumerate(rows):
        for j, s in enumerate(series):
            h = round(r[s] * (height - 36) / top)
            bars.append({"x": 40 + i * group + j * bar, "y": height - 20 - h, "w": bar - 1, "h": h, "series": j,
                         "title": f"{r['bucket']} {s}: {r[s]:,} fen"})
    step = -(-40 // group)  # a label every `step` groups, so that they do not overlap
    labels = [{"x": 40 + i * group, "text": r["bucket"][-5:] if len(r["bucket"]) > 10 else r["bucket"][5:]}
              for i, r in enumerate(rows) if i % step == 0]
    return {"width": max(40 + len(rows) * group + 10, 200), "height": height, "bars": bars, "labels": labels,
            "top": top, "series": series}


async def kind_of(needle: str) -> str | None:
    """"order" when the gateway knows an order by that id, "user" when it knows a user, else None."""
    async with Databases() as db:
        if await db.fetch("gateway", """SELECT 1 FROM gateway.payments WHERE order_id = $1 UNION ALL
                                        SELECT 1 FROM gateway.order_events WHERE order_id = $1 LIMIT 1""", needle):
            return "order"
        if await db.fetch("gateway", "SELECT 1 FROM gateway.users WHERE user_id = $1", needle):
            return "user"
    return None
