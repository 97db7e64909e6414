"""Kafka plumbing: the connection security settings every client uses, the idempotent producer,
topic creation, a readiness probe and the start-up access check."""
from __future__ import annotations

import asyncio
import os
import ssl
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import collect_hosts, create_conn
from aiokafka.errors import (AuthenticationFailedError, AuthenticationMethodNotSupported, IllegalSaslStateError,
                             KafkaConnectionError, KafkaError, SaslAuthenticationFailed, TopicAlreadyExistsError,
                             UnsupportedSaslMechanismError)

from shared import topics
from shared.settings import SettingsError, env

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


class KafkaAccessError(RuntimeError):
    """The broker refused this client (credentials, SASL mechanism, TLS): retrying will not help."""


# What a broker answers when it refuses the client, as opposed to not being there (yet): a
# login refused, or TLS failing (certificate, protocol) other than by the connection dropping.
_REFUSED = (AuthenticationFailedError, SaslAuthenticationFailed, UnsupportedSaslMechanismError, IllegalSaslStateError,
            AuthenticationMethodNotSupported, ssl.SSLError)
_DROPPED = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)


@dataclass(frozen=True)
class Security:
    """How clients connect to Kafka: KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_MECHANISM,
    KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD, KAFKA_SSL_CAFILE (README, docs/contract.md §1)."""
    protocol: str = "PLAINTEXT"
    mechanism: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    cafile: str | None = None
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @classmethod
    def create(cls, protocol: str = "PLAINTEXT", mechanism: str | None = None, username: str | None = None,
               password: str | None = None, cafile: str | None = None) -> "Security":
        """Checked settings; a bad combination is a SettingsError naming the variable."""
        protocol = (protocol or "PLAINTEXT").strip().upper()
        if protocol not in PROTOCOLS:
            raise SettingsError(f"KAFKA_SECURITY_PROTOCOL must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
        mechanism = (mechanism or "").strip().upper() or None
        sasl, tls = protocol.startswith("SASL_"), protocol in ("SSL", "SASL_SSL")
        if sasl:
            if mechanism is None:
                raise SettingsError(f"KAFKA_SASL_MECHANISM must be set with {protocol}: one of {', '.join(MECHANISMS)}")
            if mechanism not in MECHANISMS:
                raise SettingsError(f"KAFKA_SASL_MECHANISM must be one of {', '.join(MECHANISMS)}, not {mechanism!r}")
            if not username or not password:
                raise SettingsError(f"KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD must be set with {protocol}")
        else:
            given = [name for name, value in (("KAFKA_SASL_MECHANISM", mechanism), ("KAFKA_SASL_USERNAME", username),
                                              ("KAFKA_SASL_PASSWORD", password)) if value]
            if given:  # credentials that would be silently ignored: surely a mistake
                raise SettingsError(f"{', '.join(given)} given but KAFKA_SECURITY_PROTOCOL is {protocol}: "
                                    "use SASL_PLAINTEXT or SASL_SSL")
        context = None
        if tls:
            if cafile and not os.path.isfile(cafile):
                raise SettingsError(f"KAFKA_SSL_CAFILE {cafile!r} is not a file")
            try:  # no CA file: the system's CAs
                context = ssl.create_default_context(cafile=cafile or None)
            except (OSError, ssl.SSLError) as exc:
                raise SettingsError(f"KAFKA_SSL_CAFILE {cafile!r} is not a usable PEM CA bundle: {exc}") from None
        elif cafile:
            raise SettingsError(f"KAFKA_SSL_CAFILE given but KAFKA_SECURITY_PROTOCOL is {protocol}: use SSL or SASL_SSL")
        return cls(protocol, mechanism if sasl else None, username if sasl else None, password if sasl else None,
                   cafile or None, context)

    @classmethod
    def from_env(cls) -> "Security":
        return cls.create(env("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT"), env("KAFKA_SASL_MECHANISM", "") or None,
                          env("KAFKA_SASL_USERNAME", "") or None,
                          os.environ.get("KAFKA_SASL_PASSWORD") or None,  # as given: spaces may be part of it
                          env("KAFKA_SSL_CAFILE", "") or None)

    def describe(self) -> str:
        """For logs and errors: never the password."""
        if self.sasl:
            return f"{self.protocol} {self.mechanism} as {self.username!r}"
        return self.protocol

    def client_options(self) -> dict[str, Any]:
        """The keyword arguments of every aiokafka client (producer, consumer, admin, connection)."""
        options: dict[str, Any] = {"security_protocol": self.protocol}
        if self.sasl:
            options.update(sasl_mechanism=self.mechanism, sasl_plain_username=self.username,
                           sasl_plain_password=self.password)
        if self.tls:
            options["ssl_context"] = self.ssl_context
        return options

    def faust_credentials(self) -> Any:
        """faust's `broker_credentials` for the same settings (None for PLAINTEXT)."""
        import faust

        if self.sasl:
            return faust.SASLCredentials(username=self.username, password=self.password, mechanism=self.mechanism,
                                         ssl_context=self.ssl_context)  # a context makes it SASL_SSL
        if self.tls:
            return faust.SSLCredentials(self.ssl_context)
        return None


def client_options(security: Security | None = None) -> dict[str, Any]:
    """aiokafka keyword arguments for `security`, or for the environment's settings."""
    return (security or Security.from_env()).client_options()


def client_kwargs(bootstrap: str | None = None, security: Security | None = None) -> dict[str, Any]:
    """client_options plus bootstrap_servers (default KAFKA_BOOTSTRAP_SERVERS), for tools."""
    return {"bootstrap_servers": bootstrap or env("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
            **client_options(security)}


PRODUCER_MAX_BATCH_BYTES = 512 * 1024  # below the broker's 1 MB message.max.bytes


def make_producer(bootstrap: str, security: Security | None = None) -> AIOKafkaProducer:
    # Idempotent + acks=all: a retried send is written once, and per-partition order holds.
    # No linger: the relay hands over whole batches anyway, and while one produce request is in
    # flight the next batch fills by itself; a linger would only add to every hop's latency.
    # Batches up to 512 kB: with the default 16 kB a relay run of 500 rows filled a partition's
    # batch every ~30 rows and then waited for it to drain, a round trip to the broker each.
    return AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all",
                            linger_ms=0, max_batch_size=PRODUCER_MAX_BATCH_BYTES, request_timeout_ms=30_000,
                            **client_options(security))


async def ensure_topics(bootstrap: str, names: list[str], partitions: int, replication: int = 1,
                        security: Security | None = None) -> None:
    """Create the topics (and their dead-letter topics) that do not exist yet."""
    wanted = set(names) | {topics.dlq(n) for n in names}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client_options(security))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = sorted(wanted - existing)
        if missing:
            try:
                await admin.create_topics([NewTopic(n, num_partitions=partitions, replication_factor=replication) for n in missing])
            except TopicAlreadyExistsError:
                pass  # another service created it first
    finally:
        await admin.close()


async def check_access(bootstrap: str, security: Security | None = None, timeout: float = 10.0) -> None:
    """Connect and authenticate to a bootstrap broker once. Raises KafkaAccessError, naming the
    broker's reason, when it refuses the client (wrong password, mechanism, certificate): the
    clients themselves only say "Unable to bootstrap". Raises KafkaConnectionError when no broker
    answers (not up yet, perhaps)."""
    security = security or Security.from_env()
    errors = []
    for host, port, _ in collect_hosts(bootstrap, randomize=False):
        try:
            conn = await asyncio.wait_for(
                create_conn(host, port, request_timeout_ms=int(timeout * 1000), **security.client_options()), timeout)
        except _REFUSED as exc:
            if isinstance(exc, _DROPPED):
                errors.append(f"{host}:{port}: {exc!r}")
                continue
            raise KafkaAccessError(f"cannot connect to Kafka at {host}:{port} with {security.describe()}: {exc}") from None
        except (OSError, KafkaError, asyncio.TimeoutError) as exc:
            errors.append(f"{host}:{port}: {exc!r}")
            continue
        conn.close()
        return
    raise KafkaConnectionError(f"no Kafka broker answered ({security.describe()}): {'; '.join(errors)}")


async def ping(bootstrap: str, timeout: float = 5.0, security: Security | None = None) -> None:
    security = security or Security.from_env()
    await check_access(bootstrap, security, timeout)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000),
                                **security.client_options())
    await asyncio.wait_for(admin.start(), timeout)
    try:
        await asyncio.wait_for(admin.list_topics(), timeout)
    finally:
        await admin.close()
