"""Settings from the environment (docs/contract.md §1 and §5). Nothing secret has a default."""
from __future__ import annotations

import os
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


@dataclass(frozen=True)
class Settings:
    service: str
    kafka_bootstrap_servers: str
    database_url: str
    urls: dict[str, str]
    clock_mode: str
    api_token: str = field(repr=False)
    jwt_secret: str = field(repr=False)
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
    api_token = os.environ.get("DANBAO_API_TOKEN", "")
    jwt_secret = os.environ.get("DANBAO_JWT_SECRET", "")
    if require_secrets and (not api_token or not jwt_secret):
        # docs/contract.md §7: refuse to start without both; `./danbao up` generates them locally.
        raise SettingsError("DANBAO_API_TOKEN and DANBAO_JWT_SECRET must be set")
    urls = {name: env(f"{name.upper()}_URL", url).rstrip("/") for name, url in DEFAULT_URLS.items()}
    database_url = env(f"{service.upper()}_DATABASE_URL", env("DATABASE_URL", "postgresql://danbao@127.0.0.1:5432/danbao"))
    return Settings(
        service=service,
        kafka_bootstrap_servers=env("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
        database_url=database_url,
        urls=urls,
        clock_mode=clock_mode,
        api_token=api_token,
        jwt_secret=jwt_secret,
        http_host=env("HTTP_HOST", "127.0.0.1"),
        topic_partitions=int(env("KAFKA_TOPIC_PARTITIONS", "4")),
        business_tz=env("BUSINESS_TZ", "Asia/Shanghai"),
    )
