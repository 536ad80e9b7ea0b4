#!/usr/bin/env bash
# Install Debian's chromium for the dashboard's browser test (tests/test_dashboard.py drives it with
# playwright-python through executable_path; playwright's own browser download is not used).
# Idempotent: does nothing when /usr/bin/chromium exists. Needs root (or passwordless sudo) and apt.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  echo "chromium already installed: $(/usr/bin/chromium --version 2>/dev/null || echo /usr/bin/chromium)"
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "install-browser: no apt-get on this machine; install a Chromium and set TRL_TEST_CHROMIUM=/path/to/it" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "install-browser: installing chromium needs root (apt-get install -y chromium)" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y chromium || { $SUDO apt-get update && $SUDO apt-get install -y chromium; }
/usr/bin/chromium --version
