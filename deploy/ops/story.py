"""An order's whole story (`./danbao order ORDER_ID`) and a user's (`./danbao user USER_ID`).

Built only from what the services already keep: the gateway's record of every upstream order
event and its payment saga, each service's outbox (every event it published, kept for the outbox
retention), escrow's hold and refunds, the credit reservation, billing's purchase, and the
ledger transfers of every ledger. `problems` names whatever disagrees between services; money
still in flight between two services shows there for a moment, so a problem is worth a second
look only when it stays.
"""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

from deploy.ops.common import SERVICES, Databases, fen, operator_client, platform_now, short_time, url
from services.gateway.domain import SagaState
from services.gateway.accounts import wallet as wallet_account

_POSTED = ("posted", "post_pending")
_SAGA_OVER = tuple(s.value for s in SagaState if not s.in_progress)
# Gateway payment status -> escrow statuses that agree with it.
_ESCROW_AGREES = {
    "HELD": {"HELD"},
    "RELEASED": {"RELEASED"},
    "PARTIALLY_REFUNDED": {"HELD", "RELEASED"},
    "REFUNDED": {"REFUNDED", "CANCELLED", "RELEASED"},
    "FAILED": {None, "CANCELLED", "REFUNDED"},
    "PENDING": {None, "HELD", "CANCELLED"},
}


def _entry(at: Any, service: str, kind: str, summary: str, detail: Any = None, **extra: Any) -> dict[str, Any]:
    return {"at": at, "service": service, "kind": kind, "summary": summary, "detail": detail, **extra}


def _decode(value: bytes | None) -> dict[str, Any] | None:
    try:
        obj = json.loads(value.decode("utf-8")) if value is not None else None
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _when(text: Any, fallback: datetime) -> datetime:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return fallback


def _net(transfers: list[dict], account: str, *, credit_side: bool) -> int:
    """Posted money into `account` (credit_side) or out of it, minus the other way."""
    total = 0
    for t in transfers:
        if t["kind"] not in _POSTED:
            continue
        if t["credit_account"] == account:
            total += t["amount"] if credit_side else -t["amount"]
        if t["debit_account"] == account:
            total -= t["amount"] if credit_side else -t["amount"]
    return total


async def published_events(db: Databases, service: str, needle: str, *, match: str) -> list[dict[str, Any]]:
    """Outbox rows of `service` whose envelope carries `needle` in data[match] (or as correlation id)."""
    rows = await db.fetch(service, f"""SELECT id, topic, key, value, header_keys, header_values, created_at, published_at
                                      FROM {service}.outbox WHERE position($1::bytea IN value) > 0 ORDER BY id""",
                          needle.encode())
    out = []
    for r in rows:
        env = _decode(r["value"])
        if env is None:
            continue
        data = env.get("data") if isinstance(env.get("data"), dict) else {}
        if data.get(match) != needle and not (match == "order_id" and env.get("correlation_id") == needle):
            continue
        headers = dict(zip(r["header_keys"], r["header_values"]))
        out.append({"service": service, "topic": r["topic"], "outbox_id": r["id"], "envelope": env,
                    "created_at": r["created_at"], "published_at": r["published_at"],
                    "error": {k: headers[k].decode("utf-8", "replace") for k in ("error.code", "error.message")
                              if k in headers} or None})
    return out


async def order_story(order_id: str) -> dict[str, Any]:
    async with Databases() as db:
        payment = (await db.fetch("gateway", "SELECT * FROM gateway.payments WHERE order_id = $1", order_id) or [None])[0]
        received = await db.fetch("gateway", """SELECT event_id, type, data, state, received_at FROM gateway.order_events
                                                WHERE order_id = $1 ORDER BY received_at, seq""", order_id)
        escrow = (await db.fetch("escrow", "SELECT * FROM escrow.escrows WHERE order_id = $1", order_id) or [None])[0]
        escrow_refunds = await db.fetch("escrow", "SELECT * FROM escrow.refunds WHERE order_id = $1 ORDER BY id", order_id)
        reservation = (await db.fetch("credit", "SELECT * FROM credit.reservations WHERE order_id = $1", order_id)
                       or [None])[0]
        purchase = (await db.fetch("billing", "SELECT * FROM billing.purchases WHERE order_id = $1", order_id) or [None])[0]
        published: list[dict] = []
        transfers: dict[str, list[dict]] = {}
        for s in SERVICES:
            published += await published_events(db, s, order_id, match="order_id")
            transfers[s] = await db.fetch(s, f"""SELECT id, debit_account, credit_account, amount, kind, pending_id, code,
                                                        created_at FROM {s}.ledger_transfers
                                                 WHERE order_id = $1 ORDER BY created_at, id""", order_id)
        replays = {r["event_id"]: r for r in await db.fetch(
            "gateway", "SELECT * FROM danbao_ops.dlq_replays WHERE event_id = ANY($1::text[])",
            [p["envelope"].get("event_id") for p in published if p["error"]])}
    now = await platform_now()
    timeline: list[dict[str, Any]] = []
    for e in received:
        data = e["data"] if isinstance(e["data"], dict) else json.loads(e["data"])
        timeline.append(_entry(e["received_at"], "gateway", "received", f"{e['type']} received ({e['state']})", data,
                               event_id=e["event_id"]))
    for p in published:
        env = p["envelope"]
        state = "" if p["published_at"] else " (not published yet)"
        if p["error"]:  # a record this service could not accept, dead-lettered (wall-clock time)
            replay = replays.get(env.get("event_id"))
            timeline.append(_entry(p["created_at"], p["service"], "dead-letter",
                                   f"{env.get('type')} -> {p['topic']}: {p['error'].get('error.code')} "
                                   f"{p['error'].get('error.message', '')[:120]}"
                                   + (f" (replayed {short_time(replay['replayed_at'])})" if replay else ""),
                                   env.get("data"), event_id=env.get("event_id"), replayed=bool(replay)))
            continue
        when = _when(env.get("occurred_at"), p["created_at"])
        timeline.append(_entry(when, p["service"], "published", f"{env.get('type')} -> {p['topic']}{state}",
                               env.get("data"), event_id=env.get("event_id")))
    for s, rows in transfers.items():
        for t in rows:
            verb = {"posted": "posted", "pending": "pending", "post_pending": "posts pending",
                    "void_pending": "voids pending"}[t["kind"]]
            timeline.append(_entry(t["created_at"], s, "ledger",
                                   f"{t['code']}: {fen(t['amount'])} {t['debit_account']} -> {t['credit_account']} ({verb})",
                                   {k: t[k] for k in ("id", "kind", "pending_id", "amount", "debit_account", "credit_account")}))
    timers = []
    if payment and payment["saga_state"] not in _SAGA_OVER:
        if payment.get("deadline_at"):
            timers.append(_entry(payment["deadline_at"], "gateway", "timer", f"saga {payment['saga_state']} deadline"))
        if payment.get("next_action_at") and payment.get("next_action_at") != payment.get("deadline_at"):
            timers.append(_entry(payment["next_action_at"], "gateway", "timer", "saga worker's next action"))
    if escrow and escrow["status"] == "HELD" and escrow.get("auto_confirm_at"):
        timers.append(_entry(escrow["auto_confirm_at"], "escrow", "timer", "auto-confirm: release to the seller"))
    if reservation and reservation["state"] == "reserved":
        timers.append(_entry(reservation["expires_at"], "credit", "timer", "credit reservation expires"))
    for t in timers:
        t["overdue"] = t["at"] < now
    timeline += timers
    timeline.sort(key=lambda e: (e["at"].astimezone(timezone.utc) if isinstance(e["at"], datetime)
                                 else datetime.min.replace(tzinfo=timezone.utc)))

    status = {
        "gateway": None if payment is None else {
            k: payment.get(k) for k in ("status", "saga_state", "reason_code", "message", "amount", "payment_method",
                                         "installments", "buyer_id", "seller_id", "refunded", "risk_decision",
                                         "risk_rules", "released_gross", "fee_amount", "net_amount", "deadline_at",
                                         "accepted_at", "updated_at")} | {"trace_id": trace_id_of(payment.get("traceparent"))},
        "escrow": None if escrow is None else {
            k: escrow.get(k) for k in ("status", "amount", "auto_confirm_at", "refunded_from_hold", "clawed_back",
                                        "pending_clawbacks", "fee_amount", "net_amount")},
        "escrow_refunds": escrow_refunds,
        "credit": None if reservation is None else {
            k: reservation.get(k) for k in ("state", "amount", "installments", "reason_code", "expires_at")},
        "billing": None if purchase is None else {
            k: purchase.get(k) for k in ("amount", "installments", "period", "refunded", "committed_at")},
    }
    story = {"order_id": order_id, "now": now, "found": bool(payment or received or escrow or reservation or published),
             "status": status, "timeline": timeline, "transfers": transfers}
    story["problems"] = order_problems(story, now)
    return story


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of the order's kept context (gateway.payments.traceparent, tracing on), to look
    the order up in the tracing backend; None without one."""
    parts = (traceparent or "").split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


def order_problems(story: dict[str, Any], now: datetime) -> list[str]:
    """What disagrees between services, or is late, for one order."""
    problems = []
    st = story["status"]
    gw, es, cr = st["gateway"], st["escrow"], st["credit"]
    transfers = story["transfers"]
    if gw is not None:
        agree = _ESCROW_AGREES.get(gw["status"], set())
        if (es["status"] if es else None) not in agree:
            problems.append(f"gateway says {gw['status']} but escrow says {es['status'] if es else 'no escrow'}")
        if gw["payment_method"] == "huabei" and gw["saga_state"] in _SAGA_OVER:
            want = {"committed"} if gw["saga_state"] == "COMPLETED" else {None, "cancelled", "expired", "refused"}
            have = cr["state"] if cr else None
            if have not in want:
                problems.append(f"gateway saga {gw['saga_state']} but the credit reservation is {have or 'missing'}")
        if gw["saga_state"] not in _SAGA_OVER and gw.get("deadline_at") and gw["deadline_at"] < now:
            problems.append(f"saga {gw['saga_state']} is past its deadline {short_time(gw['deadline_at'])}")
    if es is not None and es["status"] == "HELD" and es.get("auto_confirm_at") and es["auto_confirm_at"] < now - timedelta(minutes=1):
        problems.append(f"hold past its auto-confirm time {short_time(es['auto_confirm_at'])}")
    if cr is not None and cr["state"] == "reserved" and cr["expires_at"] < now - timedelta(minutes=1):
        problems.append(f"credit reservation past its expiry {short_time(cr['expires_at'])}")
    # Every pending transfer is posted or voided once the saga is over.
    gt = transfers.get("gateway", [])
    resolved = {t["pending_id"] for t in gt if t["pending_id"]}
    for t in gt:
        if t["kind"] == "pending" and t["id"] not in resolved and gw and gw["saga_state"] in _SAGA_OVER:
            problems.append(f"gateway pending transfer {t['id']} was never posted nor voided")
    # The two sides of each hand-over between ledgers.
    handed = _net(gt, "escrow", credit_side=True)
    received = _net(transfers.get("escrow", []), "gateway", credit_side=False)
    if handed != received:
        problems.append(f"the gateway ledger handed {fen(handed)} to escrow for this order, the escrow ledger has {fen(received)}")
    lent = _net(transfers.get("credit", []), "gateway", credit_side=True)
    taken = _net(gt, "lender", credit_side=False)
    if lent != taken:
        problems.append(f"the credit ledger lent {fen(lent)} for this order, the gateway ledger took {fen(taken)} from the lender")
    for e in story["timeline"]:
        if e["kind"] == "published" and "not published yet" in e["summary"] and e["at"] < now - timedelta(minutes=1):
            problems.append(f"{e['service']}: {e['summary'].split(' (')[0]} waits in the outbox")
        if e["kind"] == "dead-letter" and not e.get("replayed"):
            problems.append(f"dead-lettered, not replayed: {e['summary']}")
        if e["kind"] == "received" and e["summary"].endswith("(parked)"):
            problems.append(f"{e['summary'].split(' received')[0]} is parked: its OrderPlaced has not arrived")
    return problems


async def user_story(user_id: str) -> dict[str, Any]:
    wallet = wallet_account(user_id)
    async with Databases() as db:
        user = (await db.fetch("gateway", "SELECT * FROM gateway.users WHERE user_id = $1", user_id) or [None])[0]
        if user:  # the tables hold personal data only masked and hashed; the hashes are left out
            user = {k: v for k, v in user.items() if not k.endswith("_hash")}
        balance = (await db.fetch("gateway", "SELECT * FROM gateway.ledger_balances WHERE id = $1", wallet) or [None])[0]
        cached = (await db.fetch("gateway", "SELECT * FROM gateway.ledger_accounts WHERE id = $1", wallet) or [None])[0]
        wallet_moves = await db.fetch("gateway", """SELECT id, debit_account, credit_account, amount, kind, code, order_id,
                                                           created_at FROM gateway.ledger_transfers
                                                    WHERE debit_account = $1 OR credit_account = $1
                                                    ORDER BY created_at DESC, id DESC LIMIT 20""", wallet)
        payments = await db.fetch("gateway", """SELECT order_id, CASE WHEN buyer_id = $1 THEN 'buyer' ELSE 'seller' END AS role,
                                                       status, saga_state, amount, payment_method, installments,
                                                       reason_code, accepted_at, updated_at FROM gateway.payments
                                                WHERE buyer_id = $1 OR seller_id = $1
                                                ORDER BY accepted_at DESC LIMIT 20""", user_id)
        holds = await db.fetch("escrow", """SELECT order_id, CASE WHEN buyer_id = $1 THEN 'buyer' ELSE 'seller' END AS role,
                                                   amount, auto_confirm_at FROM escrow.escrows
                                            WHERE status = 'HELD' AND (buyer_id = $1 OR seller_id = $1)
                                            ORDER BY order_id""", user_id)
        huabei = (await db.fetch("credit", "SELECT * FROM credit.huabei_accounts WHERE user_id = $1", user_id) or [None])[0]
        if huabei:
            huabei = {k: v for k, v in huabei.items() if not k.endswith("_hash")}
        reservations = await db.fetch("credit", """SELECT order_id, amount, state, expires_at FROM credit.reservations
                                                   WHERE user_id = $1 AND state = 'reserved' ORDER BY expires_at""", user_id)
        repayments = await db.fetch("gateway", """SELECT repayment_id, amount, source, state, created_at FROM gateway.repayments
                                                  WHERE user_id = $1 ORDER BY created_at DESC LIMIT 20""", user_id)
    statements: Any = None
    async with operator_client() as http:
        try:
            r = await http.get(f"{url('billing')}/v1/huabei/{user_id}/statements")
            statements = r.json() if r.status_code == 200 else None
        except Exception as exc:  # noqa: BLE001 - shown, not raised: the rest of the story still helps
            statements = {"error": f"billing not reachable: {exc!r}"}
    available = None
    problems = []
    if balance:
        available = balance["credits_posted"] - balance["debits_posted"] - balance["debits_pending"]
        if cached and (cached["debits_posted"], cached["credits_posted"], cached["debits_pending"]) != (
                balance["debits_posted"], balance["credits_posted"], balance["debits_pending"]):
            problems.append("the wallet's running totals differ from its transfers")
        if available < 0:
            problems.append("the wallet is overdrawn")
    if huabei:
        if huabei["used"] < 0 or huabei["reserved"] < 0 or huabei["used"] + huabei["reserved"] > huabei["credit_limit"]:
            problems.append("the Huabei line is below zero or over its limit")
        if sum(r["amount"] for r in reservations) != huabei["reserved"]:
            problems.append(f"Huabei reserved is {fen(huabei['reserved'])} but the open reservations add up to "
                            f"{fen(sum(r['amount'] for r in reservations))}")
    return {"user_id": user_id, "found": user is not None, "user": user,
            "wallet": None if balance is None else {"account": wallet, "available": available,
                                                    "pending": balance["debits_pending"],
                                                    "recent_transfers": wallet_moves},
            "holds": holds, "payments": payments, "huabei": huabei, "reservations": reservations,
            "statements": statements, "repayments": repayments, "problems": problems}


# ---------------------------------------------------------------- text
def render_order(story: dict[str, Any]) -> str:
    lines = [f"Order {story['order_id']}  (platform time {short_time(story['now'])})"]
    if not story["found"]:
        return lines[0] + "\n  no service knows this order"
    lines.append("\nNow:")
    for service, state in story["status"].items():
        if service == "escrow_refunds":
            for r in state:
                lines.append(f"  {'escrow refund':<14}{r['kind']} {r['refund_id'] or '(cancel)'}: {fen(r['amount'])} {r['state']}"
                             + (f" {r['reason_code']}" if r.get("reason_code") else ""))
            continue
        if state is None:
            lines.append(f"  {service:<14}-")
            continue
        shown = ", ".join(f"{k}={short_time(v) if isinstance(v, datetime) else v}" for k, v in state.items() if v is not None)
        lines.append(f"  {service:<14}{shown}")
    lines.append("\nTimeline:")
    for e in story["timeline"]:
        mark = "  OVERDUE" if e.get("overdue") else ""
        lines.append(f"  {short_time(e['at'])}  {e['service']:<8} {e['kind']:<10} {e['summary']}{mark}")
    lines.append("")
    lines += [f"  PROBLEM: {p}" for p in story["problems"]] or ["  consistent across services"]
    return "\n".join(lines)


def render_user(story: dict[str, Any]) -> str:
    lines = [f"User {story['user_id']}"]
    if not story["found"]:
        return lines[0] + "\n  the gateway does not know this user"
    u = story["user"]
    lines.append("  " + ", ".join(f"{k}={short_time(v) if isinstance(v, datetime) else v}" for k, v in u.items()))
    w = story["wallet"]
    lines.append(f"\nWallet: available {fen(w['available'])}, in flight {fen(w['pending'])}" if w else "\nWallet: none yet")
    for t in (w or {}).get("recent_transfers", []):
        sign = "-" if t["debit_account"] == wallet_account(story["user_id"]) else "+"
        lines.append(f"  {short_time(t['created_at'])}  {sign}{fen(t['amount']):<16} {t['code']:<12} {t['kind']:<12} {t['order_id'] or ''}")
    lines.append(f"\nHeld in escrow ({len(story['holds'])}):")
    lines += [f"  {h['order_id']} as {h['role']}: {fen(h['amount'])}, auto-confirm {short_time(h['auto_confirm_at']) or '-'}"
              for h in story["holds"]]
    h = story["huabei"]
    lines.append("\nHuabei: " + (f"{h['status']}, limit {fen(h['credit_limit'])}, used {fen(h['used'])}, "
                                 f"reserved {fen(h['reserved'])}, score {h['score']}" if h else "not active"))
    for r in story["reservations"]:
        lines.append(f"  reservation {r['order_id']}: {fen(r['amount'])} until {short_time(r['expires_at'])}")
    st = story["statements"]
    if isinstance(st, list) and st:
        lines.append("\nStatements:")
        lines += [f"  {s['statement_id']} {s['period']} due {s['due_on']}: outstanding {fen(s['outstanding'])} ({s['status']})"
                  for s in st]
    elif isinstance(st, dict):
        lines.append(f"\nStatements: {st.get('error')}")
    lines.append(f"\nRecent payments ({len(story['payments'])}):")
    lines += [f"  {short_time(p['accepted_at'])}  {p['order_id']} as {p['role']}: {fen(p['amount'])} {p['payment_method']} "
              f"{p['status']}" + (f" {p['reason_code']}" if p["reason_code"] else "") for p in story["payments"]]
    if story["repayments"]:
        lines.append("\nRepayments:")
        lines += [f"  {short_time(r['created_at'])}  {r['repayment_id']}: {fen(r['amount'])} from {r['source']} {r['state']}"
                  for r in story["repayments"]]
    lines.append("")
    lines += [f"  PROBLEM: {p}" for p in story["problems"]] or ["  consistent"]
    return "\n".join(lines)
