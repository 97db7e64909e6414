"""`python -m shared.kafka_ready BOOTSTRAP`: exit 0 when the broker answers (used by ./danbao),
1 when it does not (yet), 2 when the settings are wrong or the broker refuses the client
(KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_*, KAFKA_SSL_CAFILE): waiting longer will not help."""
import asyncio
import sys

from shared.kafka import KafkaAccessError, Security, ping
from shared.settings import SettingsError, env

try:
    bootstrap = sys.argv[1] if len(sys.argv) > 1 else env("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    asyncio.run(ping(bootstrap, security=Security.from_env()))
except (SettingsError, KafkaAccessError) as exc:
    print(f"kafka: {exc}", file=sys.stderr)
    sys.exit(2)
except Exception as exc:
    print(f"kafka not ready: {exc!r}", file=sys.stderr)
    sys.exit(1)
