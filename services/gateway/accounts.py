"""The gateway ledger's accounts (shared/ledger.py), named once: the saga, the wallet and
repayment handlers, the audit (deploy/audit.py) and the ops tools use these names."""
from __future__ import annotations

BANK = "bank"              # money at the bank channel (debit-normal)
LENDER = "lender"          # money credit lent for Huabei orders, less what went back (debit-normal)
ESCROW = "escrow"          # what escrow holds for orders, plus the merchant fees it kept
BILLING = "billing"        # Huabei fees and penalties paid: billing's revenue
REPAYMENTS = "repayments"  # repayments taken, not yet allocated by billing
REVENUE_WITHDRAWAL_FEE = "revenue:withdrawal_fee"
WALLET_PREFIX = "wallet:"  # a user's wallet: opened with no_overdraft at registration


def wallet(user_id: str) -> str:
    """What the user owns; never overdrawn (its ledger account's no_overdraft flag)."""
    return f"{WALLET_PREFIX}{user_id}"
