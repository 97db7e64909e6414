"""Personal data at rest (shared/pii.py): the credit service's copy of a user keeps a keyed hash
and a masked value of `phone` and `id_number`; Huabei accounts keep only the hashes, which is
all the one-account-per-phone / per-id-number rule needs (the unique constraints move with the
columns). Converts the existing rows, then drops the clear columns."""
from __future__ import annotations

from shared import pii


async def migrate(conn) -> None:
    secret = pii.key()
    await conn.execute("""ALTER TABLE profiles ADD COLUMN phone_hash text, ADD COLUMN phone_masked text,
                                               ADD COLUMN id_number_hash text, ADD COLUMN id_number_masked text""")
    rows = await conn.fetch("SELECT user_id, phone, id_number FROM profiles WHERE phone IS NOT NULL OR id_number IS NOT NULL")
    protected = [pii.protect(dict(r), secret) for r in rows]
    await conn.executemany(
        """UPDATE profiles SET phone = NULL, id_number = NULL, phone_hash = $2, phone_masked = $3,
                               id_number_hash = $4, id_number_masked = $5 WHERE user_id = $1""",
        [(p["user_id"], p["phone_hash"], p["phone_masked"], p["id_number_hash"], p["id_number_masked"])
         for p in protected])
    await conn.execute("ALTER TABLE profiles DROP COLUMN phone, DROP COLUMN id_number")

    await conn.execute("ALTER TABLE huabei_accounts RENAME COLUMN phone TO phone_hash")
    await conn.execute("ALTER TABLE huabei_accounts RENAME COLUMN id_number TO id_number_hash")
    accounts = await conn.fetch("SELECT user_id, phone_hash AS phone, id_number_hash AS id_number FROM huabei_accounts")
    await conn.executemany("UPDATE huabei_accounts SET phone_hash = $2, id_number_hash = $3 WHERE user_id = $1",
                           [(a["user_id"], pii.digest("phone", a["phone"], secret),
                             pii.digest("id_number", a["id_number"], secret)) for a in accounts])
