#!/usr/bin/env bash
# containers/engine.sh up | down: a Docker engine for the docker tests (.ci/run calls both).
#
#   up     when no engine answers: install Debian's docker.io (and debootstrap, for
#          containers/base-image.sh) if docker is missing, start dockerd in the background, wait for it.
#          An engine that already answers is left as it is.
#   down   stop the dockerd that `up` started (nothing else), after pruning what the tests left:
#          stopped containers, dangling images and the build cache beyond the layers of the images.
# Needs root for the install and for dockerd (CI machines of this project: root, no systemd).
set -euo pipefail
state="${TMPDIR:-/tmp}/histotransfer-dockerd"
log="$state.log"

answers() { docker info >/dev/null 2>&1; }

up() {
    if answers; then
        echo "engine: a Docker engine answers; using it" >&2
        return
    fi
    if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
        echo "engine: installing docker.io and debootstrap (apt-get)" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null \
            || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null; }
    fi
    echo "engine: starting dockerd (log: $log)" >&2
    nohup dockerd >"$log" 2>&1 &
    echo $! >"$state.pid"
    for _ in $(seq 60); do
        if answers; then
            echo "engine: dockerd $(docker version --format '{{.Server.Version}}') is up" >&2
            return
        fi
        sleep 1
    done
    echo "engine: dockerd did not answer within 60 s; its log:" >&2
    tail -20 "$log" >&2
    exit 1
}

down() {
    if answers; then
        docker container prune --force >/dev/null || true
        docker image prune --force >/dev/null || true
        docker builder prune --force >/dev/null 2>&1 || true
    fi
    if [ -f "$state.pid" ]; then
        pid="$(cat "$state.pid")"
        rm -f "$state.pid"
        if kill "$pid" 2>/dev/null; then
            for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
            echo "engine: stopped the dockerd it started" >&2
        fi
    fi
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    *) echo "usage: containers/engine.sh up|down" >&2; exit 2 ;;
esac
