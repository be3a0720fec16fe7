#!/usr/bin/env bash
# install-slurm.sh: Debian's munge + SLURM daemons and clients, for the SLURM tests (needs root).
# The tests start their own private cluster under a temp dir; nothing is started here.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
   && command -v munged >/dev/null; then
  exit 0
fi
# Without systemd the packages' postinst would try to start the daemons: forbid it while installing.
added_policy=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && added_policy=1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null
[ "$added_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
echo "installed munge and SLURM $(sbatch --version)"
