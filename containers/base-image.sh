#!/usr/bin/env bash
# The air-gapped recipe: a Python base image made from Debian packages, for machines that cannot pull
# the default base (python:3.11-slim-bookworm) from an image registry but reach a Debian mirror.
#
#   containers/base-image.sh [TAG]          (default TAG: histotransfer-base:bookworm)
#   make image BASE_IMAGE=histotransfer-base:bookworm
#
# Environment: DEBIAN_MIRROR (default: the first deb.debian.org-style URI of this machine's apt
# sources, else http://deb.debian.org/debian), SUITE (bookworm). Needs root, debootstrap and a Docker
# engine. The machine's CA certificates go into the image, so that pip inside a build trusts the package
# index this machine trusts (an internal mirror behind a TLS-inspecting proxy, say); no other file of
# the machine does.
set -euo pipefail

# What it needs, checked before anything is made: one line naming the fix, not "command not found" later
if ! command -v debootstrap >/dev/null 2>&1; then
    echo "base-image: debootstrap is not installed: apt-get install debootstrap (Debian/Ubuntu), or" \
        "containers/engine.sh up, which installs it with the Docker engine" >&2
    exit 1
fi
if ! command -v docker >/dev/null 2>&1; then
    echo "base-image: docker is not installed: containers/engine.sh up installs and starts an engine" \
        "(apt-get install docker.io)" >&2
    exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "base-image: debootstrap needs root: run it with sudo" >&2
    exit 1
fi
if ! docker info >/dev/null 2>&1; then
    echo "base-image: no Docker engine answers (docker info fails): containers/engine.sh up starts one" >&2
    exit 1
fi

tag="${1:-histotransfer-base:bookworm}"
suite="${SUITE:-bookworm}"
mirror="${DEBIAN_MIRROR:-$(grep -rhoE '^URIs: +\S+/debian$' /etc/apt/sources.list.d/ 2>/dev/null | head -1 | awk '{print $2}')}"
mirror="${mirror:-http://deb.debian.org/debian}"

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
echo "base image $tag: debootstrap $suite from $mirror" >&2
debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
    "$suite" "$root" "$mirror" >&2
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    - "$tag" >&2
echo "$tag"
