"""The ops tools against the running platform: an order's story, a user's, dead-letter replay,
and the doctor finding a saga stuck behind a dead gateway until it recovers."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

from deploy.ops import dlq, doctor, story
from deploy.ops.common import dumps
from tests.integration.conftest import ROOT, envelope, eventually, new_id, types


def ops_cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.ops", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


async def test_order_story_shows_every_service_and_no_problem(shop, ops_env):
    seller, buyer = await shop.user("s"), await shop.user("b", balance=50_000)
    order = await shop.place(buyer, seller, 10_000)
    assert types(await shop.events(order, 1, settle=0)) == ["PaymentSucceeded"]
    await shop.send("OrderConfirmed", {"order_id": order})
    assert types(await shop.events(order, 2, settle=0)) == ["PaymentSucceeded", "FundsReleased"]

    async def settled():
        s = await story.order_story(order)
        return s if s["status"]["escrow"]["status"] == "RELEASED" and not s["problems"] else None
    s = await eventually(settled, timeout=15)
    assert s["status"]["gateway"]["status"] == "RELEASED"
    summaries = [(e["service"], e["kind"], e["summary"]) for e in s["timeline"]]
    assert ("gateway", "received", "OrderPlaced received (applied)") in summaries
    assert ("gateway", "received", "OrderConfirmed received (forwarded)") in summaries
    published = [x[2].split(" ->")[0] for x in summaries if x[1] == "published"]
    for t in ("RiskCheckRequested", "HoldFunds", "FundsHeld", "PaymentSucceeded", "ConfirmOrder", "EscrowReleased",
              "FundsReleased"):
        assert t in published, (t, published)
    ledgers = {x[0] for x in summaries if x[1] == "ledger"}
    assert {"gateway", "escrow"} <= ledgers
    # Placed before it was published, published before it was released: the timeline is in time order.
    assert published.index("PaymentSucceeded") < published.index("FundsReleased")

    done = ops_cli(ops_env, "order", order, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"]["escrow"]["status"] == "RELEASED"
    text = ops_cli(ops_env, "order", order)
    assert "consistent across services" in text.stdout and "FundsReleased -> payments.events" in text.stdout
    assert ops_cli(ops_env, "order", "o-never-seen").returncode == 1


async def test_order_story_marks_a_disagreement(shop, ops_env, db):
    seller, buyer = await shop.user("s"), await shop.user("b", balance=20_000)
    order = await shop.place(buyer, seller, 5_000)
    assert types(await shop.events(order, 1, settle=0)) == ["PaymentSucceeded"]
    await eventually(lambda: db.fetchval("SELECT status = 'HELD' FROM escrow.escrows WHERE order_id = $1", order))
    # Someone edits escrow's row by hand: the story must say the services disagree.
    await db.execute("UPDATE escrow.escrows SET status = 'CANCELLED' WHERE order_id = $1", order)
    try:
        s = await story.order_story(order)
        assert any("gateway says HELD but escrow says CANCELLED" in p for p in s["problems"]), s["problems"]
    finally:
        await db.execute("UPDATE escrow.escrows SET status = 'HELD' WHERE order_id = $1", order)


async def test_user_story_shows_wallet_holds_and_payments(shop, ops_env):
    seller, buyer = await shop.user("s"), await shop.user("b", balance=30_000)
    order = await shop.place(buyer, seller, 12_345)
    assert types(await shop.events(order, 1, settle=0)) == ["PaymentSucceeded"]
    s = await story.user_story(buyer)
    assert s["found"] and s["problems"] == []
    assert s["wallet"]["available"] == 30_000 - 12_345
    assert [p["order_id"] for p in s["payments"]] == [order]
    assert [h["order_id"] for h in s["holds"]] == [order]
    # Personal data only masked (the user id is random digits, so leave it out of the check).
    shown = {k: v for k, v in s["user"].items() if k != "user_id"}
    assert not re.search(r"\d{11}", dumps(shown)), shown
    text = ops_cli(ops_env, "user", seller)
    assert text.returncode == 0 and order in text.stdout and "as seller" in text.stdout


async def test_dead_letter_is_listed_and_a_fixed_copy_replayed_once(shop, ops_env):
    seller, buyer = await shop.user("s"), await shop.user("b", balance=20_000)
    order = new_id("o")
    bad = envelope("OrderPlaced", {"order_id": order, "buyer_id": buyer, "seller_id": seller, "amount": "lots",
                                   "currency": "CNY", "payment_method": "balance"})
    await shop.kafka.send("orders.events", bad, key=order)

    async def dead_lettered():
        return [d for d in await dlq.read(["orders.events.dlq"]) if d.key == order.encode()]
    [letter] = await eventually(dead_lettered)
    assert letter.header("error.code") == "INVALID_DATA"

    listed = ops_cli(ops_env, "dlq", "list", "--topic", "orders.events.dlq", "--json")
    assert listed.returncode == 0, listed.stderr
    row = next(r for r in json.loads(listed.stdout) if r["position"] == letter.position)
    assert row["code"] == "INVALID_DATA" and row["original_topic"] == "orders.events" and not row["replayed"]
    shown = json.loads(ops_cli(ops_env, "dlq", "show", letter.position).stdout)
    assert shown["value"]["data"]["amount"] == "lots"

    # Replaying it unchanged is refused by the same validation the consumer runs, and not recorded.
    same = ops_cli(ops_env, "dlq", "replay", letter.position)
    assert same.returncode == 1 and same.stderr.startswith("INVALID_DATA"), same.stderr
    # The fixed copy goes through and is paid; replaying the dead letter again has no effect.
    fixed = ops_cli(ops_env, "dlq", "replay", letter.position, "--set", "data.amount=7000", "--operator", "alice")
    assert fixed.returncode == 0, fixed.stderr
    assert types(await shop.events(order, 1, settle=0)) == ["PaymentSucceeded"]
    again = ops_cli(ops_env, "dlq", "replay", letter.position, "--set", "data.amount=7000")
    assert again.returncode == 2 and "ALREADY_REPLAYED" in again.stderr and "alice" in again.stderr
    assert (await shop.payment(order))["amount"] == 7000
    assert types(await shop.events(order, 1, settle=2)) == ["PaymentSucceeded"]
    history = [h for h in await dlq.history() if h["dead_letter"] == letter.position]
    assert len(history) == 1 and history[0]["edited"] and history[0]["published"]


async def test_doctor_finds_a_saga_stuck_behind_a_dead_gateway_until_it_recovers(shop, services, ops_env, db):
    seller, buyer = await shop.user("s"), await shop.user("b", balance=20_000)
    risk = services["risk"]
    risk.proc.send_signal(signal.SIGSTOP)  # the risk engine hangs: the saga waits in RISK_CHECK
    try:
        order = await shop.place(buyer, seller, 3_000)
        await eventually(lambda: db.fetchval("SELECT saga_state = 'RISK_CHECK' FROM gateway.payments WHERE order_id = $1",
                                             order))
        services["gateway"].kill()
    finally:
        risk.proc.send_signal(signal.SIGCONT)
    try:
        # The saga's deadline passes with no gateway to act on it.
        assert (await shop.api("escrow").post("/admin/clock", json={"advance_seconds": 120})).status_code == 200
        report = await doctor.diagnose(grace_seconds=0, audit_wait=0)
        checks = {c.name: c for c in report.checks}
        assert not report.ok
        assert checks["services"].status == "fail" and "gateway" in checks["services"].summary
        assert order in [r["order_id"] for r in checks["sagas past their deadline"].rows]
        cli = ops_cli(ops_env, "doctor", "--grace", "0", "--audit-wait", "0")
        assert cli.returncode == 1 and "needs a human: YES" in cli.stdout, cli.stdout
    finally:
        await services["gateway"].restart()
    assert len(await shop.events(order, 1, settle=0)) == 1

    async def recovered():
        report = await doctor.diagnose(grace_seconds=0, audit_wait=0)
        checks = {c.name: c for c in report.checks}
        stuck = order in [r["order_id"] for r in checks["sagas past their deadline"].rows]
        return checks["services"].status == "ok" and not stuck
    await eventually(recovered, timeout=30, interval=1)
