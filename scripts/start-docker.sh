#!/usr/bin/env bash
# Make a Docker engine answer on this machine, for the local image builds and the container tests:
# installs Debian's docker.io and debootstrap when missing (root, apt-get), then starts dockerd without a bridge
# network (containers run with --network host), unless an engine already answers.
#
#   scripts/start-docker.sh          log: ${EMGATE_DOCKERD_LOG:-/var/log/emgate/dockerd.log}
#
# Exit 0 when an engine answers, 2 (with the reason) when none can be started.
set -euo pipefail

LOG="${EMGATE_DOCKERD_LOG:-/var/log/emgate/dockerd.log}"
die() { echo "start-docker.sh: $*" >&2; exit 2; }

# Debian's client matches Debian's engine and has BuildKit built in; a newer client without buildx does not.
client() { if [ -x /usr/bin/docker ]; then echo /usr/bin/docker; else command -v docker || true; fi; }

answers() { local c; c="$(client)"; [ -n "$c" ] && "$c" info >/dev/null 2>&1; }

if answers; then
    echo "docker: engine answers ($("$(client)" version --format '{{.Server.Version}}' 2>/dev/null))"
    exit 0
fi
if ! command -v dockerd >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
        || die "dockerd or debootstrap missing and this is not root with apt-get: sudo apt-get install docker.io debootstrap"
    echo "docker: installing Debian's docker.io and debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io debootstrap >/dev/null 2>&1 \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
             docker.io debootstrap >/dev/null; } || die "apt-get install docker.io debootstrap failed"
fi
[ "$(id -u)" = 0 ] || die "dockerd is not running and needs root to start: sudo dockerd --bridge=none &"
mkdir -p "$(dirname "$LOG")"
# No iptables, masquerading or bridge: this machine kind cannot create them; host networking needs none.
nohup dockerd --iptables=false --ip-masq=false --bridge=none >"$LOG" 2>&1 &
for _ in $(seq 60); do
    answers && { echo "docker: engine started (log: $LOG)"; exit 0; }
    sleep 0.5
done
tail -n 20 "$LOG" >&2 || true
die "dockerd did not answer within 30 s (log: $LOG)"
