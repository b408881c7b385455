#!/usr/bin/env bash
# Prepares what an offline build of the compose lab's image (compose/Dockerfile) needs
# from outside, on a host where no image registry is reachable:
#
#   1. the base image meshlb-base:bookworm: a Debian 12 root file system made with
#      debootstrap from the Debian mirror apt already uses, imported with `docker import`.
#      It carries Python 3.11 and the run-time tools of a mix and a client.
#   2. the wheelhouse build/compose-wheels/: wheels of meshlb's Python dependencies (and
#      of its build backend), fetched by the host's pip, so that the image build never
#      needs the network. Debian 12's python3-cryptography and python3-prometheus-client
#      are older than pyproject.toml requires, hence wheels rather than apt packages.
#
# Both steps are skipped when already done (the image exists; the wheelhouse was filled
# for the current pyproject.toml). Options: --wheels-only, --image-only.
# Environment: MESHLB_BASE_IMAGE (default meshlb-base:bookworm), MESHLB_DEBIAN_MIRROR
# (default: the first http(s) mirror for bookworm in apt's sources).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${MESHLB_BASE_IMAGE:-meshlb-base:bookworm}
SUITE=bookworm
WHEELS=build/compose-wheels
PY=${PYTHON:-python3}
# python3-pip only for a human's `pip list` inside a container; the image installs with it.
PACKAGES=python3,python3-pip,iproute2,libbpf1,curl,apache2-utils,ca-certificates,ethtool,procps,iputils-ping,kmod,tini

do_image=1
do_wheels=1
case "${1:-}" in
  --wheels-only) do_image=0 ;;
  --image-only) do_wheels=0 ;;
  "") ;;
  *) echo "usage: $0 [--wheels-only|--image-only]" >&2; exit 2 ;;
esac

say() { echo "docker-base: $*" >&2; }

debian_mirror() {
  if [ -n "${MESHLB_DEBIAN_MIRROR:-}" ]; then
    echo "$MESHLB_DEBIAN_MIRROR"
    return
  fi
  local uri
  # deb822 sources (*.sources): a stanza with a bookworm suite and a URIs line
  uri=$(awk -v s="$SUITE" '
      /^URIs:/ { u = $2 }
      /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == s) found = u }
      /^$/ { u = "" }
      END { print found }' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)
  if [ -z "$uri" ]; then
    # one-line sources: "deb [opts] URI bookworm main ..."
    uri=$(grep -hE "^deb[[:space:]].*[[:space:]]${SUITE}[[:space:]].*main" \
            /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
          | sed -E 's/\[[^]]*\]//' | awk '{print $2}' | grep -E '^https?://' | head -n1 || true)
  fi
  echo "${uri:-http://deb.debian.org/debian}"
}

build_image() {
  if ! docker version >/dev/null 2>&1; then
    say "no Docker engine answers; start one first (scripts/docker-engine.sh)"
    exit 1
  fi
  if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    say "$IMAGE exists; skipping debootstrap"
    return
  fi
  if ! command -v debootstrap >/dev/null 2>&1; then
    say "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >&2 \
      || { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >&2; }
  fi
  local mirror start
  mirror=$(debian_mirror)
  # global, not local: the EXIT trap runs after this function has returned
  ROOTFS=$(mktemp -d /var/tmp/meshlb-rootfs.XXXXXX)
  local root=$ROOTFS
  # the rootfs holds device nodes and mounts while debootstrap runs: never leave it behind
  trap 'umount -R "$ROOTFS"/proc "$ROOTFS"/sys 2>/dev/null || true; rm -rf --one-file-system "$ROOTFS"' EXIT
  start=$SECONDS
  say "debootstrap $SUITE from $mirror into $root (a few minutes)"
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$mirror" >&2
  # what a container never needs: package caches, docs, apt lists
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
         "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/locale/*
  echo "deb $mirror $SUITE main" > "$root/etc/apt/sources.list"
  # containers get their resolver and hosts from the engine
  : > "$root/etc/resolv.conf"
  say "importing $IMAGE"
  tar --numeric-owner -C "$root" -c . | docker import \
      -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
      -c 'ENV LANG=C.UTF-8' \
      -c 'CMD ["/bin/bash"]' \
      -m "debootstrap --variant=minbase $SUITE ($PACKAGES)" - "$IMAGE" >&2
  say "built $IMAGE in $((SECONDS - start)) s"
}

fill_wheelhouse() {
  local stamp="$WHEELS/.pyproject.sha256" want
  want=$(sha256sum pyproject.toml | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    say "$WHEELS is up to date; skipping pip download"
    return
  fi
  mkdir -p "$WHEELS"
  # The project's run-time dependencies and its build backend, read from pyproject.toml.
  "$PY" - > "$WHEELS/requirements.txt" <<'EOF'
import tomllib
with open("pyproject.toml", "rb") as f:
    meta = tomllib.load(f)
for req in meta["build-system"]["requires"] + meta["project"]["dependencies"]:
    print(req)
EOF
  say "pip download into $WHEELS: $(tr '\n' ' ' < "$WHEELS/requirements.txt")"
  # Binary wheels only: the image has no compiler. Tags are those of CPython 3.11 on
  # glibc, which both Debian 12's python3 and python:3.11-slim-bookworm are.
  "$PY" -m pip download -q --disable-pip-version-check --only-binary=:all: \
      --python-version 3.11 --implementation cp --platform "manylinux2014_$(uname -m)" \
      --platform "manylinux_2_28_$(uname -m)" --platform "manylinux_2_34_$(uname -m)" \
      -d "$WHEELS" -r "$WHEELS/requirements.txt" >&2
  echo "$want" > "$stamp"
}

[ "$do_wheels" = 1 ] && fill_wheelhouse
[ "$do_image" = 1 ] && build_image
exit 0
