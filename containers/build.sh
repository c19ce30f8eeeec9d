#!/usr/bin/env bash
# containers/build.sh TARGET TAG [docker build options ...]: build containers/Dockerfile's TARGET as TAG
# (`make image` / `make image-gpu`; options come from IMAGE_BUILD_ARGS, e.g. an internal pip index).
#
# The base is PYTHON_IMAGE (environment; default: the Dockerfile's). When it is neither on this machine
# nor pullable (an air-gapped site), containers/base-image.sh makes one from the Debian mirror instead,
# and the build says so. The build uses the host's network, so that it reaches what the host reaches
# (a mirror, a package index served on 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."
target="$1"
tag="$2"
shift 2
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
echo "build: $tag (target $target) on $base" >&2
exec docker build --network host -f containers/Dockerfile --target "$target" -t "$tag" \
    --build-arg "PYTHON_IMAGE=$base" "$@" .
