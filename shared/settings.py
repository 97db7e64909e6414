"""Settings from the environment (docs/contract.md §1 and §5). Nothing secret has a default.

Every setting is read with one of the typed helpers below (`env`, `env_int`,
`env_non_negative_int`, `env_percent`, `env_fraction`, `env_bool`, `env_choice`, `env_zone`): unset or blank
means the default, and a bad value is one SettingsError naming the variable, so a service stops
at start-up with a one-line error rather than at the first request that needs it."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Mapping, Sequence
from urllib.parse import urlparse
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from shared.money import percent

DEFAULT_URLS = {
    "gateway": "http://127.0.0.1:8001",
    "escrow": "http://127.0.0.1:8002",
    "credit": "http://127.0.0.1:8003",
    "billing": "http://127.0.0.1:8004",
}


# The services that keep personal data (hashed and masked, shared/pii.py) and need DANBAO_PII_KEY.
PII_SERVICES = ("gateway", "credit")


class SettingsError(ValueError):
    """A bad setting; the message names the variable (never echoes a secret)."""


Environ = Mapping[str, str]


def _raw(name: str, environ: Environ | None) -> str | None:
    value = (os.environ if environ is None else environ).get(name, "").strip()
    return value or None


def env(name: str, default: str, *, environ: Environ | None = None) -> str:
    """A text setting from the environment; unset or blank gives the default."""
    return _raw(name, environ) or default


def env_int(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None,
            environ: Environ | None = None) -> int:
    """A whole number, within [minimum, maximum] when given."""
    raw = _raw(name, environ)
    if raw is None:
        return default
    if not re.fullmatch(r"[+-]?[0-9]+", raw):
        raise SettingsError(f"{name} must be a whole number, not {raw!r}")
    value = int(raw)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = f"between {minimum} and {maximum}" if minimum is not None and maximum is not None else (
            f"at least {minimum}" if minimum is not None else f"at most {maximum}")
        raise SettingsError(f"{name} must be {bounds}, not {value}")
    return value


def env_non_negative_int(name: str, default: int, *, environ: Environ | None = None) -> int:
    return env_int(name, default, minimum=0, environ=environ)


def env_percent(name: str, default: Decimal, *, environ: Environ | None = None) -> Decimal:
    """A percent string ("0.60" = 0.60 %) as a Decimal fraction (0.0060), from 0 to 100 %."""
    raw = _raw(name, environ)
    if raw is None:
        return default
    try:
        rate = percent(raw)
    except InvalidOperation:
        rate = None
    if rate is None or not rate.is_finite() or not 0 <= rate <= 1:
        raise SettingsError(f"{name} must be a percent between 0 and 100, not {raw!r}")
    return rate


def env_fraction(name: str, default: float, *, environ: Environ | None = None) -> float:
    """A number from 0 to 1 (a sampling ratio)."""
    raw = _raw(name, environ)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:  # NaN too
        raise SettingsError(f"{name} must be a number from 0 to 1, not {raw!r}")
    return value


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def env_bool(name: str, default: bool, *, environ: Environ | None = None) -> bool:
    """true/1/yes/on or false/0/no/off, in any case."""
    raw = _raw(name, environ)
    if raw is None:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise SettingsError(f"{name} must be true or false, not {raw!r}")


def env_choice(name: str, default: str, choices: Sequence[str], *, environ: Environ | None = None) -> str:
    raw = _raw(name, environ)
    if raw is None:
        return default
    if raw not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, not {raw!r}")
    return raw


def env_zone(name: str, default: str, *, environ: Environ | None = None) -> str:
    """An IANA time zone name (e.g. Asia/Shanghai)."""
    raw = _raw(name, environ) or default
    try:
        ZoneInfo(raw)
    except (ZoneInfoNotFoundError, ValueError):
        raise SettingsError(f"{name} must be an IANA time zone, not {raw!r}") from None
    return raw


def secret_list(name: str) -> tuple[str, ...]:
    """A comma-separated list of secrets (the current one first, then those still accepted)."""
    return tuple(v.strip() for v in os.environ.get(name, "").split(",") if v.strip())


_KID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def named_keys(name: str) -> dict[str, str]:
    """`kid1:secret1,kid2:secret2` -> {kid: secret}. A malformed entry is refused by its position,
    never by its text (it holds a secret)."""
    keys: dict[str, str] = {}
    for n, item in enumerate(secret_list(name), 1):
        kid, sep, secret = item.partition(":")
        if not sep or not _KID.match(kid) or not secret or kid in keys:
            raise SettingsError(f"{name}: entry {n} must be kid:secret, kid of [A-Za-z0-9._-] and unique")
        keys[kid] = secret
    return keys


@dataclass(frozen=True)
class Settings:
    service: str
    kafka_bootstrap_servers: str
    database_url: str
    urls: dict[str, str]
    clock_mode: str
    # Secrets (docs/contract.md §7), each a list so that they rotate without downtime: the
    # operator tokens (current first), the JWT secrets without a key id, the named JWT keys.
    api_tokens: tuple[str, ...] = field(repr=False)
    jwt_secrets: tuple[str, ...] = field(repr=False)
    jwt_keys: dict[str, str] = field(repr=False)
    http_host: str
    topic_partitions: int
    business_tz: str  # BUSINESS_TZ, read here only; `zone` for the ZoneInfo
    # The consumer's pause under load (shared/consumer.py): up to CONSUMER_GATHER_MS before the
    # next fetch, the whole pause after a batch of CONSUMER_GATHER_RECORDS records or more.
    consumer_gather_ms: int = 20
    consumer_gather_records: int = 64
    # At most one offset commit per CONSUMER_COMMIT_MS, in the background (shared/consumer.py).
    consumer_commit_ms: int = 100
    # How long records off a saga's path (credit's behaviour counts) may wait to be applied
    # together (Subscription.delay_ms).
    statistics_delay_ms: int = 500
    # Transactions send their own outbox rows once committed (shared/outbox.py); off: everything
    # goes through the single active relay (strict id order per schema, a hop slower).
    outbox_handoff: bool = True

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.business_tz)

    @property
    def schema(self) -> str:
        return self.service

    @property
    def http_port(self) -> int:
        return urlparse(self.urls[self.service]).port or 80


def load(service: str, *, require_secrets: bool = True) -> Settings:
    clock_mode = env_choice("DANBAO_CLOCK", "system", ("system", "controllable"))
    api_tokens = secret_list("DANBAO_API_TOKEN")
    jwt_secrets = secret_list("DANBAO_JWT_SECRET")
    jwt_keys = named_keys("DANBAO_JWT_KEYS")
    if require_secrets and (not api_tokens or not (jwt_secrets or jwt_keys)):
        # docs/contract.md §7: refuse to start without both; `./danbao up` generates them locally.
        raise SettingsError("DANBAO_API_TOKEN and DANBAO_JWT_SECRET (or DANBAO_JWT_KEYS) must be set")
    if require_secrets and service in PII_SERVICES and not os.environ.get("DANBAO_PII_KEY", "").strip():
        # The key of the personal data hashes (shared/pii.py): only the services that keep them.
        raise SettingsError("DANBAO_PII_KEY must be set (the key of the personal data hashes)")
    urls = {name: env(f"{name.upper()}_URL", url).rstrip("/") for name, url in DEFAULT_URLS.items()}
    database_url = env(f"{service.upper()}_DATABASE_URL", env("DATABASE_URL", "postgresql://danbao@127.0.0.1:5432/danbao"))
    return Settings(
        service=service,
        kafka_bootstrap_servers=env("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
        database_url=database_url,
        urls=urls,
        clock_mode=clock_mode,
        api_tokens=api_tokens,
        jwt_secrets=jwt_secrets,
        jwt_keys=jwt_keys,
        http_host=env("HTTP_HOST", "127.0.0.1"),
        topic_partitions=env_int("KAFKA_TOPIC_PARTITIONS", 4, minimum=1),
        business_tz=env_zone("BUSINESS_TZ", "Asia/Shanghai"),
        consumer_gather_ms=env_int("CONSUMER_GATHER_MS", 20, minimum=0, maximum=1000),
        consumer_gather_records=env_int("CONSUMER_GATHER_RECORDS", 64, minimum=1, maximum=100_000),
        consumer_commit_ms=env_int("CONSUMER_COMMIT_MS", 100, minimum=0, maximum=10_000),
        statistics_delay_ms=env_int("STATISTICS_DELAY_MS", 500, minimum=0, maximum=60_000),
        outbox_handoff=env_bool("OUTBOX_HANDOFF", True),
    )
