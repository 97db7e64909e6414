"""docker-compose.yml, the Dockerfile and the Containerfiles of deploy/containers agree with the
settings the services read (shared/settings.py) and with each other. Static checks: no container
engine needed."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from shared.settings import DEFAULT_URLS

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
CONTAINERS = ROOT / "deploy" / "containers"

APP_SERVICES = ["gateway", "escrow", "credit", "billing"]
INFRA_SERVICES = ["kafka", "postgres"]

# Every environment variable the services read for connections and access.
REQUIRED_ENV = [
    "KAFKA_BOOTSTRAP_SERVERS",
    "DATABASE_URL",
    "DANBAO_API_TOKEN",
    "DANBAO_JWT_SECRET",
    "DANBAO_PII_KEY",
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


def _published_ports(svc: dict, env: dict[str, str] | None = None) -> list[tuple[int, int]]:
    out = []
    for entry in svc.get("ports", []):
        if isinstance(entry, dict):
            out.append((int(interpolate(str(entry["published"]), env)), int(entry["target"])))
        else:
            parts = interpolate(str(entry), env).split(":")
            out.append((int(parts[-2]), int(parts[-1])))
    return out


def test_all_eight_services_exist(services):
    assert set(services) == set(APP_SERVICES + INFRA_SERVICES + ["risk", "console"])


@pytest.mark.parametrize("name", APP_SERVICES)
def test_published_port_matches_settings_default_and_env_url(services, name):
    default_port = urlparse(DEFAULT_URLS[name]).port
    assert default_port == {"gateway": 8001, "escrow": 8002, "credit": 8003, "billing": 8004}[name]
    svc = services[name]
    assert _published_ports(svc) == [(default_port, default_port)]
    # The host port is a setting (e.g. to run next to a local platform); the container port is not.
    assert _published_ports(svc, {f"{name.upper()}_HOST_PORT": "18000"}) == [(18000, default_port)]
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
    db = urlparse(interpolate(env["DATABASE_URL"], {"POSTGRES_PASSWORD": "s3cret"}))
    assert (db.scheme, db.username, db.password, db.hostname, db.port, db.path) == (
        "postgresql", "danbao", "s3cret", "postgres", 5432, "/danbao")
    # The secrets have no default: compose must refuse to start without them (docs/contract.md §7).
    for secret in ("DANBAO_API_TOKEN", "DANBAO_JWT_SECRET", "DANBAO_PII_KEY"):
        with pytest.raises(KeyError):
            interpolate(env[secret])
        assert interpolate(env[secret], {secret: "x"}) == "x"
    with pytest.raises(KeyError):
        interpolate(env["DATABASE_URL"])  # no default Postgres password either


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
    assert interpolate(kafka["image"]) == "apache/kafka:3.9.1"
    assert interpolate(kafka["image"], {"KAFKA_IMAGE": "localhost/danbao-kafka:3.9.1"}) == "localhost/danbao-kafka:3.9.1"
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
    assert interpolate(pg["image"]) == "postgres:15"
    assert interpolate(pg["image"], {"POSTGRES_IMAGE": "localhost/danbao-postgres:15"}) == "localhost/danbao-postgres:15"
    env = as_env_dict(pg["environment"])
    assert env["POSTGRES_DB"] == "danbao"
    assert env["POSTGRES_USER"] == "danbao"
    with pytest.raises(KeyError):
        interpolate(env["POSTGRES_PASSWORD"])
    assert interpolate(env["POSTGRES_PASSWORD"], {"POSTGRES_PASSWORD": "s3cret"}) == "s3cret"
    # Reachable from the host on 127.0.0.1 only, like the local Postgres of ./danbao.
    assert [interpolate(p) for p in pg["ports"]] == ["127.0.0.1:5432:5432"]
    assert "pg_isready" in _healthcheck_text(pg)


KAFKA_CLIENT_ENV = ("KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD",
                    "KAFKA_SSL_CAFILE")


@pytest.mark.parametrize("name", APP_SERVICES + ["risk", "console"])
def test_kafka_client_security_is_passed_through(services, name):
    """The Kafka security settings reach every service and the risk engine as given; nothing
    given is PLAINTEXT, which the services accept (shared/kafka.py)."""
    from shared.kafka import Security

    env = as_env_dict(services[name]["environment"])
    given = {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
             "KAFKA_SASL_USERNAME": "danbao", "KAFKA_SASL_PASSWORD": "pw", "KAFKA_SSL_CAFILE": "/run/secrets/ca.pem"}
    assert {k: interpolate(env[k], given) for k in KAFKA_CLIENT_ENV} == given
    default = [interpolate(env[k]) or None for k in KAFKA_CLIENT_ENV]
    assert default == ["PLAINTEXT", None, None, None, None]
    assert Security.create(*default) == Security()
    assert "not yet read" not in COMPOSE.read_text().lower()


def test_dockerfile():
    assert DOCKERFILE.is_file(), f"{DOCKERFILE} is missing"
    text = DOCKERFILE.read_text()
    instructions = [line.split(None, 1) for line in text.splitlines()
                    if line.strip() and not line.lstrip().startswith("#") and line[:1] not in (" ", "\t")]
    keywords = [parts[0].upper() for parts in instructions]
    froms = [parts[1].split()[0] for parts in instructions if parts[0].upper() == "FROM"]
    # The base image is a build argument whose default is the official image.
    assert froms and all(image == "${DANBAO_BASE_IMAGE}" for image in froms)
    assert "DANBAO_BASE_IMAGE=python:3.11-slim" in [parts[1].strip() for parts in instructions if parts[0].upper() == "ARG"]
    assert "HEALTHCHECK" in keywords
    healthcheck = text[text.index("\nHEALTHCHECK"):]
    assert "urllib" in healthcheck.split("\n\n")[0] and "/health" in healthcheck.split("\n\n")[0]
    users = [parts[1].strip() for parts in instructions if parts[0].upper() == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "HTTP_HOST=0.0.0.0" in text
    assert re.search(r"pip install[^\n]*\s\.(\s|$)", text)


def _shipped_files() -> set[str]:
    """The repository files the Dockerfile's build stage copies (COPY without --from), as paths
    relative to the repository; each lands at the same path under the build's WORKDIR."""
    shipped = set()
    for line in DOCKERFILE.read_text().splitlines():
        parts = line.split()
        if not parts or parts[0].upper() != "COPY" or any(p.startswith("--from") for p in parts):
            continue
        *sources, dest = [p for p in parts[1:] if not p.startswith("--")]
        for source in sources:
            matches = sorted(ROOT.glob(source))
            assert matches, f"COPY {source}: nothing matches"
            for match in matches:
                rel = match.relative_to(ROOT)
                # Same place in the image: `COPY dir ./dir` or `COPY dir/*.py ./dir/`.
                assert dest.rstrip("/") in ("./" + str(rel), "./" + str(rel.parent), "."), line
                files = [f for f in match.rglob("*") if f.is_file()] if match.is_dir() else [match]
                shipped |= {str(f.relative_to(ROOT)) for f in files if "__pycache__" not in f.parts}
    return shipped


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions (`from a import b` gives a and a.b)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _module_file(name: str) -> Path | None:
    """The repository file of a project module (a package's __init__.py), None for anything else."""
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@pytest.mark.parametrize("entry", ["deploy.ops.__main__", "deploy.ops.console"])
def test_the_image_ships_what_the_ops_tools_need(entry):
    """`python -m deploy.ops ...` and `python -m deploy.ops.console` run inside the service image
    (README "Operating Danbao"): every project module they import, directly or not, is copied
    into the build (and installed: pyproject's packages include it), and every other package
    they import is a run-time dependency, not a test extra."""
    import fnmatch
    import tomllib
    from importlib.metadata import packages_distributions

    shipped = _shipped_files()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    runtime = {re.split(r"[\[=<>~! ;]", d, maxsplit=1)[0].lower().replace("_", "-")
               for d in pyproject["project"]["dependencies"]}
    distributions = packages_distributions()
    seen, todo, third_party = set(), [entry], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        if path is None:
            top = name.split(".")[0]
            if top not in ("shared", "services", "deploy") and top not in sys.stdlib_module_names:
                third_party.add(top)
            continue
        rel = str(path.relative_to(ROOT))
        assert rel in shipped, f"{entry} needs {rel}, which the Dockerfile does not copy"
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        assert any(fnmatch.fnmatch(package, p) for p in packages), f"{package} is not installed (pyproject)"
        parents = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        todo += parents + sorted(_imports(path))
    assert {entry, "deploy.ops.dlq", "deploy.ops.doctor", "deploy.ops.story", "deploy.audit"} <= seen  # the walk works
    for top in third_party:
        dists = {d.lower().replace("_", "-") for d in distributions.get(top, [])}
        assert dists & runtime, f"{entry} imports {top}, which is not a run-time dependency (pyproject)"


def test_risk_engine_runs_from_the_same_image(services):
    risk = services["risk"]
    assert risk["command"] == ["python", "-m", "services.risk"]
    assert importlib.util.find_spec("services.risk") is not None
    assert risk["environment"]["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert [interpolate(p) for p in risk["ports"]] == ["8005:8005"]
    assert "/health" in " ".join(risk["healthcheck"]["test"])
    assert risk["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_ops_console_runs_from_the_same_image_behind_the_operator_token(services):
    """deploy/ops/console.py as a service: port 8006 (CONSOLE_PORT, as `./danbao up` runs it),
    the operator token and the Postgres password with no default, every service's URL (the
    health page, the test clock) and the risk engine's, and no JWT secret or personal data key."""
    console = services["console"]
    assert console["command"] == ["python", "-m", "deploy.ops.console"]
    assert importlib.util.find_spec("deploy.ops.console") is not None
    assert _published_ports(console) == [(8006, 8006)]
    assert _published_ports(console, {"CONSOLE_HOST_PORT": "18006"}) == [(18006, 8006)]
    env = as_env_dict(console["environment"])
    assert (env["CONSOLE_PORT"], env["HTTP_HOST"], env["KAFKA_BOOTSTRAP_SERVERS"]) == ("8006", "0.0.0.0", "kafka:9092")
    assert "http://127.0.0.1:8006/health" in _healthcheck_text(console)
    for other in APP_SERVICES:
        assert env[f"{other.upper()}_URL"] == services[other]["environment"][f"{other.upper()}_URL"]
    assert env["RISK_URL"] == "http://risk:8005"
    assert env["DATABASE_URL"] == services["gateway"]["environment"]["DATABASE_URL"]
    with pytest.raises(KeyError):
        interpolate(env["DANBAO_API_TOKEN"])
    assert interpolate(env["DANBAO_API_TOKEN"], {"DANBAO_API_TOKEN": "a,b"}) == "a,b"
    assert not {"DANBAO_JWT_SECRET", "DANBAO_JWT_KEYS", "DANBAO_PII_KEY"} & set(env)
    depends = {k: v["condition"] for k, v in console["depends_on"].items()}
    assert depends == {"kafka": "service_healthy", "postgres": "service_healthy", "gateway": "service_started"}


def test_containers_script_knows_every_compose_service(services):
    """deploy/containers/containers.sh waits for, reports and maps the ports of the same services."""
    script = (CONTAINERS / "containers.sh").read_text()
    listed = re.search(r"^CT_APP_SERVICES=\(([^)]*)\)", script, re.M).group(1).split()
    assert set(listed) | set(INFRA_SERVICES) == set(services)
    ports = dict(re.findall(r"(\w+)\) echo \"\$\{!var:-(\d+)\}\"", script))
    for name in listed:
        assert _published_ports(services[name]) == [(int(ports[name]), int(ports[name]))], name


def test_kafka_advertises_the_published_host_port(services):
    """Clients on the host reach Kafka through the published port, so the host listener must
    advertise that port, not the container's: both follow KAFKA_HOST_PORT."""
    kafka = services["kafka"]
    for env, port in (({}, 9092), ({"KAFKA_HOST_PORT": "19092"}, 19092)):
        advertised = interpolate(as_env_dict(kafka["environment"])["KAFKA_ADVERTISED_LISTENERS"], env).split(",")
        assert f"PLAINTEXT_HOST://127.0.0.1:{port}" in advertised
        assert [interpolate(p, env) for p in kafka["ports"]] == [f"127.0.0.1:{port}:29092"]
    listeners = as_env_dict(kafka["environment"])["KAFKA_LISTENERS"].split(",")
    assert "PLAINTEXT_HOST://:29092" in listeners


@pytest.mark.parametrize("name", APP_SERVICES + INFRA_SERVICES + ["risk", "console"])
def test_restart_policy_non_root_user_and_healthcheck(services, name):
    svc = services[name]
    assert svc["restart"] == "unless-stopped"
    user = str(svc["user"]).split(":")[0]
    assert user not in ("", "0", "root")
    assert svc["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
    if svc["healthcheck"]["test"][0] == "CMD":
        # Podman 4.3's Docker API splits exec-form health check arguments at spaces.
        assert not [arg for arg in svc["healthcheck"]["test"] if " " in arg]


@pytest.mark.parametrize("name", APP_SERVICES + ["risk", "console"])
def test_app_image_and_base_are_settings(services, name):
    svc = services[name]
    assert interpolate(svc["image"]) == "danbao:local"
    assert interpolate(svc["image"], {"DANBAO_IMAGE": "localhost/danbao:local"}) == "localhost/danbao:local"
    assert str(svc["user"]) == "10001:10001"  # the Dockerfile's USER
    if name in APP_SERVICES:
        arg = svc["build"]["args"]["DANBAO_BASE_IMAGE"]
        assert interpolate(arg) == "python:3.11-slim"
        assert interpolate(arg, {"DANBAO_BASE_IMAGE": "localhost/danbao-python:3.11"}) == "localhost/danbao-python:3.11"


@pytest.mark.parametrize("name", ["python", "kafka", "postgres"])
def test_containerfiles_build_on_a_debian_base_argument(name):
    text = (CONTAINERS / f"{name}.Containerfile").read_text()
    assert re.search(r"^ARG DEBIAN_IMAGE=\S+", text, re.M)
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms and all(f == "${DEBIAN_IMAGE}" for f in froms)
    if name != "python":
        users = re.findall(r"^USER (\S+)", text, re.M)
        assert users and users[-1].split(":")[0] not in ("0", "root")
        assert re.search(r"^HEALTHCHECK ", text, re.M)


def test_kafka_image_uses_the_pinned_maven_project():
    text = (CONTAINERS / "kafka.Containerfile").read_text()
    assert "COPY deploy/kafka/pom.xml" in text
    assert "dependency:copy-dependencies" in text
    assert "kafka_2.13-3.9.1.jar" in text
    # The compose health check calls this path, as in apache/kafka.
    assert "/opt/kafka/bin/kafka-broker-api-versions.sh" in " ".join(
        yaml.safe_load(COMPOSE.read_text())["services"]["kafka"]["healthcheck"]["test"])
    assert (CONTAINERS / "kafka" / "kafka-broker-api-versions.sh").is_file()


def _kafka_properties(env: dict[str, str]) -> dict[str, str]:
    """The broker properties deploy/containers/kafka/run derives from an environment."""
    import subprocess

    script = (CONTAINERS / "kafka" / "run").read_text()
    head = script[: script.index("from_env=$(properties_from_env)")]
    out = subprocess.run(["sh", "-c", head + "properties_from_env"], env={"PATH": "/usr/bin:/bin", **env},
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def test_kafka_image_reads_settings_like_apache_kafka(services):
    env = as_env_dict(services["kafka"]["environment"])
    env = {k: interpolate(v) for k, v in env.items()}
    props = _kafka_properties(env)
    assert props["process.roles"] == "broker,controller"
    assert props["advertised.listeners"] == "PLAINTEXT://kafka:9092,PLAINTEXT_HOST://127.0.0.1:9092"
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["auto.create.topics.enable"] == "false"
    assert "heap.opts" not in props and "CLUSTER_ID" not in props  # JVM and image settings
    assert _kafka_properties({"KAFKA_A__B": "1", "KAFKA_C___D": "2"}) == {"a_b": "1", "c-d": "2"}
