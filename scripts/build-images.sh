#!/usr/bin/env bash
# Build (and push) every component image of emgate with ONE tag, from the repository root, with docker buildx.
#
#   scripts/build-images.sh [--registry REG] [--tag TAG] [--platform P[,P...]] [--push] [--lock FILE]
#                           [--stage STAGE]... [--dry-run]
#
#   --registry  image registry/namespace            (default: $EMGATE_IMAGE_REGISTRY or ghcr.io/emgate)
#   --tag       the one tag of every image           (default: $EMGATE_IMAGE_TAG or pyproject's version)
#   --platform  buildx platforms                      (default: linux/amd64)
#   --push      push to the registry, then write the pushed digests to the lock file
#   --lock      where the digests go                  (default: images/release.lock)
#   --stage     build only this stage (repeatable; default: every images/*/Dockerfile)
#   --dry-run   print the docker commands, run nothing (no Docker needed)
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
STAGES=()

while [ $# -gt 0 ]; do
    case "$1" in
        --registry) [ $# -ge 2 ] || die "--registry needs a value"; REGISTRY="$2"; shift 2 ;;
        --registry=*) REGISTRY="${1#*=}"; shift ;;
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
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

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

if [ "$DRY_RUN" -eq 0 ]; then
    command -v docker >/dev/null 2>&1 || die "docker not found (use --dry-run to print the commands)"
    docker buildx version >/dev/null 2>&1 || die "docker buildx not available"
fi

METADATA_DIR="$(mktemp -d)"
trap 'rm -rf "$METADATA_DIR"' EXIT

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
