#!/usr/bin/env bash
# Bootstrap the local base image that `scripts/build-images.sh --local` builds every stage image on, where image
# registries are unreachable: Debian bookworm (minbase) with its Python 3.11 in a venv on PATH, so `pip` and
# `python3 -m pip` behave as in the pinned python:3.11-slim base. Needs root, debootstrap and a running dockerd.
# libnuma1: vLLM's CPU build loads it (vLLM's own image carries it); nothing else is added.
#
#   scripts/local-base.sh [--tag IMAGE] [--force]
#
#   --tag    the base image's name   (default: $EMGATE_LOCAL_BASE or emgate-local/debian-python:3.11-bookworm)
#   --force  rebuild it even when the engine already has it
#
# About 50 s and 300 MB; reused while the engine keeps it.
set -euo pipefail

TAG="${EMGATE_LOCAL_BASE:-emgate-local/debian-python:3.11-bookworm}"
FORCE=0
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DOCKER="${DOCKER:-docker}"

die() { echo "local-base.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --tag) [ $# -ge 2 ] || die "--tag needs a value"; TAG="$2"; shift 2 ;;
        --tag=*) TAG="${1#*=}"; shift ;;
        --force) FORCE=1; shift ;;
        -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

"$DOCKER" info >/dev/null 2>&1 || die "no Docker engine answers (start one: scripts/start-docker.sh)"
# The base records the sha256 of this script: a changed recipe (another package, another step) rebuilds it.
RECIPE="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"
if [ "$FORCE" -eq 0 ] && [ "$("$DOCKER" image inspect --format '{{index .Config.Labels "emgate.local-base.recipe"}}' \
        "$TAG" 2>/dev/null)" = "$RECIPE" ]; then
    echo "local base $TAG: present, reused"
    exit 0
fi
[ "$(id -u)" = 0 ] || die "debootstrap needs root (run as root, or import a base yourself and pass --tag)"
command -v debootstrap >/dev/null 2>&1 || die "debootstrap not found: apt-get install debootstrap"

ROOTFS="$(mktemp -d)"
trap 'rm -rf "$ROOTFS"' EXIT
started=$SECONDS
echo "local base $TAG: debootstrap bookworm (minbase, python3) into $ROOTFS"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,libnuma1 bookworm "$ROOTFS" "$MIRROR" \
    >"$ROOTFS.log" 2>&1 || { tail -n 20 "$ROOTFS.log" >&2; die "debootstrap failed (full log: $ROOTFS.log)"; }
rm -f "$ROOTFS.log"
# A venv owned by root, on PATH: pip installs there as in python:slim (Debian's own Python refuses, PEP 668).
chroot "$ROOTFS" /usr/bin/python3 -m venv /opt/python
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/usr/share/doc \
    "$ROOTFS"/usr/share/man "$ROOTFS"/usr/share/locale "$ROOTFS"/var/log/*
tar -C "$ROOTFS" -c . | "$DOCKER" import \
    --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --change "LABEL emgate.local-base.recipe=$RECIPE" \
    --message "emgate local base: debootstrap bookworm minbase + python3 venv" \
    - "$TAG" >/dev/null
python_version="$("$DOCKER" run --rm --network none "$TAG" python3 -c 'import sys; print(sys.version.split()[0])')"
echo "local base $TAG: Python $python_version, $(( SECONDS - started )) s"
