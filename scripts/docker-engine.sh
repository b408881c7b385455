#!/usr/bin/env bash
# Makes a Docker engine and a compose implementation available for the compose lab.
#
# Installs Debian's docker.io and docker-compose (compose v1, the only compose that
# Debian 12 packages; the v2 plugin is neither in Debian 12 nor on PyPI) when they are
# missing, then starts dockerd unless one already answers.
#
# Prints one line on stdout, for scripts and tests:
#   started PID   this call started dockerd (stop it with: kill PID)
#   running PID   a dockerd was already running (PID may be "?"); leave it alone
# Everything else goes to stderr. dockerd's log: $MESHLB_DOCKERD_LOG.
set -euo pipefail

LOG=${MESHLB_DOCKERD_LOG:-/var/log/meshlb-dockerd.log}
SOCK=/var/run/docker.sock
WAIT_S=${MESHLB_DOCKERD_WAIT_S:-60}

say() { echo "docker-engine: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  say "must run as root"
  exit 1
fi

missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# Any docker client works against the engine; Debian's is a fallback when none is on PATH.
DOCKER=$(command -v docker || echo /usr/bin/docker)

if "$DOCKER" -H "unix://$SOCK" version >/dev/null 2>&1; then
  pid=$(cat /var/run/docker.pid 2>/dev/null || echo "?")
  say "dockerd already running"
  echo "running $pid"
  exit 0
fi

# A stale pid file from a killed engine makes dockerd refuse to start.
if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
  rm -f /var/run/docker.pid
fi

say "starting dockerd (log: $LOG)"
# setsid: the engine must not die with the caller's terminal or process group; the
# caller stops it by the PID printed below. dockerd runs its own containerd as a child.
setsid dockerd --host "unix://$SOCK" </dev/null >>"$LOG" 2>&1 &
pid=$!

deadline=$((SECONDS + WAIT_S))
until "$DOCKER" -H "unix://$SOCK" version >/dev/null 2>&1; do
  if ! kill -0 "$pid" 2>/dev/null; then
    say "dockerd exited; last lines of $LOG:"
    tail -n 20 "$LOG" >&2
    exit 1
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    say "dockerd did not answer within ${WAIT_S}s; stopping it"
    kill "$pid" 2>/dev/null || true
    tail -n 20 "$LOG" >&2
    exit 1
  fi
  sleep 0.5
done
echo "started $pid"
