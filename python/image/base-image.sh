#!/usr/bin/env bash
# The backend image's base, made from Debian's packages: no container registry is needed.
#
#   python/image/base-image.sh        # prints the base image's tag (builds it first if absent)
#
# debootstrap (minbase, plus Python and CA certificates) into a temporary folder, then
# `docker import`. The tag carries a hash of this script, which holds every input (suite,
# packages, import options): an unchanged script reuses the image already there, an edited
# one builds a new base and drops the older ones. Needs root (debootstrap) and debootstrap
# itself (`apt-get install debootstrap`). The mirror is the one apt uses here (override
# with DEBIAN_MIRROR). Everything but the tag goes to stderr.
#
# The local base carries Debian's Python (3.11 on bookworm); hosted CI and users build on
# python:3.12-slim instead (make image BASE_IMAGE=python:3.12-slim). Both are supported.
set -euo pipefail

SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates
REPOSITORY=junjo-backend-base
HASH_LABEL=org.junjo-backend.base.inputs

log() { printf 'base-image: %s\n' "$*" >&2; }

inputs_hash=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)
tag="$REPOSITORY:$SUITE-$inputs_hash"

if docker image inspect "$tag" >/dev/null 2>&1; then
  log "$tag is already built (inputs unchanged)"
  echo "$tag"
  exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
  log "building $tag needs root (debootstrap); run it as root, or set BASE_IMAGE=python:3.12-slim"
  exit 1
fi
if ! command -v debootstrap >/dev/null 2>&1; then
  log "debootstrap is missing: apt-get install -y debootstrap"
  exit 1
fi

# The Debian mirror apt already uses here (not the security one), else Debian's own.
mirror=${DEBIAN_MIRROR:-}
if [[ -z $mirror ]]; then
  mirror=$(apt-get indextargets --format '$(REPO_URI)' 'Created-By: Packages' 2>/dev/null \
    | grep -E '/debian/?$' | head -n 1 || true)
  mirror=${mirror:-http://deb.debian.org/debian}
fi

rootfs=$(mktemp -d /var/tmp/junjo-base-XXXXXX)
trap 'rm -rf "$rootfs"' EXIT

log "debootstrap $SUITE ($PACKAGES) from $mirror"
started=$SECONDS
if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$mirror" \
  >"$rootfs.log" 2>&1; then
  tail -n 30 "$rootfs.log" >&2
  rm -f "$rootfs.log"
  log "debootstrap failed"
  exit 1
fi
rm -f "$rootfs.log"
# What an image does not need: downloaded packages and package lists.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/*

log "docker import as $tag"
tar -C "$rootfs" --numeric-owner -c . | docker import \
  --change "LABEL $HASH_LABEL=$inputs_hash" \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  --message "debootstrap --variant=minbase --include=$PACKAGES $SUITE" \
  - "$tag" >/dev/null
log "built $tag in $((SECONDS - started)) s"

# Bases made from an older version of this script: untag them (an image still built on
# one keeps its layers).
for old in $(docker image ls --format '{{.Repository}}:{{.Tag}}' "$REPOSITORY"); do
  if [[ $old != "$tag" ]]; then
    docker image rm "$old" >/dev/null 2>&1 || true
  fi
done
echo "$tag"
