"""`python -m shared.kafka_ready BOOTSTRAP`: exit 0 when the broker answers (used by ./danbao)."""
import asyncio
import sys

from shared.kafka import ping

try:
    asyncio.run(ping(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9092"))
except Exception as exc:
    print(f"kafka not ready: {exc!r}", file=sys.stderr)
    sys.exit(1)
