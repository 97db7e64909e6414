"""Settings from the environment (docs/contract.md §1 and §5). Nothing secret has a default."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from urllib.parse import urlparse

DEFAULT_URLS = {
    "gateway": "http://127.0.0.1:8001",
    "escrow": "http://127.0.0.1:8002",
    "credit": "http://127.0.0.1:8003",
    "billing": "http://127.0.0.1:8004",
}


class SettingsError(RuntimeError):
    pass


def env(name: str, default: str) -> str:
    """A setting from the environment; unset or blank gives the default."""
    value = os.environ.get(name, "").strip()
    return value or default


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
    business_tz: str

    @property
    def schema(self) -> str:
        return self.service

    @property
    def http_port(self) -> int:
        return urlparse(self.urls[self.service]).port or 80


def load(service: str, *, require_secrets: bool = True) -> Settings:
    clock_mode = env("DANBAO_CLOCK", "system")
    if clock_mode not in ("system", "controllable"):
        raise SettingsError(f"DANBAO_CLOCK must be 'system' or 'controllable', not {clock_mode!r}")
    api_tokens = secret_list("DANBAO_API_TOKEN")
    jwt_secrets = secret_list("DANBAO_JWT_SECRET")
    jwt_keys = named_keys("DANBAO_JWT_KEYS")
    if require_secrets and (not api_tokens or not (jwt_secrets or jwt_keys)):
        # docs/contract.md §7: refuse to start without both; `./danbao up` generates them locally.
        raise SettingsError("DANBAO_API_TOKEN and DANBAO_JWT_SECRET (or DANBAO_JWT_KEYS) must be set")
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
        topic_partitions=int(env("KAFKA_TOPIC_PARTITIONS", "4")),
        business_tz=env("BUSINESS_TZ", "Asia/Shanghai"),
    )
