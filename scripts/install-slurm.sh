#!/usr/bin/env bash
# Install Debian's Slurm and munge for the `slurm` launcher's end-to-end tests (tests/test_slurm.py starts
# munged, slurmctld and two slurmd on this host with a private slurm.conf; nothing here starts a daemon).
# Idempotent: does nothing when the commands exist. Needs root (or passwordless sudo) and apt.
set -euo pipefail
if ! { command -v sbatch && [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && [ -x /usr/sbin/munged ]; } >/dev/null; then
  "$(dirname "$0")/apt-install.sh" install-slurm slurmctld slurmd slurm-client munge
fi
echo "slurm: $(command -v sbatch)"
