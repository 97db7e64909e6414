"""Personal data at rest (shared/pii.py): users keep a keyed hash and a masked value of `phone`
and `id_number`, never the clear value. Converts the rows registered before, then drops the clear
columns; the UserRegistered events still in the outbox (kept 24 h after publishing) are
rewritten the same way. The clear values first become NULL so that the live rows no longer hold
them; the old row versions go with the next vacuum."""
from __future__ import annotations

import json

from shared import pii


async def migrate(conn) -> None:
    secret = pii.key()
    await conn.execute("""ALTER TABLE users ADD COLUMN phone_hash text, ADD COLUMN phone_masked text,
                                            ADD COLUMN id_number_hash text, ADD COLUMN id_number_masked text""")
    rows = await conn.fetch("SELECT user_id, phone, id_number FROM users WHERE phone IS NOT NULL OR id_number IS NOT NULL")
    protected = [pii.protect(dict(r), secret) for r in rows]
    await conn.executemany(
        """UPDATE users SET phone = NULL, id_number = NULL, phone_hash = $2, phone_masked = $3,
                            id_number_hash = $4, id_number_masked = $5 WHERE user_id = $1""",
        [(p["user_id"], p["phone_hash"], p["phone_masked"], p["id_number_hash"], p["id_number_masked"])
         for p in protected])
    await conn.execute("ALTER TABLE users DROP COLUMN phone, DROP COLUMN id_number")

    events = await conn.fetch("SELECT id, value FROM outbox WHERE topic = 'users.events' AND value IS NOT NULL")
    rewritten = []
    for e in events:
        envelope = json.loads(e["value"])
        if envelope.get("type") == "UserRegistered" and isinstance(envelope.get("data"), dict):
            envelope["data"] = pii.protect(envelope["data"], secret)
            rewritten.append((e["id"], json.dumps(envelope, separators=(",", ":")).encode()))
    await conn.executemany("UPDATE outbox SET value = $2 WHERE id = $1", rewritten)
