# One image for all four Danbao services (gateway, escrow, credit, billing), the risk engine and
# the ops tools (the console, `python -m deploy.ops.console`; `python -m deploy.ops doctor`, ...).
#
#   docker build -t danbao .
#   docker run ... danbao                                  # runs services.gateway (DANBAO_SERVICE default)
#   docker run -e DANBAO_SERVICE=escrow ... danbao         # chooses the service by env
#   docker run ... danbao python -m services.credit        # or by argument (what docker-compose.yml does)
#                     (by argument, also pass -e DANBAO_SERVICE=credit or -e PORT=8003 so that the
#                      image's HEALTHCHECK probes the right port; docker-compose.yml sets its own)
#
# Settings come from the environment exactly as outside Docker (docs/contract.md §1, §7;
# shared/settings.py): KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL, the four *_URL (a service listens
# on the port of its own URL), DANBAO_CLOCK, DANBAO_API_TOKEN, DANBAO_JWT_SECRET. There are no
# secrets in the image: the services refuse to start without DANBAO_API_TOKEN and DANBAO_JWT_SECRET.
#
# Build arguments and secrets:
#   DANBAO_BASE_IMAGE   the base of both stages (default python:3.11-slim, the official image). It
#                       must provide `python` 3.11 with venv, and groupadd/useradd. On a machine
#                       without an image registry, deploy/containers/python.Containerfile builds
#                       one from Debian's packages (`./danbao containers` does).
#   --secret id=ca,src=FILE   optional: a PEM bundle of extra CA certificates pip must trust to
#                       reach PyPI (e.g. behind a TLS-inspecting proxy); used by pip only, never
#                       stored in a layer.

ARG DANBAO_BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- build stage
FROM ${DANBAO_BASE_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src

# Dependencies first (their own layer, reused while only the code changes): the pinned list is
# read from pyproject.toml itself, so there is no second requirements file to keep in step.
COPY pyproject.toml ./
RUN --mount=type=secret,id=ca,target=/run/secrets/ca \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && pip install -r /tmp/requirements.txt

# Then the project itself (packages shared*, services*, deploy*, with their migrations/*.sql and *.py):
# deploy's modules (the audit, the main job) and the ops tools (deploy/ops: `python -m deploy.ops
# order|user|dlq|doctor` and the console, `python -m deploy.ops.console`), not its build files.
COPY shared ./shared
COPY services ./services
COPY deploy/*.py ./deploy/
COPY deploy/ops/*.py ./deploy/ops/
RUN --mount=type=secret,id=ca,target=/run/secrets/ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && pip install --no-deps . \
 && python -c "import services.gateway.app, services.escrow.app, services.credit.app, services.billing.app, deploy.audit, deploy.ops.__main__, deploy.ops.console" \
 && pip uninstall -y -q pip setuptools  # installers are not needed at run time

# ---------------------------------------------------------------- runtime stage
FROM ${DANBAO_BASE_IMAGE}

# Non-root, numeric uid so orchestrators can verify runAsNonRoot.
RUN groupadd --system --gid 10001 danbao \
 && useradd --system --uid 10001 --gid danbao --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin danbao

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HTTP_HOST=0.0.0.0 \
    DANBAO_SERVICE=gateway

WORKDIR /app
USER 10001:10001

EXPOSE 8001 8002 8003 8004 8005 8006

# GET /health answers 200 only when the service reaches Kafka and Postgres. The port is $PORT
# when given, otherwise the port of the chosen service's *_URL setting (its default otherwise),
# which is the port the service listens on. python:3.11-slim has no curl, hence urllib.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=6 \
  CMD python -c "import os, urllib.parse, urllib.request; from shared.settings import DEFAULT_URLS; s = os.environ.get('DANBAO_SERVICE') or 'gateway'; port = os.environ.get('PORT') or urllib.parse.urlparse(os.environ.get(s.upper() + '_URL') or DEFAULT_URLS[s]).port; urllib.request.urlopen('http://127.0.0.1:%s/health' % port, timeout=4)" || exit 1

# The runtime handles SIGTERM (graceful stop); `exec` makes python PID 1 so it receives it.
# Override with an argument (e.g. `python -m services.escrow`) or set DANBAO_SERVICE.
CMD ["sh", "-c", "exec python -m \"services.${DANBAO_SERVICE}\""]
