#!/usr/bin/env bash
# Install Debian's chromium for the dashboard's browser test (tests/test_dashboard.py drives it with
# playwright-python through executable_path; playwright's own browser download is not used).
# Idempotent: does nothing when /usr/bin/chromium exists. Needs root (or passwordless sudo) and apt;
# without them, install a Chromium and set TRL_TEST_CHROMIUM=/path/to/it.
set -euo pipefail
if [ ! -x /usr/bin/chromium ]; then
  "$(dirname "$0")/apt-install.sh" install-browser chromium
fi
/usr/bin/chromium --version
