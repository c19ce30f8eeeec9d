#!/bin/sh
# `docker run IMAGE histotransfer tile ...`, `docker run IMAGE tile ...` and `docker run IMAGE python ...`
# all work: a first argument that is a program on PATH runs as given, anything else goes to histotransfer.
# A program is an executable file on PATH: `command -v` would also name shell builtins, and `export`
# is a histotransfer command.
set -e
is_program() {
    case "$1" in
        */*) [ -f "$1" ] && [ -x "$1" ]; return ;;
    esac
    old_ifs="$IFS"
    IFS=:
    for dir in $PATH; do
        if [ -f "$dir/$1" ] && [ -x "$dir/$1" ]; then
            IFS="$old_ifs"
            return 0
        fi
    done
    IFS="$old_ifs"
    return 1
}
if [ "$#" -gt 0 ] && is_program "$1"; then
    exec "$@"
fi
exec histotransfer "$@"
