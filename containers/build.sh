#!/usr/bin/env bash
# containers/build.sh TARGET TAG [docker build options ...]: build containers/Dockerfile's TARGET as TAG
# (`make image` / `make image-gpu`; options come from IMAGE_BUILD_ARGS, e.g. an internal pip index).
#
# The base is PYTHON_IMAGE (environment; default: the Dockerfile's). When it is neither on this machine
# nor pullable (an air-gapped site), containers/base-image.sh makes one from the Debian mirror instead,
# and the build says so. The build uses the host's network, so that it reaches what the host reaches
# (a mirror, a package index served on 127.0.0.1).
#
# Package sources: the sources this machine's pip is configured with (`pip config list`: an internal
# index, local wheel folders) are given to the build, local folders served on 127.0.0.1 for its
# duration (containers/pip_sources.py); HOST_PIP_SOURCES=no builds with the Dockerfile's defaults.
# Options given here come after them and win.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v docker >/dev/null 2>&1 || ! docker info >/dev/null 2>&1; then
    echo "build: no Docker engine answers (docker info fails): containers/engine.sh up installs and" \
        "starts one" >&2
    exit 1
fi
target="$1"
tag="$2"
shift 2
# One build at a time on this machine. A second one (the docker tests, while `make test` still builds
# their images in the background) waits here and then finds every layer cached; beside the first it
# would serve pip's folders on another port, miss the layer cache and build everything again.
exec 9>"${TMPDIR:-/tmp}/histotransfer-build.lock"
if ! flock -n 9; then
    echo "build: waiting for another build of histotransfer's images to finish" >&2
    flock 9
fi
base="${PYTHON_IMAGE:-$(sed -n 's/^ARG PYTHON_IMAGE=//p' containers/Dockerfile)}"
fallback="histotransfer-base:bookworm"  # what containers/base-image.sh makes; made once, then reused
if ! docker image inspect "$base" >/dev/null 2>&1 && ! docker pull "$base" >/dev/null 2>&1; then
    if docker image inspect "$fallback" >/dev/null 2>&1; then
        echo "build: $base cannot be pulled; using $fallback (from Debian packages)" >&2
    else
        echo "build: $base cannot be pulled; making $fallback from Debian packages instead" \
            "(containers/base-image.sh)" >&2
        containers/base-image.sh "$fallback" >/dev/null
    fi
    base="$fallback"
fi
sources=()
if [ "${HOST_PIP_SOURCES:-yes}" != no ]; then
    serve="$(mktemp -d)"
    # a fixed port: the sources are build arguments, and a changed value would miss the layer cache
    port="$(python3 -c '
import socket
for port in range(38765, 38800):
    try:
        socket.create_server(("127.0.0.1", port)).close()
        print(port)
        break
    except OSError:
        continue
')"
    mapfile -t sources < <(python3 containers/pip_sources.py "$serve" "$port")
    if [ -n "$(ls -A "$serve")" ]; then
        python3 -m http.server "$port" --bind 127.0.0.1 --directory "$serve" >/dev/null 2>&1 &
        server=$!
        trap 'kill "$server" 2>/dev/null; rm -rf "$serve"' EXIT
        echo "build: serving this machine's pip folders on 127.0.0.1:$port for the build" >&2
    else
        rm -rf "$serve"
    fi
    [ "${#sources[@]}" -eq 0 ] || echo "build: package sources from pip's configuration: ${sources[*]}" >&2
fi
# The legacy builder keeps a stage's layers as untagged images, which `docker image prune` would take
# for garbage: the stages before the target are tagged histotransfer-stage:NAME, so that pruning
# removes only what no build uses any more (containers/engine.sh down). Each is one cached pass.
build() {
    docker build --network host -f containers/Dockerfile --build-arg "PYTHON_IMAGE=$base" \
        "${sources[@]}" "$@" .
}
for stage in $(sed -n 's/^FROM .* AS \([a-z-]*\)$/\1/p' containers/Dockerfile); do
    [ "$stage" != "$target" ] || break
    case "$stage" in base | runtime | cpu | predict | gpu) continue ;; esac
    echo "build: stage $stage" >&2
    build --target "$stage" -t "histotransfer-stage:$stage" "$@" >/dev/null
done
echo "build: $tag (target $target) on $base" >&2
build --target "$target" -t "$tag" "$@"
