#!/usr/bin/env bash
# Build a Debian bookworm base image locally, for machines that reach Debian's package mirror but no
# container registry:
#
#   bash docker/base-image.sh [TAG]          (default TAG: pdserve-base:bookworm; needs root)
#   PDSERVE_PYTHON_IMAGE=pdserve-base:bookworm docker compose -f docker/compose.yaml build
#
# What it holds is what docker/Dockerfile.cpu needs from its base (the python:3.11-slim image
# otherwise): Debian's python3 (3.11) with the venv module, and useradd. debootstrap's minbase
# variant plus those, with apt's caches, documentation and locales removed (~130 MB), then
# `docker import`. The tag is the cache: when it exists nothing is done (`docker rmi TAG` to rebuild).
#
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail
tag=${1:-pdserve-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if docker image inspect "$tag" >/dev/null 2>&1; then
    echo "base-image.sh: $tag is present"
    exit 0
fi
[ "$(id -u)" = 0 ] || { echo "base-image.sh: debootstrap needs root" >&2; exit 1; }
if ! command -v debootstrap >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends debootstrap >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends debootstrap >/dev/null; }
fi

work=$(mktemp -d /var/tmp/pdserve-base.XXXXXX)
trap 'rm -rf "$work"' EXIT
echo "base-image.sh: debootstrap bookworm from $mirror (log: $work/debootstrap.log)"
if ! timeout 900 debootstrap --variant=minbase --include=python3,python3-venv,passwd \
        bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1; then
    tail -20 "$work/debootstrap.log" >&2
    exit 1
fi
rootfs=$work/rootfs
rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* "$rootfs"/tmp/*
# What a registry image carries in its config and `docker import` does not: PATH, a UTF-8 locale.
tar -C "$rootfs" --numeric-owner -c . | timeout 300 docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "debootstrap --variant=minbase bookworm + python3, python3-venv, passwd" \
    - "$tag" >/dev/null
echo "base-image.sh: built $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%d MB", $1/1e6}'))"
