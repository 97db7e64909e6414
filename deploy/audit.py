"""Ops command: prove that no fen was created or lost (`./danbao audit`, or
`python -m deploy.audit [--wait SECONDS]`).

It reads every service's ledger (an operator's tool may; services never read each other's
tables) and checks that
  1. each ledger is consistent: cached account totals equal its transfers, posted debits equal
     posted credits, no wallet is overdrawn;
  2. the services agree on what passed between them: the gateway and escrow on what escrow
     holds for the gateway, the gateway and credit on what was lent through the gateway, the
     gateway and billing on the Huabei fees and penalties paid;
  3. conservation: money in from the bank channel minus money out, plus what buyers owe on
     Huabei (principal, fees, penalties), equals the sum of wallet balances, escrow holds,
     repayments not yet allocated and fee revenue (merchant, withdrawal, installment, penalty).
Money in flight between services (a message not yet consumed) shows as a difference in 2 and 3;
--wait retries until the figures settle. Exit status 0 when all holds, 1 with the discrepancy.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import dataclass, field

import asyncpg

from services.billing import domain as billing
from services.credit import domain as credit
from services.escrow import domain as escrow
from services.gateway import accounts as gateway
from shared import ledger


@dataclass
class Report:
    figures: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        lines = [f"  {name:<40}{value:>16,} fen".replace(",", " ") for name, value in self.figures.items()]
        lines += [f"  PROBLEM: {p}" for p in self.problems]
        lines.append("  audit: OK — every fen is accounted for" if self.ok else "  audit: FAILED")
        return "\n".join(lines)


def dsn(service: str) -> str:
    """Where `service` keeps its schema: its own URL, else DATABASE_URL."""
    return (os.environ.get(f"{service.upper()}_DATABASE_URL") or os.environ.get("DATABASE_URL")
            or "postgresql://danbao@127.0.0.1:5432/danbao")


async def _sum(conn: asyncpg.Connection, schema: str, where: str, account: str, expr: str) -> int:
    """sum(expr) over the accounts of `schema`'s ledger that `where` selects with $1 = `account`."""
    return await conn.fetchval(f"SELECT coalesce(sum({expr}), 0)::bigint FROM {schema}.ledger_balances WHERE {where}",
                               account)


async def audit(dsns: dict[str, str] | None = None) -> Report:
    dsns = dsns or {s: dsn(s) for s in ("gateway", "escrow", "credit", "billing")}
    report = Report()
    credit_balance = "credits_posted - debits_posted"
    debit_balance = "debits_posted - credits_posted"
    gw = await asyncpg.connect(dsns["gateway"])
    es = await asyncpg.connect(dsns["escrow"])
    cr = await asyncpg.connect(dsns["credit"])
    bi = await asyncpg.connect(dsns["billing"])
    try:
        async with gw.transaction(isolation="repeatable_read", readonly=True), \
                es.transaction(isolation="repeatable_read", readonly=True), \
                cr.transaction(isolation="repeatable_read", readonly=True), \
                bi.transaction(isolation="repeatable_read", readonly=True):
            for name, conn in (("gateway", gw), ("escrow", es), ("credit", cr), ("billing", bi)):
                await conn.execute(f"SET LOCAL search_path = {name}")
                report.problems += [f"{name} ledger: {p}" for p in await ledger.check(conn)]
            f = report.figures
            id_is = "id = $1"
            prefixed = "starts_with(id, $1)"  # an account per user or order
            f["bank channel: money in"] = await _sum(gw, "gateway", id_is, gateway.BANK, "debits_posted")
            f["bank channel: money out"] = await _sum(gw, "gateway", id_is, gateway.BANK, "credits_posted")
            f["wallet balances"] = await _sum(gw, "gateway", prefixed, gateway.WALLET_PREFIX, credit_balance)
            f["escrow holds"] = await _sum(es, "escrow", prefixed, escrow.HOLD_PREFIX, credit_balance)
            f["merchant fee revenue"] = await _sum(es, "escrow", id_is, escrow.FEE_REVENUE, credit_balance)
            f["withdrawal fee revenue"] = await _sum(gw, "gateway", id_is, gateway.REVENUE_WITHDRAWAL_FEE,
                                                     credit_balance)
            f["handed to escrow (gateway ledger)"] = await _sum(gw, "gateway", id_is, gateway.ESCROW, credit_balance)
            f["received from gateway (escrow ledger)"] = await _sum(es, "escrow", id_is, escrow.GATEWAY, debit_balance)
            f["huabei owed by buyers"] = await _sum(cr, "credit", prefixed, credit.LOAN_PREFIX, debit_balance)
            f["lent through the gateway (credit ledger)"] = await _sum(cr, "credit", id_is, credit.LENT, credit_balance)
            f["taken from the lender (gateway ledger)"] = await _sum(gw, "gateway", id_is, gateway.LENDER,
                                                                     debit_balance)
            f["huabei fees and penalties owed"] = await _sum(bi, "billing", prefixed, billing.FEES_RECEIVABLE_PREFIX,
                                                             debit_balance)
            f["installment fee revenue"] = await _sum(bi, "billing", id_is, billing.REVENUE_INSTALLMENT_FEE,
                                                      credit_balance)
            f["penalty revenue"] = await _sum(bi, "billing", id_is, billing.REVENUE_PENALTY, credit_balance)
            f["fees paid to billing (gateway ledger)"] = await _sum(gw, "gateway", id_is, gateway.BILLING,
                                                                    credit_balance)
            f["fees received (billing ledger)"] = await _sum(bi, "billing", id_is, billing.GATEWAY, debit_balance)
            f["repayments not yet allocated"] = await _sum(gw, "gateway", id_is, gateway.REPAYMENTS, credit_balance)
            f["payments in flight (reserved)"] = await _sum(gw, "gateway", prefixed, gateway.WALLET_PREFIX,
                                                            "debits_pending")
    finally:
        for conn in (gw, es, cr, bi):
            await conn.close()
    f = report.figures
    handed, received = f["handed to escrow (gateway ledger)"], f["received from gateway (escrow ledger)"]
    if handed != received:
        report.problems.append(f"the gateway handed {handed} fen to escrow, escrow received {received} fen")
    lent, taken = f["lent through the gateway (credit ledger)"], f["taken from the lender (gateway ledger)"]
    if lent != taken:
        report.problems.append(f"the credit service lent {lent} fen through the gateway, the gateway took {taken} fen")
    paid, received = f["fees paid to billing (gateway ledger)"], f["fees received (billing ledger)"]
    if paid != received:
        report.problems.append(f"the gateway paid {paid} fen of Huabei fees to billing, billing received {received} fen")
    net_in = (f["bank channel: money in"] - f["bank channel: money out"] + f["huabei owed by buyers"]
              + f["huabei fees and penalties owed"])
    accounted = (f["wallet balances"] + f["escrow holds"] + f["repayments not yet allocated"] + f["merchant fee revenue"]
                 + f["withdrawal fee revenue"] + f["installment fee revenue"] + f["penalty revenue"])
    if net_in != accounted:
        report.problems.append(f"conservation: bank in - out + Huabei owed = {net_in}, but wallets + holds + "
                               f"repayments + fees = {accounted} (difference {net_in - accounted})")
    return report


async def audit_settled(wait_seconds: float, dsns: dict[str, str] | None = None) -> Report:
    """Audit, retrying while money may still be in flight between services."""
    deadline = asyncio.get_running_loop().time() + wait_seconds
    while True:
        report = await audit(dsns)
        if report.ok or asyncio.get_running_loop().time() >= deadline:
            return report
        await asyncio.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wait", type=float, default=10.0, help="seconds to let in-flight money settle (default 10)")
    args = parser.parse_args()
    report = asyncio.run(audit_settled(args.wait))
    print("Danbao audit")
    print(report.render())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
