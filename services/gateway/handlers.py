"""Gateway effects: one function per command or consumed event. Each runs inside the caller's
transaction and writes its outgoing events to the outbox on the same connection."""
from __future__ import annotations

import asyncpg

from services.gateway import domain, store
from services.gateway.domain import PaymentStatus, Registration
from shared import events, outbox, topics
from shared.events import Envelope, OrderPlaced, PaymentFailed, UserRegistered
from shared.runtime import Context

SOURCE = "payment-gateway"


async def register_user(ctx: Context, conn: asyncpg.Connection, user: dict) -> tuple[Registration, dict]:
    now = ctx.clock.now()
    if await store.insert_user(conn, user, now):
        registered = UserRegistered(
            user_id=user["user_id"], birth_date=user["birth_date"], phone=user["phone"],
            id_number=user["id_number"], real_name_verified=user["real_name_verified"], registered_at=now)
        await outbox.add(conn, topics.USERS, user["user_id"],
                         events.new_event(registered, source=SOURCE, occurred_at=now, correlation_id=user["user_id"]))
        return Registration.CREATED, await store.get_user(conn, user["user_id"])
    existing = await store.get_user(conn, user["user_id"])
    return domain.registration_outcome(existing, user), existing


async def order_event(ctx: Context, conn: asyncpg.Connection, env: Envelope, data) -> None:
    """Every accepted orders.events record is kept; OrderPlaced also opens the payment."""
    now = ctx.clock.now()
    await store.record_order_event(conn, env.event_id, data.order_id, env.type, data.model_dump(mode="json"), now)
    if isinstance(data, OrderPlaced):
        await order_placed(ctx, conn, env, data)


async def order_placed(ctx: Context, conn: asyncpg.Connection, env: Envelope, order: OrderPlaced) -> None:
    now = ctx.clock.now()
    if await store.insert_payment(conn, env.event_id, order, PaymentStatus.PENDING.value, now):
        return
    # CONTRACT.md §3: the same order_id from a different event is refused and changes nothing.
    failed = PaymentFailed(order_id=order.order_id, reason_code="DUPLICATE_ORDER",
                           message=domain.duplicate_order_message(order.order_id))
    await outbox.add(conn, topics.PAYMENTS, order.order_id,
                     events.new_event(failed, source=SOURCE, occurred_at=now, correlation_id=order.order_id,
                                      causation_id=env.event_id))
