#!/usr/bin/env bash
# Build the local base image for deploy/Dockerfile where no container registry is reachable:
# a Debian bookworm minbase root made by debootstrap from Debian's own package mirror, with
# python3 and python3-venv (3.11 on bookworm, the project's minimum), imported with `podman import`.
#
# Usage: deploy/podman/build-base.sh [IMAGE] [CACHE_DIR]
#   IMAGE      default localhost/balloon-base:bookworm
#   CACHE_DIR  default build/container — the rootfs tarball is cached there, so a second run
#              only re-imports it (seconds) instead of debootstrapping again (minutes).
# Needs root, debootstrap and podman. MIRROR picks a Debian mirror (default: debootstrap's own).
set -euo pipefail
IMAGE=${1:-localhost/balloon-base:bookworm}
CACHE=${2:-build/container}
MIRROR=${MIRROR:-}
SUITE=${SUITE:-bookworm}
TARBALL="$CACHE/base-$SUITE.tar"

if podman image exists "$IMAGE" && [ "${FORCE:-0}" != 1 ]; then
  echo "base image $IMAGE already present"
  exit 0
fi
mkdir -p "$CACHE"
if [ ! -s "$TARBALL" ] || [ "${FORCE:-0}" = 1 ]; then
  root=$(mktemp -d "$CACHE/rootfs.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  echo "debootstrap $SUITE minbase into $root (a few minutes)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$root" ${MIRROR:+"$MIRROR"} >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log"; exit 1; }
  # Keep the image small: package lists, caches and docs are not needed at run time.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
         "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
  tar --numeric-owner -C "$root" -cf "$TARBALL.tmp" .
  mv "$TARBALL.tmp" "$TARBALL"
fi
podman import \
  --change 'CMD ["/bin/bash"]' \
  --change 'ENV LANG=C.UTF-8' \
  "$TARBALL" "$IMAGE" >/dev/null
echo "imported $TARBALL as $IMAGE"
