#!/bin/sh
# `docker run IMAGE histotransfer tile ...`, `docker run IMAGE tile ...` and `docker run IMAGE python ...`
# all work: a first argument that is a program on PATH runs as given, anything else goes to histotransfer.
set -e
if [ "$#" -gt 0 ] && command -v "$1" >/dev/null 2>&1; then
    exec "$@"
fi
exec histotransfer "$@"
