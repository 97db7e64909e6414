"""docker-compose.yml and the Dockerfile agree with the settings the services read
(CONTRACT.md §1 and §7, shared/settings.py). Static checks: no Docker engine needed."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from shared.settings import DEFAULT_URLS

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

APP_SERVICES = ["gateway", "escrow", "credit", "billing"]
INFRA_SERVICES = ["kafka", "postgres"]

# Every environment variable the services read for connections and access.
REQUIRED_ENV = [
    "KAFKA_BOOTSTRAP_SERVERS",
    "DATABASE_URL",
    "DANBAO_API_TOKEN",
    "DANBAO_JWT_SECRET",
    "DANBAO_CLOCK",
    "HTTP_HOST",
    "GATEWAY_URL",
    "ESCROW_URL",
    "CREDIT_URL",
    "BILLING_URL",
]

_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|:\?)(?P<arg>[^}]*))?\}")


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose-style `${VAR}`, `${VAR:-default}`, `${VAR:?error}` with the given environment."""
    env = env or {}

    def sub(m: re.Match) -> str:
        name, op, arg = m["name"], m["op"], m["arg"]
        if env.get(name):
            return env[name]
        if op == ":-":
            return arg
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return ""

    return _VAR.sub(sub, value)


def as_env_dict(environment) -> dict[str, str]:
    if isinstance(environment, list):
        return dict(item.split("=", 1) for item in environment)
    return {k: "" if v is None else str(v) for k, v in (environment or {}).items()}


@pytest.fixture(scope="module")
def compose() -> dict:
    assert COMPOSE.is_file(), f"{COMPOSE} is missing"
    return yaml.safe_load(COMPOSE.read_text())  # SafeLoader resolves the x-service anchor / << merge


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _healthcheck_text(svc: dict) -> str:
    test = svc["healthcheck"]["test"]
    return " ".join(test) if isinstance(test, list) else str(test)


def _published_ports(svc: dict) -> list[tuple[int, int]]:
    out = []
    for entry in svc.get("ports", []):
        if isinstance(entry, dict):
            out.append((int(entry["published"]), int(entry["target"])))
        else:
            parts = str(entry).split(":")
            out.append((int(parts[-2]), int(parts[-1])))
    return out


def test_all_six_services_exist(services):
    assert set(services) == set(APP_SERVICES + INFRA_SERVICES + ["risk"])


@pytest.mark.parametrize("name", APP_SERVICES)
def test_published_port_matches_settings_default_and_env_url(services, name):
    default_port = urlparse(DEFAULT_URLS[name]).port
    assert default_port == {"gateway": 8001, "escrow": 8002, "credit": 8003, "billing": 8004}[name]
    svc = services[name]
    assert _published_ports(svc) == [(default_port, default_port)]
    env = as_env_dict(svc["environment"])
    own_url = urlparse(env[f"{name.upper()}_URL"])
    assert own_url.scheme == "http"
    assert own_url.hostname == name  # reachable by its compose service name
    assert own_url.port == default_port  # ...and the service listens on this port


@pytest.mark.parametrize("name", APP_SERVICES)
def test_every_setting_is_set(services, name):
    env = as_env_dict(services[name]["environment"])
    missing = [var for var in REQUIRED_ENV if not env.get(var)]
    assert missing == []
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert env["HTTP_HOST"] == "0.0.0.0"
    for other in APP_SERVICES:
        assert env[f"{other.upper()}_URL"] == f"http://{other}:{urlparse(DEFAULT_URLS[other]).port}"
    assert interpolate(env["DANBAO_CLOCK"]) == "system"
    assert interpolate(env["DANBAO_CLOCK"], {"DANBAO_CLOCK": "controllable"}) == "controllable"
    db = urlparse(interpolate(env["DATABASE_URL"]))
    assert (db.scheme, db.username, db.password, db.hostname, db.port, db.path) == (
        "postgresql", "danbao", "danbao", "postgres", 5432, "/danbao")
    assert urlparse(interpolate(env["DATABASE_URL"], {"POSTGRES_PASSWORD": "s3cret"})).password == "s3cret"
    # The secrets have no default: compose must refuse to start without them (CONTRACT.md §7).
    for secret in ("DANBAO_API_TOKEN", "DANBAO_JWT_SECRET"):
        with pytest.raises(KeyError):
            interpolate(env[secret])
        assert interpolate(env[secret], {secret: "x"}) == "x"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_healthcheck_and_dependencies(services, name):
    svc = services[name]
    port = urlparse(DEFAULT_URLS[name]).port
    assert f"http://127.0.0.1:{port}/health" in _healthcheck_text(svc)
    depends = svc["depends_on"]
    assert isinstance(depends, dict)
    assert {k: v["condition"] for k, v in depends.items()} == {
        "kafka": "service_healthy", "postgres": "service_healthy"}


@pytest.mark.parametrize("name", APP_SERVICES)
def test_command_runs_its_own_service_module(services, name):
    command = services[name]["command"]
    assert command == ["python", "-m", f"services.{name}"]
    assert importlib.util.find_spec(f"services.{name}") is not None
    assert importlib.util.find_spec(f"services.{name}.__main__") is not None


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_share_one_image(services, name):
    svc = services[name]
    build = svc["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    assert (COMPOSE.parent / context).resolve() == ROOT
    assert svc["image"] == services["gateway"]["image"]


def test_kafka_is_single_node_kraft(services):
    kafka = services["kafka"]
    assert kafka["image"] == "apache/kafka:3.9.1"
    env = as_env_dict(kafka["environment"])
    assert {r.strip() for r in env["KAFKA_PROCESS_ROLES"].split(",")} == {"broker", "controller"}
    assert env["KAFKA_NODE_ID"] == "1"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@kafka:9093"
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert env["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"] == "0"
    assert "9092" in _healthcheck_text(kafka)


def test_postgres(services):
    pg = services["postgres"]
    assert pg["image"] == "postgres:15"
    env = as_env_dict(pg["environment"])
    assert env["POSTGRES_DB"] == "danbao"
    assert env["POSTGRES_USER"] == "danbao"
    assert interpolate(env["POSTGRES_PASSWORD"]) == "danbao"
    assert "pg_isready" in _healthcheck_text(pg)


def test_sasl_tls_is_documented_but_commented_out(compose):
    text = COMPOSE.read_text()
    assert re.search(r"^\s*#\s*KAFKA_SECURITY_PROTOCOL:", text, re.M)
    assert re.search(r"^\s*#\s*KAFKA_SASL_MECHANISM:", text, re.M)
    assert "not yet read by the services" in text.lower()
    for name in APP_SERVICES:  # comments only: nothing the services would half-apply
        env = as_env_dict(compose["services"][name]["environment"])
        assert not [k for k in env if k.startswith(("KAFKA_SECURITY", "KAFKA_SASL", "KAFKA_SSL"))]


def test_dockerfile():
    assert DOCKERFILE.is_file(), f"{DOCKERFILE} is missing"
    text = DOCKERFILE.read_text()
    instructions = [line.split(None, 1) for line in text.splitlines()
                    if line.strip() and not line.lstrip().startswith("#") and line[:1] not in (" ", "\t")]
    keywords = [parts[0].upper() for parts in instructions]
    froms = [parts[1].split()[0] for parts in instructions if parts[0].upper() == "FROM"]
    assert froms and all(image == "python:3.11-slim" for image in froms)
    assert "HEALTHCHECK" in keywords
    healthcheck = text[text.index("\nHEALTHCHECK"):]
    assert "urllib" in healthcheck.split("\n\n")[0] and "/health" in healthcheck.split("\n\n")[0]
    users = [parts[1].strip() for parts in instructions if parts[0].upper() == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "HTTP_HOST=0.0.0.0" in text
    assert re.search(r"pip install[^\n]*\s\.(\s|$)", text)


def test_risk_engine_runs_from_the_same_image(services):
    risk = services["risk"]
    assert risk["command"] == ["python", "-m", "services.risk"]
    assert importlib.util.find_spec("services.risk") is not None
    assert risk["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert "8005:8005" in risk["ports"] and "/health" in " ".join(risk["healthcheck"]["test"])
    assert risk["depends_on"]["kafka"]["condition"] == "service_healthy"
