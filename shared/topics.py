"""Kafka topic names. `orders.events`, `payments.events` and `dlq(ORDERS)` are public
(docs/contract.md §2); the rest are internal."""
ORDERS = "orders.events"
PAYMENTS = "payments.events"
USERS = "users.events"  # gateway -> credit (and others): UserRegistered
ESCROW_COMMANDS = "escrow.commands"
ESCROW_EVENTS = "escrow.events"
CREDIT_COMMANDS = "credit.commands"
CREDIT_EVENTS = "credit.events"
BILLING_COMMANDS = "billing.commands"  # gateway -> billing: repayments to allocate
BILLING_EVENTS = "billing.events"
RISK_REQUESTS = "risk.requests"    # gateway -> risk engine (faust), keyed by buyer_id
RISK_DECISIONS = "risk.decisions"  # risk engine -> gateway, keyed by order_id

ALL = [ORDERS, PAYMENTS, USERS, ESCROW_COMMANDS, ESCROW_EVENTS, CREDIT_COMMANDS, CREDIT_EVENTS, BILLING_COMMANDS, BILLING_EVENTS,
       RISK_REQUESTS, RISK_DECISIONS]


def dlq(topic: str) -> str:
    return f"{topic}.dlq"
