"""The fault suite (`./danbao chaos`): a mixed load against the running platform while its parts
are killed, hung, restarted in a loop and doubled, one fault after another; then the checks.

The load (in the background for the whole run, `--rate` orders/s): wallet, card and Huabei
orders published to orders.events, each answered, once its payment has succeeded, by one
follow-up from the shop: OrderConfirmed (-> FundsReleased), OrderCancelled (-> RefundCompleted
of everything held) or a partial RefundRequested (-> RefundCompleted); and Huabei repayments by
card over the gateway's HTTP API. Buyers, sellers and their money are set up over HTTP first
(deploy/demo.py's register_user and top_up). A record that cannot be published (Kafka away) is
sent again, unchanged, until it is: the platform absorbs the same event_id twice.

The faults (`--faults a,b,...`; the default is all of them but the restart loops of services
other than the gateway; `--short` a few, shorter):

  kill-<part>     SIGKILL of the gateway, escrow, credit, billing, the risk engine, Kafka or
                  Postgres (its postmaster, from the data folder), `--down` seconds, then
                  `./danbao up` starts what is down again
  stop-<part>     SIGSTOP of Kafka or of every Postgres process for `--hang` seconds, then SIGCONT
  loop-<service>  the service is killed `--loops` times, each time started again with
                  `./danbao up` and left running `--loop-interval` seconds
  twins           a second process of each service and of the risk engine (ports 8101-8105) for
                  `--twins-seconds`, then stopped (SIGTERM)

For each fault: the pause, the longest gap between two outcomes on payments.events from the
fault's start until the first outcome after its end, and the recovery, the time from the fault's
end (the restart, the SIGCONT, the twins stopped) to that first outcome. After each fault the
suite waits for that first outcome and `--settle` seconds more.

Then it checks, and exits 1 on any violation:
  * every request has exactly one outcome: each order one PaymentSucceeded or PaymentFailed,
    each confirmation one FundsReleased, each cancel and each refund one RefundCompleted or
    RefundRejected (two different event ids for one of them is a double outcome; the same event
    id seen twice is an at-least-once redelivery and only counted);
  * no double charge: every wallet of the run holds what its outcomes say (top-up, minus wallet
    payments, plus their refunds; sellers the net amounts released; repayment overpayments),
    and `deploy.audit` (each ledger's accounts equal their transfers, conservation across the
    services) is OK (if it already failed before the first fault, a platform with a history:
    its discrepancies are unchanged);
  * every credit line of the run is within its limit, nothing stays reserved, and the line used
    equals the Huabei payments minus their refunds and the principal repaid;
  * every fault was injected and the platform came back after it.

    ./danbao chaos                              every fault, full durations (about 11 minutes)
    ./danbao chaos --short                      five faults, short durations (about 3 minutes)
    ./danbao chaos --faults kill-kafka,stop-postgres --hang 20
    ./danbao chaos --json out.json              the results as JSON as well
"""
from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from deploy import bench
from deploy.audit import Report, audit, audit_settled
from deploy.demo import KAFKA, URLS, envelope, register_user, top_up

ROOT = Path(__file__).resolve().parents[1]
RUN_DIR = ROOT / ".data" / "run"
LOG_DIR = ROOT / ".data" / "logs"
SERVICES = ("gateway", "escrow", "credit", "billing", "risk")
PARTS = (*SERVICES, "kafka", "postgres")
TWIN_PORTS = {"gateway": 8101, "escrow": 8102, "credit": 8103, "billing": 8104, "risk": 8105}
ORDERS_TOPIC, PAYMENTS_TOPIC = "orders.events", "payments.events"

ALL_FAULTS = ([f"kill-{p}" for p in PARTS] + ["stop-kafka", "stop-postgres"]
              + [f"loop-{s}" for s in SERVICES] + ["twins"])
DEFAULT_FAULTS = [f"kill-{p}" for p in PARTS] + ["stop-kafka", "stop-postgres", "loop-gateway", "twins"]
SHORT_FAULTS = ["kill-escrow", "kill-postgres", "stop-kafka", "loop-gateway", "twins"]


@dataclass(frozen=True)
class Timing:
    rate: float            # orders per second
    warmup: float          # load before the first fault
    down: float            # a killed part stays down this long
    hang: float            # SIGSTOP this long
    loops: int             # kills in a restart loop
    loop_interval: float   # a restarted service runs this long before the next kill
    twins_seconds: float   # the second instances run this long
    settle: float          # after a fault's recovery, before the next fault
    drain: float           # at the end, wait this long at most for the last outcomes


FULL = Timing(rate=10, warmup=10, down=7, hang=30, loops=5, loop_interval=3, twins_seconds=30, settle=10, drain=150)
SHORT = Timing(rate=8, warmup=5, down=3, hang=10, loops=3, loop_interval=3, twins_seconds=10, settle=4, drain=90)


def parse_faults(spec: str) -> list[str]:
    """A comma-separated list of fault names, checked against ALL_FAULTS, in the order given."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL_FAULTS]
    if unknown or not names:
        raise ValueError(f"unknown fault(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(ALL_FAULTS)}")
    return names


# ---------------------------------------------------------------- outcomes (pure)
def outcome_key(event: dict) -> tuple[str, str] | None:
    """Which request a payments.events record answers: (order_id, "payment" | "release" |
    "cancel" | "refund:<refund_id>"); None for anything else."""
    data = event.get("data") or {}
    order, type_ = data.get("order_id"), event.get("type")
    if not isinstance(order, str):
        return None
    if type_ in ("PaymentSucceeded", "PaymentFailed"):
        return order, "payment"
    if type_ == "FundsReleased":
        return order, "release"
    if type_ in ("RefundCompleted", "RefundRejected"):
        return order, f"refund:{data['refund_id']}" if data.get("refund_id") else "cancel"
    return None


@dataclass
class OutcomeCheck:
    missing: list[tuple[str, str]]      # expected, never seen
    doubled: list[tuple[str, str]]      # two or more different event ids
    unexpected: list[tuple[str, str]]   # seen for a request this run never made

    @property
    def ok(self) -> bool:
        return not (self.missing or self.doubled or self.unexpected)


def check_outcomes(expected: set[tuple[str, str]], seen: dict[tuple[str, str], dict[str, dict]]) -> OutcomeCheck:
    """`seen` maps a request to its outcomes by event id."""
    return OutcomeCheck(missing=sorted(k for k in expected if not seen.get(k)),
                        doubled=sorted(k for k, events in seen.items() if len(events) > 1),
                        unexpected=sorted(k for k in seen if k not in expected))


def pause_and_recovery(arrivals: list[float], start: float, end: float) -> tuple[float | None, float | None]:
    """From ascending outcome arrival times: the longest gap between consecutive outcomes from
    the last one before `start` (or `start`) to the first one after `end`, and the time from
    `end` to that first outcome. (None, None) when no outcome came after `end`."""
    after = bisect.bisect_right(arrivals, end)
    if after == len(arrivals):
        return None, None
    first = bisect.bisect_left(arrivals, start)
    points = [arrivals[first - 1] if first > 0 else start] + arrivals[first:after + 1]
    return max(b - a for a, b in zip(points, points[1:])), arrivals[after] - end


def first_outcomes(seen: dict[tuple[str, str], dict[str, dict]]) -> list[dict]:
    """The first outcome of each request (a doubled one is reported, not counted twice)."""
    return [next(iter(events.values())) for events in seen.values() if events]


def expected_wallets(top_ups: dict[str, int], buyer_of: dict[str, str], outcomes: list[dict],
                     overpayments: dict[str, int]) -> dict[str, int]:
    """What each wallet of the run must hold: its top-up, minus wallet payments, plus refunds of
    wallet payments, plus the net amounts released to it as a seller, plus repayment overpayments."""
    wallets = Counter(top_ups)
    for event in outcomes:
        data = event["data"]
        if event["type"] == "PaymentSucceeded" and data["payment_method"] == "balance":
            wallets[data["buyer_id"]] -= data["amount"]
        elif event["type"] == "RefundCompleted" and data["payment_method"] == "balance":
            wallets[buyer_of[data["order_id"]]] += data["amount"]
        elif event["type"] == "FundsReleased":
            wallets[data["seller_id"]] += data["net_amount"]
    wallets.update(overpayments)
    return dict(wallets)


def expected_credit_used(buyer_of: dict[str, str], outcomes: list[dict], principal_repaid: dict[str, int]) -> dict[str, int]:
    """The Huabei line each buyer uses: Huabei payments minus their refunds minus repaid principal."""
    used: Counter = Counter()
    for event in outcomes:
        data = event["data"]
        if event["type"] == "PaymentSucceeded" and data["payment_method"] == "huabei":
            used[data["buyer_id"]] += data["amount"]
        elif event["type"] == "RefundCompleted" and data["payment_method"] == "huabei":
            used[buyer_of[data["order_id"]]] -= data["amount"]
    used.subtract(principal_repaid)
    return dict(used)


def credit_line_problems(user: str, account: dict, expected_used: int) -> list[str]:
    used, reserved, limit = account["used"], account["reserved"], account["credit_limit"]
    problems = []
    if used < 0 or reserved < 0 or used + reserved > limit:
        problems.append(f"{user}: credit line out of bounds (used {used} + reserved {reserved}, limit {limit})")
    if reserved:
        problems.append(f"{user}: {reserved} fen of credit still reserved after every payment ended")
    if used != expected_used:
        problems.append(f"{user}: credit used {used} fen, the outcomes say {expected_used} fen")
    return problems


def audit_gaps(figures: dict[str, int]) -> dict[str, int]:
    """The differences deploy.audit reports when it fails (all zero when it passes), from its figures."""
    f = figures
    net_in = (f["bank channel: money in"] - f["bank channel: money out"] + f["huabei owed by buyers"]
              + f["huabei fees and penalties owed"])
    accounted = sum(f[k] for k in ("wallet balances", "escrow holds", "repayments not yet allocated",
                                   "merchant fee revenue", "withdrawal fee revenue", "installment fee revenue",
                                   "penalty revenue"))
    return {"gateway to escrow": f["handed to escrow (gateway ledger)"] - f["received from gateway (escrow ledger)"],
            "credit to gateway": f["lent through the gateway (credit ledger)"] - f["taken from the lender (gateway ledger)"],
            "gateway to billing": f["fees paid to billing (gateway ledger)"] - f["fees received (billing ledger)"],
            "conservation": net_in - accounted}


def audit_problems(before: Report | None, after: Report) -> list[str]:
    """The audit's problems after the run. When it already failed before the first fault (a
    platform with history), only what the run changed: a new ledger problem, or a discrepancy
    that is not the same as before."""
    if after.ok or before is None or before.ok:
        return after.problems
    ledger_problems = [p for p in after.problems if " ledger: " in p and p not in before.problems]
    was, now = audit_gaps(before.figures), audit_gaps(after.figures)
    return ledger_problems + [f"{name}: the discrepancy was {was[name]} fen before the first fault, {now[name]} fen now"
                              for name in now if now[name] != was[name]]


@dataclass
class FaultResult:
    name: str
    start: float              # seconds since the load started
    end: float
    detail: str
    error: str | None = None  # the fault could not be injected or the part not restarted
    pause: float | None = None
    recovery: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.recovery is not None


def render_table(results: list[FaultResult]) -> str:
    rows = [("fault", "lasted", "pause", "recovery", "what happened")]
    for r in results:
        rows.append((r.name, f"{r.end - r.start:.1f} s", "—" if r.pause is None else f"{r.pause:.1f} s",
                     "never" if r.recovery is None else f"{r.recovery:.1f} s",
                     r.detail + (f"; ERROR: {r.error}" if r.error else "")))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                     + "  " + row[4])
        if n == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * len(row[4]))
    return "\n".join(lines)


# ---------------------------------------------------------------- the platform's processes
PLATFORMS: list["Platform"] = []  # whatever happens, nothing is left stopped and no twin is left running


class Platform:
    """Kills, hangs and restarts the parts started by `./danbao up`, through their pid files and
    the danbao script; second instances of the services as child processes of this one."""

    def __init__(self, log_path: Path, services_dsn: str):
        self.log_path = log_path
        self.services_dsn = services_dsn
        self.stopped: list[int] = []             # pids under SIGSTOP, continued in cleanup
        self.twins: dict[str, subprocess.Popen] = {}
        self.env = {k: v for k, v in os.environ.items() if k != "CHAOS_SERVICES_DATABASE_URL"}
        PLATFORMS.append(self)

    def log(self, line: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} [chaos] {line}\n")

    def pid(self, part: str) -> int:
        if part == "postgres":
            data = (RUN_DIR / "pgdata.path").read_text().strip()
            return int((Path(data) / "postmaster.pid").read_text().split()[0])
        return int((RUN_DIR / f"{part}.pid").read_text().strip())

    def postgres_pids(self) -> list[int]:
        """The postmaster, then its children (backends, checkpointer, walwriter ...)."""
        master = self.pid("postgres")
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(master)], capture_output=True, text=True).stdout
        return [master] + [int(p) for p in children.split()]

    async def kill(self, part: str) -> int:
        """SIGKILL, then until the process is gone (or a zombie waiting for init to reap it)."""
        pid = self.pid(part)
        os.kill(pid, signal.SIGKILL)
        self.log(f"SIGKILL {part} (pid {pid})")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            except (OSError, IndexError):
                break
            await asyncio.sleep(0.05)
        return pid

    def stop(self, part: str) -> list[int]:
        pids = self.postgres_pids() if part == "postgres" else [self.pid(part)]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
            self.stopped.append(pid)
        self.log(f"SIGSTOP {part} (pids {pids})")
        return pids

    def cont(self) -> None:
        for pid in reversed(self.stopped):
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.log(f"SIGCONT pids {self.stopped}")
        self.stopped.clear()

    async def up(self, attempts: int = 3) -> float:
        """`./danbao up`: starts whatever is down and waits until all is healthy. Returns the
        seconds it took; raises when it failed every time (Postgres may refuse to start while
        the backends of a killed postmaster are still exiting)."""
        started = time.monotonic()
        for attempt in range(1, attempts + 1):
            with open(self.log_path, "ab") as out:
                proc = await asyncio.create_subprocess_exec(str(ROOT / "danbao"), "up", cwd=ROOT, env=self.env,
                                                            stdin=subprocess.DEVNULL, stdout=out, stderr=out)
                rc = await proc.wait()
            self.log(f"./danbao up: exit {rc} (attempt {attempt})")
            if rc == 0:
                return time.monotonic() - started
            await asyncio.sleep(2)
        raise RuntimeError(f"./danbao up failed {attempts} times (see {self.log_path})")

    async def start_twins(self, timeout: float = 120) -> None:
        for s in SERVICES:
            env = {**self.env, "DATABASE_URL": self.services_dsn, "PYTHONUNBUFFERED": "1"}
            if s == "risk":
                env |= {"RISK_WEB_PORT": str(TWIN_PORTS[s]), "RISK_DATA_DIR": "/tmp/danbao-risk-twin"}
            else:
                env[f"{s.upper()}_URL"] = f"http://127.0.0.1:{TWIN_PORTS[s]}"
            with open(LOG_DIR / f"{s}-twin.log", "ab") as out:
                self.twins[s] = subprocess.Popen([sys.executable, "-m", f"services.{s}"], cwd=ROOT, env=env,
                                                 stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.log(f"twins started: { {s: p.pid for s, p in self.twins.items()} }")
        deadline = time.monotonic() + timeout
        waiting = set(self.twins)
        async with httpx.AsyncClient(timeout=2) as client:
            while waiting:
                for s in list(waiting):
                    if self.twins[s].poll() is not None:
                        raise RuntimeError(f"the second {s} exited with {self.twins[s].returncode} "
                                           f"(see .data/logs/{s}-twin.log)")
                    try:
                        if (await client.get(f"http://127.0.0.1:{TWIN_PORTS[s]}/health")).status_code == 200:
                            waiting.discard(s)
                    except httpx.HTTPError:
                        pass
                if waiting and time.monotonic() > deadline:
                    raise RuntimeError(f"second instances not healthy within {timeout:.0f} s: {sorted(waiting)}")
                await asyncio.sleep(0.5)

    def kill_twins(self) -> None:
        for p in self.twins.values():
            if p.poll() is None:
                p.kill()
        self.twins.clear()

    async def stop_twins(self) -> None:
        for p in self.twins.values():
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 20
        while any(p.poll() is None for p in self.twins.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        for p in self.twins.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        self.log("twins stopped")
        self.twins.clear()


# ---------------------------------------------------------------- the load
@dataclass
class Order:
    buyer: str
    seller: str
    method: str
    amount: int
    follow_up: str   # confirm | cancel | refund | repay (confirm, then maybe a repayment)


FOLLOW_UP_OUTCOME = {"confirm": "release", "repay": "release", "cancel": "cancel", "refund": "refund:r1"}


class Outcomes(bench.Outcomes):
    """payments.events from its end as it stood at the start (deploy/bench.py's reader), every
    record handed to `on_event` with its arrival time."""

    def __init__(self, on_event):
        super().__init__(set())
        self.on_event = on_event

    async def _collect(self) -> None:
        while True:
            try:
                batches = await self.consumer.getmany(timeout_ms=100)
            except KafkaError:  # the broker is away: the consumer keeps its positions
                await asyncio.sleep(0.5)
                continue
            arrived = time.monotonic()
            for records in batches.values():
                for r in records:
                    try:
                        event = json.loads(r.value)
                    except ValueError:
                        continue
                    self.on_event(event, arrived)


class Chaos:
    def __init__(self, token: str, timing: Timing, seed: int, platform: Platform):
        self.timing, self.platform = timing, platform
        self.rng = random.Random(seed)
        self.run = uuid.uuid4().hex[:6]
        headers = {"Authorization": f"Bearer {token}"}
        self.http = {n: httpx.AsyncClient(base_url=u, headers=headers, timeout=15) for n, u in URLS.items()}
        self.producer = AIOKafkaProducer(bootstrap_servers=KAFKA, acks="all", enable_idempotence=True,
                                         linger_ms=5, request_timeout_ms=10_000)
        self.outcomes = Outcomes(self.on_event)
        self.pools: dict[str, list[str]] = {}
        self.sellers: list[str] = []
        self.top_ups: dict[str, int] = {}
        self.orders: dict[str, Order] = {}
        self.expected: set[tuple[str, str]] = set()
        self.seen: dict[tuple[str, str], dict[str, dict]] = {}
        self.arrivals: list[float] = []
        self.redelivered = 0
        self.repayments: dict[str, dict] = {}    # idempotency key -> {buyer, body, answer}
        self.tasks: set[asyncio.Task] = set()
        self.placing = True
        self.t0 = time.monotonic()

    # ---- setup
    async def setup(self) -> None:
        await self.producer.start()
        await self.outcomes.start(await self.producer.partitions_for(PAYMENTS_TOPIC))
        gateway = self.http["gateway"]
        # Each buyer places at most ~10 orders a minute (the risk engine rejects the 21st within 60 s).
        per_pool = max(8, round(self.timing.rate * 60 * 3 / 8 / 10))
        self.pools = {p: [f"chaos-{self.run}-{p}{i}" for i in range(per_pool)]
                      for p in ("balance", "card", "huabei", "repay")}
        self.sellers = [f"chaos-{self.run}-seller{i}" for i in range(4)]
        users = [u for pool in self.pools.values() for u in pool] + self.sellers
        sem = asyncio.Semaphore(10)

        async def one(user: str) -> None:
            async with sem:
                await register_user(gateway, user)
                if user in self.pools["balance"]:
                    await top_up(gateway, user, 2_000_000, "tok_chaos_visa")
                    self.top_ups[user] = 2_000_000
        await asyncio.gather(*(one(u) for u in users))
        for user in self.pools["huabei"] + self.pools["repay"]:
            response = await self.http["credit"].post(f"/v1/huabei/{user}/activation")
            response.raise_for_status()
        print(f"== run {self.run}: {len(users) - 4} buyers ({per_pool} each paying by wallet, card, Huabei, and "
              f"Huabei with repayments) and 4 sellers registered; wallets topped up, Huabei activated", flush=True)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.outcomes.stop()
        await self.producer.stop()
        for client in self.http.values():
            await client.aclose()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # ---- publishing
    async def publish(self, type_: str, data: dict) -> None:
        """Until Kafka has it: the same bytes each time (same event_id), so a send that failed
        only in appearance is absorbed by the platform's inbox."""
        value, key = envelope(type_, data), data["order_id"].encode()
        while True:
            try:
                await asyncio.wait_for(self.producer.send_and_wait(ORDERS_TOPIC, value, key=key), 15)
                return
            except (KafkaError, asyncio.TimeoutError):
                await asyncio.sleep(1)

    async def load(self) -> None:
        kinds = ["balance", "card", "huabei", "balance", "repay", "card", "balance", "huabei"]
        started, i = time.monotonic(), 0
        while self.placing:
            due = started + i / self.timing.rate
            if due > time.monotonic():
                await asyncio.sleep(due - time.monotonic())
            kind = kinds[i % len(kinds)]
            pool = self.pools[kind]
            buyer = pool[(i // len(kinds)) % len(pool)]
            order_id = f"chaos-{self.run}-o{i:05d}"
            data = {"order_id": order_id, "buyer_id": buyer, "seller_id": self.sellers[i % len(self.sellers)],
                    "currency": "CNY"}
            if kind == "balance":
                data |= {"amount": self.rng.randrange(100, 3_000), "payment_method": "balance"}
            elif kind == "card":
                data |= {"amount": self.rng.randrange(100, 3_000), "payment_method": "bank_card",
                         "card_token": "tok_chaos_visa"}
            else:
                data |= {"amount": self.rng.randrange(100, 1_000), "payment_method": "huabei"}
                if kind == "huabei":
                    data["installments"] = self.rng.choice([1, 3, 6])
            follow_up = "repay" if kind == "repay" else self.rng.choice(["confirm", "confirm", "cancel", "refund"])
            self.orders[order_id] = Order(buyer, data["seller_id"], data["payment_method"], data["amount"], follow_up)
            self.expected.add((order_id, "payment"))
            self.spawn(self.publish("OrderPlaced", data))
            i += 1

    # ---- outcomes and the shop's answers to them
    def on_event(self, event: dict, arrived: float) -> None:
        key = outcome_key(event)
        if key is None or key[0] not in self.orders:
            return
        events = self.seen.setdefault(key, {})
        if event.get("event_id") in events:
            self.redelivered += 1
            return
        events[event.get("event_id")] = event
        bisect.insort(self.arrivals, arrived - self.t0)
        if key[1] == "payment" and len(events) == 1 and event["type"] == "PaymentSucceeded":
            order = self.orders[key[0]]
            self.expected.add((key[0], FOLLOW_UP_OUTCOME[order.follow_up]))
            self.spawn(self.follow_up(key[0], order))

    async def follow_up(self, order_id: str, order: Order) -> None:
        await asyncio.sleep(self.rng.uniform(0.1, 2))
        if order.follow_up in ("confirm", "repay"):
            await self.publish("OrderConfirmed", {"order_id": order_id})
            if order.follow_up == "repay" and self.rng.random() < 0.5:
                await self.repay(order.buyer, max(1, order.amount // 2))
        elif order.follow_up == "cancel":
            await self.publish("OrderCancelled", {"order_id": order_id, "reason": "chaos: out of stock"})
        else:
            await self.publish("RefundRequested", {"order_id": order_id, "refund_id": "r1",
                                                   "amount": max(1, order.amount // 3), "reason": "chaos: one item"})

    async def repay(self, buyer: str, amount: int) -> None:
        """A Huabei repayment by card, asked again with the same idempotency key until the
        gateway answers (it may be down) and billing has allocated it (an answer "pending"
        means billing has not yet: asking again gives the allocation once it is known)."""
        body = {"amount": amount, "source": "bank_card", "card_token": "tok_chaos_repay",
                "idempotency_key": uuid.uuid4().hex}
        record = self.repayments[body["idempotency_key"]] = {"buyer": buyer, "body": body, "answer": None}
        while True:
            try:
                response = await self.http["gateway"].post(f"/v1/huabei/{buyer}/repayments", json=body)
            except httpx.HTTPError:
                response = None
            if response is not None and response.status_code == 201:
                record["answer"] = response.json()
                if record["answer"].get("status") == "allocated":
                    return
            elif response is not None and response.status_code < 500:
                record["answer"] = {"status": "refused", "http": response.status_code, "body": response.text[:200]}
                return
            await asyncio.sleep(1)

    # ---- faults
    async def wait_recovered(self, end: float, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not (self.arrivals and self.arrivals[-1] > end) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)

    async def inject(self, name: str) -> FaultResult:
        t, p = self.timing, self.platform
        action, _, part = name.partition("-")
        start = self.now()
        detail, error = "", None
        try:
            if action == "kill":
                pid = await p.kill(part)
                await asyncio.sleep(t.down)
                end = self.now()
                took = await p.up()
                detail = f"SIGKILL pid {pid}, {t.down:g} s down, ./danbao up {took:.1f} s"
            elif action == "stop":
                pids = p.stop(part)
                try:
                    await asyncio.sleep(t.hang)
                finally:
                    p.cont()
                end = self.now()
                detail = f"SIGSTOP {len(pids)} process{'es' if len(pids) > 1 else ''} for {t.hang:g} s, then SIGCONT"
            elif action == "loop":
                ups = []
                for _ in range(t.loops):
                    await p.kill(part)
                    ups.append(await p.up())
                    await asyncio.sleep(t.loop_interval)
                end = self.now() - t.loop_interval
                detail = (f"{t.loops} x (SIGKILL, ./danbao up {min(ups):.1f}-{max(ups):.1f} s, "
                          f"{t.loop_interval:g} s running)")
            else:  # twins
                await p.start_twins()
                up_at = self.now()
                await asyncio.sleep(t.twins_seconds)
                await p.stop_twins()
                end = self.now()
                detail = (f"second instances on :8101-8105 healthy after {up_at - start:.1f} s, "
                          f"ran {t.twins_seconds:g} s, SIGTERM")
        except Exception as exc:  # noqa: BLE001 - reported, and the run fails
            end, error = self.now(), f"{type(exc).__name__}: {exc}"
            p.cont()
            await p.stop_twins()
            try:
                await p.up()
            except RuntimeError as again:
                error += f"; {again}"
        await self.wait_recovered(end)
        result = FaultResult(name, start, end, detail, error)
        print(f"   {name}: {detail or error} (lasted {end - start:.1f} s)", flush=True)
        await asyncio.sleep(t.settle)
        return result

    # ---- the end
    async def drain(self) -> bool:
        """After the load stops: until every request has its outcome and every publish, follow-up
        and repayment is done, or `drain` seconds."""
        deadline = time.monotonic() + self.timing.drain
        while time.monotonic() < deadline:
            if all(task.done() for task in self.tasks) and all(self.seen.get(k) for k in self.expected):
                return True
            await asyncio.sleep(0.5)
        return False

    async def check_money(self) -> list[str]:
        firsts = first_outcomes(self.seen)
        buyer_of = {o: order.buyer for o, order in self.orders.items()}
        overpayments: Counter = Counter()
        principal: Counter = Counter()
        problems = []
        for r in self.repayments.values():
            answer = r["answer"] or {}
            if answer.get("status") != "allocated":
                problems.append(f"repayment {r['body']['idempotency_key']} of {r['buyer']}: no allocation ({answer})")
                continue
            overpayments[r["buyer"]] += answer["overpayment"]
            principal[r["buyer"]] += answer["principal"]
        wallets = expected_wallets(self.top_ups, buyer_of, firsts, overpayments)
        users = [u for pool in self.pools.values() for u in pool] + self.sellers
        used = expected_credit_used(buyer_of, firsts, principal)
        huabei_users = self.pools["huabei"] + self.pools["repay"]
        deadline = time.monotonic() + 30  # the last transfers may still be on their way
        while True:
            found = []
            for user in users:
                response = await self.http["gateway"].get(f"/v1/wallets/{user}")
                if response.status_code != 200:
                    found.append(f"{user}: GET wallet answered {response.status_code} {response.text[:100]}")
                elif (got := response.json()["available"]) != wallets.get(user, 0):
                    found.append(f"{user}: wallet holds {got} fen, its outcomes say {wallets.get(user, 0)} fen")
            for user in huabei_users:
                response = await self.http["credit"].get(f"/v1/huabei/{user}")
                if response.status_code != 200:
                    found.append(f"{user}: GET Huabei account answered {response.status_code} {response.text[:100]}")
                else:
                    found += credit_line_problems(user, response.json(), used.get(user, 0))
            if not found or time.monotonic() > deadline:
                return problems + found
            await asyncio.sleep(2)


# ---------------------------------------------------------------- command line
async def run(args: argparse.Namespace) -> int:
    token = os.environ.get("DANBAO_API_TOKEN")
    if not token:
        print("DANBAO_API_TOKEN is not set (./danbao chaos sets it from .data/secrets.env)", file=sys.stderr)
        return 2
    local = [f for f in args.faults if f.endswith(("kafka", "postgres"))]
    if local and (os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or os.environ.get("DATABASE_URL")):
        print(f"{', '.join(local)}: Kafka and Postgres faults need the local servers of ./danbao "
              "(KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL are set)", file=sys.stderr)
        return 2
    timing: Timing = args.timing
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    platform = Platform(LOG_DIR / "chaos.log", os.environ.get("CHAOS_SERVICES_DATABASE_URL")
                        or os.environ.get("DATABASE_URL") or "postgresql://danbao@127.0.0.1:5432/danbao")
    async with httpx.AsyncClient(timeout=5) as client:
        if (await client.get(f"{URLS['gateway']}/admin/clock")).status_code == 200:
            platform.env["DANBAO_CLOCK"] = "controllable"  # restarted services join the test clock
    chaos = Chaos(token, timing, args.seed, platform)
    print(f"== fault suite: {len(args.faults)} faults ({', '.join(args.faults)}) under {timing.rate:g} orders/s; "
          f"log .data/logs/chaos.log", flush=True)
    results: list[FaultResult] = []
    ok = True
    try:
        before = await audit_settled(10)
        if not before.ok:
            print("   the audit fails before the first fault (the platform's history); the run must not change it:\n"
                  + "\n".join(f"     {p}" for p in before.problems), flush=True)
        await chaos.setup()
        chaos.t0 = time.monotonic()
        chaos.spawn(chaos.load())
        await asyncio.sleep(timing.warmup)
        for name in args.faults:
            results.append(await chaos.inject(name))
        chaos.placing = False
        print("== load stopped; waiting for the last outcomes", flush=True)
        drained = await chaos.drain()
        placed = len(chaos.orders)
        await asyncio.sleep(2)  # late doubles
        outcomes = check_outcomes(chaos.expected, chaos.seen)
        money = await chaos.check_money()
        deadline = time.monotonic() + 30  # money may still be in flight between services
        while (audit_found := audit_problems(before, await audit())) and time.monotonic() < deadline:
            await asyncio.sleep(1)
    finally:
        platform.cont()
        await platform.stop_twins()
        await chaos.close()

    for r in results:
        r.pause, r.recovery = pause_and_recovery(chaos.arrivals, r.start, r.end)
    counts = Counter(e["type"] + (f" {e['data']['reason_code']}" if e["data"].get("reason_code") else "")
                     for e in first_outcomes(chaos.seen))
    print(f"\n== faults (times in seconds; pause: longest gap between outcomes from the fault's start to the "
          f"first outcome after its end; recovery: from its end to that outcome)")
    print(render_table(results))
    print(f"\n== {placed} orders, {len(chaos.expected)} requests, {sum(counts.values())} outcomes "
          f"({chaos.redelivered} redelivered), {len(chaos.repayments)} repayments")
    for label, n in sorted(counts.items()):
        print(f"   {label:<40}{n:>7}")
    checks = {
        "every fault injected, the platform back after it": [f"{r.name}: {r.error or 'no outcome after it'}"
                                                             for r in results if not r.ok],
        "every request has exactly one outcome": (
            [f"missing: {k}" for k in outcomes.missing[:20]] + [f"doubled: {k} {list(chaos.seen[k])}" for k in outcomes.doubled[:20]]
            + [f"unexpected: {k}" for k in outcomes.unexpected[:20]]
            + ([] if drained else ["not everything settled within the drain time"])),
        "no double charge: wallets and credit lines equal their outcomes": money,
        "audit (ledgers equal their transfers, conservation)": audit_found,
    }
    print("\n== checks")
    for name, problems in checks.items():
        print(f"   {'OK    ' if not problems else 'FAILED'} {name}")
        for problem in problems[:30]:
            print(f"          {problem}")
        ok = ok and not problems
    if outcomes.missing or outcomes.doubled:
        print(f"   ({len(outcomes.missing)} missing, {len(outcomes.doubled)} doubled in all)")
    print(f"\n== fault suite {'passed' if ok else 'FAILED'}")
    if args.json:
        report = {"started_at": args.started_at, "run": chaos.run, "timing": asdict(timing), "faults": [
            asdict(r) | {"ok": r.ok} for r in results], "orders": placed, "requests": len(chaos.expected),
            "outcome_counts": dict(sorted(counts.items())), "redelivered": chaos.redelivered,
            "repayments": len(chaos.repayments), "checks": checks, "ok": ok}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 0 if ok else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="./danbao chaos", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help=f"the quick version: {', '.join(SHORT_FAULTS)}, "
                        "short durations (CI)")
    parser.add_argument("--faults", help=f"comma-separated, in order; known: {', '.join(ALL_FAULTS)}")
    for name, help_ in (("rate", "orders per second"), ("down", "seconds a killed part stays down"),
                        ("hang", "seconds of SIGSTOP"), ("loops", "kills in a restart loop"),
                        ("loop-interval", "seconds a restarted service runs before the next kill"),
                        ("twins-seconds", "seconds the second instances run"),
                        ("settle", "seconds after a fault's recovery before the next one"),
                        ("drain", "seconds to wait for the last outcomes at the end")):
        parser.add_argument(f"--{name}", type=int if name == "loops" else float,
                            help=f"{help_} (default {getattr(FULL, name.replace('-', '_')):g}; "
                                 f"--short {getattr(SHORT, name.replace('-', '_')):g})")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON to FILE")
    args = parser.parse_args(argv)
    try:
        args.faults = parse_faults(args.faults) if args.faults else list(SHORT_FAULTS if args.short else DEFAULT_FAULTS)
    except ValueError as exc:
        parser.error(str(exc))
    base = SHORT if args.short else FULL
    overrides = {f: getattr(args, f) for f in Timing.__dataclass_fields__ if getattr(args, f, None) is not None}
    args.timing = Timing(**(asdict(base) | overrides))
    if args.timing.rate <= 0 or args.timing.loops < 1:
        parser.error("--rate must be positive and --loops at least 1")
    args.started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return args


def main() -> int:
    args = parse_args()
    # The Kafka client's complaints while Kafka is away (one a second and more) go to the log file.
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    kafka_log = logging.getLogger("aiokafka")
    kafka_log.addHandler(logging.FileHandler(LOG_DIR / "chaos.log"))
    kafka_log.propagate = False

    def interrupted(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupted)
    try:
        return asyncio.run(run(args))
    finally:
        for platform in PLATFORMS:
            platform.cont()
            platform.kill_twins()


if __name__ == "__main__":
    sys.exit(main())
