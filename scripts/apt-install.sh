#!/usr/bin/env bash
# apt-install.sh WHAT PACKAGE...: install Debian packages for a test (apt-get, as root or with passwordless
# sudo; `apt-get update` first only if the package lists are stale). Exits 1 saying why when it cannot.
set -euo pipefail
what=$1; shift
if ! command -v apt-get >/dev/null; then
  echo "$what: no apt-get on this machine; install $* yourself" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "$what: installing $* needs root (apt-get install -y $*)" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q --no-install-recommends "$@" >/dev/null \
  || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends "$@" >/dev/null; }
