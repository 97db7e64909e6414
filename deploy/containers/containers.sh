# `./danbao containers ...`: the whole platform in containers (sourced by ./danbao, which
# provides ROOT, DATA, RUN, LOGS, PY, log, die, install_python and ensure_secrets).
#
#   ./danbao containers up      install Podman if missing, build the images, start the compose
#                               stack (Kafka, Postgres, four services, risk engine, ops console), wait
#                               until healthy
#   ./danbao containers demo    the same on the test clock, then the main job against the containers
#   ./danbao containers test    the test suite on testcontainers (Kafka and Postgres from the images)
#   ./danbao containers build   only build the images
#   ./danbao containers status  what runs and whether it is healthy
#   ./danbao containers logs S  follow one container's log (kafka, postgres, gateway, …, console)
#   ./danbao containers ops ARGS  an ops tool inside the stack: `python -m deploy.ops ARGS` in the
#                               console container (order ID, user ID, dlq ..., doctor)
#   ./danbao containers down    stop and remove the containers (-v: and their data volumes)
#
# Nothing is pulled from an image registry unless a setting names an image from one: Debian
# bookworm is debootstrapped from the apt mirror and imported as DEBIAN_IMAGE, and Python,
# Kafka, Postgres and the service image are built on it (deploy/containers/*.Containerfile,
# Dockerfile). Settings are in README.md ("Containers").

CT_DIR="$ROOT/deploy/containers"
CT_DATA="$DATA/containers"
CT_COMPOSE=(-f "$ROOT/docker-compose.yml" -p "${COMPOSE_PROJECT_NAME:-danbao}")
CT_PROJECT="${COMPOSE_PROJECT_NAME:-danbao}"
CT_ENGINE="${DANBAO_ENGINE:-podman}"
CT_SOCKET="${DANBAO_PODMAN_SOCKET:-$RUN/podman.sock}"
CT_APP_SERVICES=(gateway escrow credit billing risk console)

# Images: a setting given in the environment is used as is (and pulled if it names a registry);
# otherwise the image is built here.
CT_BUILD_DEBIAN=; CT_BUILD_PYTHON=; CT_BUILD_KAFKA=; CT_BUILD_POSTGRES=
[ -n "${DEBIAN_IMAGE:-}" ] || CT_BUILD_DEBIAN=1
[ -n "${DANBAO_BASE_IMAGE:-}" ] || CT_BUILD_PYTHON=1
[ -n "${KAFKA_IMAGE:-}" ] || CT_BUILD_KAFKA=1
[ -n "${POSTGRES_IMAGE:-}" ] || CT_BUILD_POSTGRES=1
export DEBIAN_IMAGE="${DEBIAN_IMAGE:-localhost/debian:bookworm}"
export DANBAO_BASE_IMAGE="${DANBAO_BASE_IMAGE:-localhost/danbao-python:3.11}"
export KAFKA_IMAGE="${KAFKA_IMAGE:-localhost/danbao-kafka:3.9.1}"
export POSTGRES_IMAGE="${POSTGRES_IMAGE:-localhost/danbao-postgres:15}"
export DANBAO_IMAGE="${DANBAO_IMAGE:-localhost/danbao:local}"

mkdir -p "$CT_DATA"

# ---------------------------------------------------------------- engine
ct_engine() { if [ "$CT_ENGINE" = docker ]; then docker "$@"; else podman "$@"; fi; }

ct_apt() {  # packages...: Debian packages, without their recommendations
  command -v apt-get >/dev/null || die "apt-get not found: install $* by hand"
  [ "$(id -u)" = 0 ] || die "installing $* needs root (apt-get)"
  log "installing $* from Debian's packages"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >"$LOGS/apt.log" 2>&1 \
    || { tail -20 "$LOGS/apt.log" >&2; die "apt-get install $* failed"; }
}

ct_install() {
  if [ "$CT_ENGINE" = docker ]; then
    docker info >/dev/null 2>&1 || die "DANBAO_ENGINE=docker but no Docker engine answers"
    docker compose version >/dev/null 2>&1 || die "DANBAO_ENGINE=docker needs the compose plugin (docker compose)"
    return 0
  fi
  local missing=()
  # Podman with its network stack (netavark needs iptables for published ports), without the
  # rest of its recommendations.
  command -v podman >/dev/null || missing+=(podman netavark aardvark-dns iptables slirp4netns fuse-overlayfs uidmap)
  command -v iptables >/dev/null || missing+=(iptables)
  command -v runc >/dev/null || missing+=(runc)
  # docker-compose (1.29, Debian's) over Podman's Docker API: unlike podman-compose it waits for
  # `depends_on: condition: service_healthy` with the Podman of Debian bookworm (4.3).
  command -v docker-compose >/dev/null || missing+=(docker-compose)
  [ -z "$CT_BUILD_DEBIAN" ] || command -v debootstrap >/dev/null || missing+=(debootstrap)
  [ ${#missing[@]} -eq 0 ] || ct_apt "${missing[@]}"
  # runc and no default ulimits (deploy/containers/containers.conf explains both).
  export CONTAINERS_CONF="${CONTAINERS_CONF:-$CT_DIR/containers.conf}"
}

# Podman's Docker-compatible API, for docker-compose and testcontainers; started on demand, and
# stopped when the command ends (the containers do not need it).
ct_socket_start() {
  [ "$CT_ENGINE" = podman ] || return 0
  export DOCKER_HOST="unix://$CT_SOCKET"
  if ! podman --url "$DOCKER_HOST" version >/dev/null 2>&1; then
    rm -f "$CT_SOCKET"
    nohup podman system service --time=0 "$DOCKER_HOST" >>"$LOGS/podman-service.log" 2>&1 </dev/null &
    echo $! > "$RUN/podman-service.pid"
    for _ in $(seq 1 100); do podman --url "$DOCKER_HOST" version >/dev/null 2>&1 && break; sleep 0.1; done
    podman --url "$DOCKER_HOST" version >/dev/null 2>&1 || die "podman system service did not start: see $LOGS/podman-service.log"
  fi
  trap ct_socket_stop EXIT
}

ct_socket_stop() {
  [ "$CT_ENGINE" = podman ] || return 0
  stop_pid podman-service
  rm -f "$CT_SOCKET"
}

# Podman runs health checks from systemd timers; without systemd (containers, CI machines) nobody
# would, so compose would wait for `service_healthy` forever. The health ticker runs each
# container's check at its interval while the stack is up; `down` stops it.
ct_ticker_start() {
  [ "$CT_ENGINE" = podman ] || return 0
  [ -d /run/systemd/system ] && return 0
  pid_alive containers-health && return 0
  nohup "$CT_DIR/health-ticker" "$CT_PROJECT" >>"$LOGS/containers-health.log" 2>&1 </dev/null &
  echo $! > "$RUN/containers-health.pid"
}

ct_ticker_stop() { stop_pid containers-health; }

ct_compose() {
  if [ "$CT_ENGINE" = docker ]; then docker compose "${CT_COMPOSE[@]}" "$@"
  else docker-compose "${CT_COMPOSE[@]}" "$@"; fi
}

# ---------------------------------------------------------------- images
# A PEM bundle of extra CA certificates for pip and Maven inside builds (a TLS-inspecting proxy);
# the one pip uses on this machine unless DANBAO_BUILD_CA names one. Passed as a build secret:
# never stored in an image.
ct_build_ca() {
  local f
  for f in "${DANBAO_BUILD_CA:-}" "${PIP_CERT:-}" "$(pip3 config get global.cert 2>/dev/null || true)" \
           "${REQUESTS_CA_BUNDLE:-}" "${SSL_CERT_FILE:-}"; do
    [ -n "$f" ] && [ -s "$f" ] && { echo "$f"; return 0; }
  done
}

ct_image_exists() { ct_engine image exists "$1" 2>/dev/null || ct_engine image inspect "$1" >/dev/null 2>&1; }

# The apt mirror this machine uses (deb822 .sources or one-line sources.list), else Debian's CDN.
ct_mirror() {  # debian | debian-security
  local want=$1 url
  url=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | sed -n 's/^URIs: *//p' | tr ' ' '\n' \
        | grep -E "/$want/?\$" | sed -n 1p)
  [ -n "$url" ] || url=$(grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        | awk '{print $2}' | grep -E "/$want/?\$" | sed -n 1p)
  echo "${url:-http://deb.debian.org/$want}"
}

# Debian bookworm (minbase) from the apt mirror, imported as DEBIAN_IMAGE. Done once: the image
# stays in the engine's storage and every later build starts from it.
ct_debian_image() {
  [ -n "$CT_BUILD_DEBIAN" ] || return 0
  ct_image_exists "$DEBIAN_IMAGE" && return 0
  local mirror security rootfs="$CT_DATA/rootfs"
  mirror=$(ct_mirror debian); security=$(ct_mirror debian-security)
  log "debootstrapping Debian bookworm from $mirror as $DEBIAN_IMAGE (once)"
  rm -rf "$rootfs"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$LOGS/debootstrap.log" 2>&1 \
    || die "debootstrap failed: see $LOGS/debootstrap.log"
  rm -f "$rootfs/etc/apt/sources.list"
  cat > "$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  # Small images: no recommended packages, no documentation, no apt caches.
  cat > "$rootfs/etc/apt/apt.conf.d/90danbao" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
EOF
  printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
    'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' 'path-exclude /usr/share/locale/*' \
    'path-include /usr/share/locale/locale.alias' > "$rootfs/etc/dpkg/dpkg.cfg.d/90danbao"
  find "$rootfs/usr/share/doc" -type f ! -name copyright -delete
  find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
    "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/*
  mkdir -p "$rootfs/usr/share/man/man1"  # update-alternatives (OpenJDK) links man pages there
  tar -C "$rootfs" --numeric-owner -c . | ct_engine import --change 'CMD ["/bin/bash"]' - "$DEBIAN_IMAGE" \
      >>"$LOGS/debootstrap.log" 2>&1 || die "importing the Debian base failed: see $LOGS/debootstrap.log"
  rm -rf "$rootfs"
}

ct_build() {  # tag, containerfile, build args...
  local tag=$1 file=$2; shift 2
  local ca secret=()
  ca=$(ct_build_ca || true)
  [ -n "$ca" ] && secret=(--secret "id=ca,src=$ca")
  log "building $tag"
  ct_engine build -f "$file" "${secret[@]}" "$@" -t "$tag" "$ROOT" >"$LOGS/build-$(basename "$file").log" 2>&1 \
    || { tail -30 "$LOGS/build-$(basename "$file").log" >&2; die "building $tag failed: see $LOGS/build-$(basename "$file").log"; }
}

# One build at a time (they are CPU-heavy); each is a layer-cache hit when nothing changed.
ct_build_images() {  # which: all | infra
  ct_debian_image
  [ -z "$CT_BUILD_KAFKA" ] || ct_build "$KAFKA_IMAGE" "$CT_DIR/kafka.Containerfile" --build-arg "DEBIAN_IMAGE=$DEBIAN_IMAGE"
  [ -z "$CT_BUILD_POSTGRES" ] || ct_build "$POSTGRES_IMAGE" "$CT_DIR/postgres.Containerfile" --build-arg "DEBIAN_IMAGE=$DEBIAN_IMAGE"
  [ "${1:-all}" = infra ] && return 0
  [ -z "$CT_BUILD_PYTHON" ] || ct_build "$DANBAO_BASE_IMAGE" "$CT_DIR/python.Containerfile" --build-arg "DEBIAN_IMAGE=$DEBIAN_IMAGE"
  ct_build "$DANBAO_IMAGE" "$ROOT/Dockerfile" --build-arg "DANBAO_BASE_IMAGE=$DANBAO_BASE_IMAGE"
}

# ---------------------------------------------------------------- the stack
# Secrets for compose: the operator token, JWT secret and personal data key of ./danbao, and a Postgres password
# generated once into the same file. Values in the environment win.
ct_secrets() {
  ensure_secrets
  ensure_secret POSTGRES_PASSWORD 24
}

ct_port() {  # service -> host port
  local var; var="$(echo "$1" | tr a-z A-Z)_HOST_PORT"
  case $1 in gateway) echo "${!var:-8001}";; escrow) echo "${!var:-8002}";; credit) echo "${!var:-8003}";;
    billing) echo "${!var:-8004}";; risk) echo "${!var:-8005}";; console) echo "${!var:-8006}";;
    kafka) echo "${!var:-9092}";;
    postgres) echo "${!var:-5432}";; esac
}

# The environment of a client on the host (the main job, the audit) talking to the containers.
ct_host_env() {
  export KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:$(ct_port kafka)"
  export DATABASE_URL="postgresql://danbao:$POSTGRES_PASSWORD@127.0.0.1:$(ct_port postgres)/danbao"
  local s; for s in gateway escrow credit billing; do
    export "$(echo "$s" | tr a-z A-Z)_URL=http://127.0.0.1:$(ct_port "$s")"
  done
}

ct_container() {  # compose service -> the id of its (first) running container, empty if none
  ct_engine ps -q --filter "label=com.docker.compose.project=$CT_PROJECT" \
    --filter "label=com.docker.compose.service=$1" | sed -n 1p
}

ct_health() {  # container -> healthy | starting | unhealthy | none | missing
  local id; id=$(ct_container "$1")
  [ -n "$id" ] || { echo missing; return; }
  ct_engine inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' "$id" 2>/dev/null || echo missing
}

ct_wait_healthy() {  # seconds
  local deadline=$((SECONDS + $1)) s h bad
  while :; do
    bad=
    for s in kafka postgres "${CT_APP_SERVICES[@]}"; do
      h=$(ct_health "$s"); [ "$h" = healthy ] || bad="$bad $s:$h"
    done
    [ -z "$bad" ] && return 0
    [ $SECONDS -lt $deadline ] || { ct_status >&2 || true; die "not healthy within $1s:$bad (./danbao containers logs <name>)"; }
    sleep 2
  done
}

ct_up() {
  ct_install; ct_secrets; ct_build_images all
  ct_socket_start; ct_ticker_start
  log "starting the stack (compose project $CT_PROJECT, DANBAO_CLOCK=${DANBAO_CLOCK:-system})"
  # compose starts each service once what it depends on is healthy.
  ct_compose up -d --no-build --remove-orphans >"$LOGS/compose-up.log" 2>&1 \
    || { cat "$LOGS/compose-up.log" >&2; die "compose up failed"; }
  ct_wait_healthy 300
  log "all containers are healthy"
  ct_status
}

ct_status() {
  local s h ok=0
  for s in kafka postgres "${CT_APP_SERVICES[@]}"; do
    h=$(ct_health "$s"); [ "$h" = healthy ] || ok=1
    case $s in
      kafka) printf '%-9s %-9s 127.0.0.1:%s\n' "$s" "$h" "$(ct_port kafka)" ;;
      postgres) printf '%-9s %-9s 127.0.0.1:%s\n' "$s" "$h" "$(ct_port postgres)" ;;
      *) printf '%-9s %-9s http://127.0.0.1:%s\n' "$s" "$h" "$(ct_port "$s")" ;;
    esac
  done
  return $ok
}

ct_down() {
  if [ "$CT_ENGINE" = podman ] && ! command -v podman >/dev/null; then log "Podman is not installed: nothing runs"; return 0; fi
  ct_install
  local ids; ids=$(ct_engine ps -aq --filter "label=com.docker.compose.project=$CT_PROJECT")
  if [ -n "$ids" ]; then
    ct_socket_start
    log "stopping and removing the containers of $CT_PROJECT"
    export DANBAO_API_TOKEN="${DANBAO_API_TOKEN:-x}" DANBAO_JWT_SECRET="${DANBAO_JWT_SECRET:-x}" \
      DANBAO_PII_KEY="${DANBAO_PII_KEY:-x}" POSTGRES_PASSWORD="${POSTGRES_PASSWORD:-x}"  # compose interpolates them even to stop
    ct_compose down --remove-orphans "$@" >"$LOGS/compose-down.log" 2>&1 \
      || { cat "$LOGS/compose-down.log" >&2; die "compose down failed"; }
  fi
  ct_ticker_stop
  ct_socket_stop
  ids=$(ct_engine ps -aq --filter "label=com.docker.compose.project=$CT_PROJECT")
  [ -z "$ids" ] || die "containers left: $(echo $ids)"
  log "nothing of $CT_PROJECT is running"
}

# The test suite with Kafka and Postgres from testcontainers (tests/conftest.py), as containers
# of KAFKA_IMAGE and POSTGRES_IMAGE. The service processes run on the host, as in ./danbao test.
ct_test() {
  ct_install; install_python; ct_build_images infra
  ct_socket_start
  export TESTCONTAINERS_RYUK_DISABLED="${TESTCONTAINERS_RYUK_DISABLED:-true}"  # no ryuk image without a registry
  # The host may carry Docker's /.dockerenv marker; the engine is local, so use its mapped ports.
  export TESTCONTAINERS_CONNECTION_MODE="${TESTCONTAINERS_CONNECTION_MODE:-docker_host}"
  unset KAFKA_BOOTSTRAP_SERVERS DATABASE_URL
  local rc=0
  (cd "$ROOT" && "$PY" -m pytest "$@") || rc=$?
  # The session removes its containers; after a crash, remove what it left of these images.
  local image ids
  for image in "$KAFKA_IMAGE" "$POSTGRES_IMAGE"; do
    ids=$(ct_engine ps -aq --filter "label=org.testcontainers.lang=python" --filter "ancestor=$image")
    [ -z "$ids" ] || { log "removing containers a test session left: $(echo $ids)"; ct_engine rm -f $ids >/dev/null; }
  done
  return $rc
}

containers_main() {
  local cmd=${1:-help}; shift || true
  case $cmd in
    build)  ct_install; ct_build_images all ;;
    up)     ct_up ;;
    demo)
      # The main job moves the test clock (auto-confirm, channel timeouts): services run on it.
      export DANBAO_CLOCK="${DANBAO_CLOCK:-controllable}"
      install_python; ct_up; ct_host_env
      log "running the main job against the containers"
      "$PY" -m deploy.demo "$@" ;;
    test)   ct_test "$@" ;;
    status) ct_install; ct_secrets >/dev/null; ct_status ;;
    logs)   ct_install; ct_engine logs -f --tail 100 "$(ct_container "${1:?which container}")" ;;
    ops)
      # The console container has every setting the ops tools read (databases, Kafka, the services'
      # and the risk engine's URLs, the operator token); its image ships deploy/ops.
      ct_install
      local id tty=(); id=$(ct_container console)
      [ -n "$id" ] || die "the console container does not run: ./danbao containers up"
      [ -t 0 ] && [ -t 1 ] && tty=(-t)
      ct_engine exec -i "${tty[@]}" "$id" python -m deploy.ops "$@" ;;
    down)   ct_down "$@" ;;
    *)      awk 'NR > 1 && !/^#/ {exit} NR > 3 {sub(/^# ?/, ""); print}' "$CT_DIR/containers.sh"; [ "$cmd" = help ] ;;
  esac
}
