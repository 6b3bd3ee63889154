#!/usr/bin/env bash
# Build (and push) every component image of emgate with ONE tag, from the repository root, with docker buildx.
#
#   scripts/build-images.sh [--registry REG] [--tag TAG] [--platform P[,P...]] [--push] [--lock FILE]
#                           [--stage STAGE]... [--dry-run]
#   scripts/build-images.sh --local [--stage STAGE]... [--dry-run]
#
#   --registry  image registry/namespace            (default: $EMGATE_IMAGE_REGISTRY or ghcr.io/emgate)
#   --tag       the one tag of every image           (default: $EMGATE_IMAGE_TAG or pyproject's version)
#   --platform  buildx platforms                      (default: linux/amd64)
#   --push      push to the registry, then write the pushed digests to the lock file
#   --lock      where the digests go                  (default: images/release.lock)
#   --stage     build only this stage (repeatable; default: every images/*/Dockerfile)
#   --dry-run   print the docker commands, run nothing (no Docker needed)
#   --local     build here, where image registries are unreachable: every image on a locally bootstrapped
#               Debian bookworm + Python 3.11 base (scripts/local-base.sh), the CUDA stages as their CPU
#               variant (images/STAGE/cpu-base.txt), this machine's pip settings and CA bundle passed in as
#               BuildKit secrets (never in a layer), host networking; tags emgate-local/emgate-STAGE:TAG
#               (run them with EMGATE_IMAGE_REGISTRY=emgate-local). Needs a Docker engine
#               (scripts/start-docker.sh) and, the first time, root for debootstrap.
#
# Images are REGISTRY/emgate-STAGE:TAG. After --push the lock file maps each stage to
# REGISTRY/emgate-STAGE@sha256:...; compile releases against it with
#   EMGATE_IMAGE_DIGESTS=images/release.lock emgate compile RECIPE -o FILE
# or paste its `images:` mapping into a recipe.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

die() { echo "build-images.sh: $*" >&2; exit 2; }

project_version() {
    sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1
}

REGISTRY="${EMGATE_IMAGE_REGISTRY:-ghcr.io/emgate}"
TAG="${EMGATE_IMAGE_TAG:-}"
PLATFORM="linux/amd64"
PUSH=0
DRY_RUN=0
LOCK="images/release.lock"
LOCAL=0
REGISTRY_GIVEN=0
STAGES=()

while [ $# -gt 0 ]; do
    case "$1" in
        --registry) [ $# -ge 2 ] || die "--registry needs a value"; REGISTRY="$2"; REGISTRY_GIVEN=1; shift 2 ;;
        --registry=*) REGISTRY="${1#*=}"; REGISTRY_GIVEN=1; shift ;;
        --local) LOCAL=1; shift ;;
        --tag) [ $# -ge 2 ] || die "--tag needs a value"; TAG="$2"; shift 2 ;;
        --tag=*) TAG="${1#*=}"; shift ;;
        --platform) [ $# -ge 2 ] || die "--platform needs a value"; PLATFORM="$2"; shift 2 ;;
        --platform=*) PLATFORM="${1#*=}"; shift ;;
        --lock) [ $# -ge 2 ] || die "--lock needs a value"; LOCK="$2"; shift 2 ;;
        --lock=*) LOCK="${1#*=}"; shift ;;
        --stage) [ $# -ge 2 ] || die "--stage needs a value"; STAGES+=("$2"); shift 2 ;;
        --stage=*) STAGES+=("${1#*=}"); shift ;;
        --push) PUSH=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

if [ "$LOCAL" -eq 1 ]; then
    [ "$PUSH" -eq 0 ] || die "--local builds stay on this machine: drop --push"
    [ "$PLATFORM" = linux/amd64 ] || die "--local builds this machine's platform only: drop --platform"
    [ "$REGISTRY_GIVEN" -eq 1 ] || REGISTRY="emgate-local"
fi
REGISTRY="${REGISTRY%/}"
[ -n "$TAG" ] || TAG="$(project_version)"
[ -n "$TAG" ] || die "no --tag given and no version found in pyproject.toml"
[[ "$TAG" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "invalid tag: $TAG"
[ -n "$REGISTRY" ] || die "empty --registry"
[ -n "$PLATFORM" ] || die "empty --platform"

if [ ${#STAGES[@]} -eq 0 ]; then
    for dockerfile in images/*/Dockerfile; do
        stage="${dockerfile#images/}"
        STAGES+=("${stage%/Dockerfile}")
    done
fi
[ ${#STAGES[@]} -gt 0 ] || die "no images/*/Dockerfile found"
for stage in "${STAGES[@]}"; do
    [ -f "images/$stage/Dockerfile" ] || die "no images/$stage/Dockerfile"
done

REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
if [ "$REVISION" != unknown ] && [ -n "$(git status --porcelain 2>/dev/null)" ]; then
    REVISION="${REVISION}-dirty"
fi


# --local: the pip settings of this machine, rewritten for the build: local directories (find-links, file://
# indexes) are served over HTTP on 127.0.0.1 for the build's lifetime, and the CA bundle goes in as a secret.
local_pip_conf() {
    local serve_root="$1" port="$2"
    python3 - "$serve_root" "$port" <<'PY'
import configparser, os, subprocess, sys
serve_root, port = sys.argv[1], sys.argv[2]
values = {}
try:
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
except OSError:
    listed = ""
for line in listed.splitlines():
    key, _, value = line.partition("=")
    name = key.split(".")[-1]
    if name in ("index-url", "extra-index-url", "find-links", "timeout", "default-timeout"):
        values[name] = value.strip().strip("'\"")
for env, name in (("PIP_INDEX_URL", "index-url"), ("PIP_EXTRA_INDEX_URL", "extra-index-url"),
                  ("PIP_FIND_LINKS", "find-links"), ("PIP_DEFAULT_TIMEOUT", "timeout")):
    if os.environ.get(env):
        values[name] = os.environ[env]
served = 0
def serve(location):
    global served
    path = location[len("file://"):] if location.startswith("file://") else location
    if "://" in location and not location.startswith("file://"):
        return location
    if not os.path.isdir(path):
        return None
    served += 1
    # an index's pages link to files beside it (../../files/...): serve its parent, point at it by name
    path = os.path.abspath(path).rstrip("/")
    os.symlink(os.path.dirname(path), os.path.join(serve_root, str(served)))
    return f"http://127.0.0.1:{port}/{served}/{os.path.basename(path)}/"
config = configparser.ConfigParser()
config["global"] = {"cert": "/run/secrets/pip-ca"}
for name in ("index-url", "extra-index-url", "find-links"):
    if name in values:
        urls = [u for u in (serve(v) for v in values[name].split()) if u]
        if urls:
            config["global"][name] = " ".join(urls)
timeout = values.get("timeout") or values.get("default-timeout")
if timeout:
    config["global"]["timeout"] = timeout
config.write(sys.stdout)
PY
}

local_ca_bundle() {
    local candidate
    for candidate in "${PIP_CERT:-}" "${REQUESTS_CA_BUNDLE:-}" "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt \
                     /etc/pki/tls/certs/ca-bundle.crt; do
        if [ -n "$candidate" ] && [ -f "$candidate" ]; then echo "$candidate"; return; fi
    done
    die "no CA bundle found (set PIP_CERT to this machine's bundle)"
}

build_local() {
    local docker base port stage image started seconds size work
    # Debian's client matches Debian's engine and has BuildKit built in; a newer client without buildx does not.
    docker="${DOCKER:-}"
    if [ -z "$docker" ]; then
        if docker buildx version >/dev/null 2>&1; then docker=docker; elif [ -x /usr/bin/docker ]; then docker=/usr/bin/docker; else docker=docker; fi
    fi
    base="${EMGATE_LOCAL_BASE:-emgate-local/debian-python:3.11-bookworm}"
    if [ "$DRY_RUN" -eq 0 ]; then
        command -v "$docker" >/dev/null 2>&1 || die "docker not found (scripts/start-docker.sh installs and starts one)"
        "$docker" info >/dev/null 2>&1 || die "no Docker engine answers (start one: scripts/start-docker.sh)"
        DOCKER="$docker" EMGATE_LOCAL_BASE="$base" bash "$ROOT/scripts/local-base.sh"
        WORK="$(mktemp -d)"; work="$WORK"
        chmod 700 "$work"
        mkdir "$work/serve"
        port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
        local_pip_conf "$work/serve" "$port" > "$work/pip.conf"
        python3 -m http.server --bind 127.0.0.1 --directory "$work/serve" "$port" >"$work/http.log" 2>&1 &
        SERVER_PID=$!
        trap 'kill "$SERVER_PID" 2>/dev/null; rm -rf "$WORK" "$METADATA_DIR"' EXIT
    else
        work="/tmp/emgate-build"  # printed only
    fi
    local ca
    ca="$(local_ca_bundle)"
    declare -a summary=()
    for stage in "${STAGES[@]}"; do
        image="$REGISTRY/emgate-$stage:$TAG"
        local variant=()
        if [ -f "images/$stage/cpu-base.txt" ]; then
            variant=(--build-arg "BASE_REQUIREMENTS=images/$stage/cpu-base.txt"
                     --build-arg "REQUIREMENTS=images/$stage/requirements-cpu.txt")
        fi
        started=$SECONDS
        run env DOCKER_BUILDKIT=1 "$docker" build \
            --file "images/$stage/Dockerfile" \
            --network host \
            --secret "id=pip.conf,src=$work/pip.conf" \
            --secret "id=pip-ca,src=$ca" \
            --build-arg "BASE=$base" \
            "${variant[@]}" \
            --tag "$image" \
            --build-arg "VERSION=$TAG" \
            --build-arg "REVISION=$REVISION" \
            .
        seconds=$(( SECONDS - started ))
        if [ "$DRY_RUN" -eq 0 ]; then
            size="$("$docker" image inspect --format '{{.Size}}' "$image")"
            summary+=("$(printf '%-40s %6d MB %5d s' "$image" $(( size / 1000000 )) "$seconds")")
        fi
    done
    if [ "$DRY_RUN" -eq 0 ]; then
        # the images these tags replaced (emgate's own, by label), not anything else in the engine
        "$docker" image prune --force --filter "label=org.opencontainers.image.source=https://github.com/emgate/emgate" \
            >/dev/null || true
        echo "built on $base:"
        printf '  %s\n' "${summary[@]}"
        echo "run the pipeline through them: EMGATE_IMAGE_REGISTRY=$REGISTRY EMGATE_IMAGE_TAG=$TAG emgate run RECIPE --runner docker"
    fi
}

# Without --push: load a single-platform build into the local engine; several platforms stay in the build cache.
OUTPUT=()
if [ "$PUSH" -eq 1 ]; then
    OUTPUT=(--push)
elif [[ "$PLATFORM" != *,* ]]; then
    OUTPUT=(--load)
fi

run() {
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    if [ "$DRY_RUN" -eq 0 ]; then
        "$@"
    fi
}

if [ "$DRY_RUN" -eq 0 ] && [ "$LOCAL" -eq 0 ]; then
    command -v docker >/dev/null 2>&1 || die "docker not found (use --dry-run to print the commands)"
    docker buildx version >/dev/null 2>&1 || die "docker buildx not available"
fi

METADATA_DIR="$(mktemp -d)"
trap 'rm -rf "$METADATA_DIR"' EXIT

if [ "$LOCAL" -eq 1 ]; then
    build_local
    exit 0
fi

declare -A DIGESTS=()
for stage in "${STAGES[@]}"; do
    image="$REGISTRY/emgate-$stage"
    metadata="$METADATA_DIR/$stage.json"
    run docker buildx build \
        --file "images/$stage/Dockerfile" \
        --platform "$PLATFORM" \
        --tag "$image:$TAG" \
        --build-arg "VERSION=$TAG" \
        --build-arg "REVISION=$REVISION" \
        --metadata-file "$metadata" \
        "${OUTPUT[@]}" \
        .
    if [ "$PUSH" -eq 1 ]; then
        if [ "$DRY_RUN" -eq 1 ]; then
            DIGESTS[$stage]="sha256:$(printf '0%.0s' $(seq 64))"
        else
            digest="$(tr -d '\n ' < "$metadata" | sed -n 's/.*"containerimage\.digest":"\(sha256:[0-9a-f]\{64\}\)".*/\1/p')"
            [ -n "$digest" ] || die "no containerimage.digest in the build metadata of $stage"
            DIGESTS[$stage]="$digest"
        fi
    fi
done

if [ "$PUSH" -eq 1 ]; then
    lock_text="# Written by scripts/build-images.sh --push: the pushed images of tag $TAG (revision $REVISION),
# pinned by digest. Compile a release with EMGATE_IMAGE_DIGESTS=$LOCK, or paste the mapping into a recipe.
registry: $REGISTRY
tag: \"$TAG\"
images:"
    for stage in "${STAGES[@]}"; do
        lock_text+="
  $stage: $REGISTRY/emgate-$stage@${DIGESTS[$stage]}"
    done
    if [ "$DRY_RUN" -eq 1 ]; then
        echo "# would write $LOCK (placeholder digests):"
        echo "$lock_text"
    else
        printf '%s\n' "$lock_text" > "$LOCK"
        echo "wrote $LOCK:"
        cat "$LOCK"
    fi
fi
