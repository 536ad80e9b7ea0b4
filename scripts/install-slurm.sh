#!/usr/bin/env bash
# Install Debian's Slurm and munge for the `slurm` launcher's end-to-end tests (tests/test_slurm.py starts
# munged, slurmctld and two slurmd on this host with a private slurm.conf; nothing here starts a daemon).
# Idempotent: does nothing when the commands exist. Needs root (or passwordless sudo) and apt.
set -euo pipefail
if command -v sbatch >/dev/null && [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && [ -x /usr/sbin/munged ]; then
  echo "slurm already installed: $(command -v sbatch)"
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "install-slurm: no apt-get on this machine; the Slurm tests will be skipped" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "install-slurm: installing Slurm needs root; the Slurm tests will be skipped" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
PACKAGES="slurmctld slurmd slurm-client munge"
$SUDO apt-get install -y -q --no-install-recommends $PACKAGES >/dev/null \
  || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends $PACKAGES >/dev/null; }
echo "slurm installed: $(command -v sbatch)"
