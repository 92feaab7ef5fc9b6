#!/usr/bin/env bash
# System packages the tests drive for real: OpenMPI (mpirun) and a one-node SLURM cluster
# (slurmctld, slurmd, the client tools, munge; tests/helpers/slurm_cluster.py configures and starts it
# per test session). Idempotent; needs root and Debian's apt. Without root it says what is
# missing and the tests needing it are skipped with that reason.
set -euo pipefail
need=()
command -v mpirun >/dev/null 2>&1 || need+=(openmpi-bin libopenmpi-dev)
command -v slurmctld >/dev/null 2>&1 || [ -x /usr/sbin/slurmctld ] || need+=(slurmctld)
command -v slurmd >/dev/null 2>&1 || [ -x /usr/sbin/slurmd ] || need+=(slurmd)
command -v sbatch >/dev/null 2>&1 || need+=(slurm-client)
command -v munged >/dev/null 2>&1 || [ -x /usr/sbin/munged ] || need+=(munge)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_system_deps: not root or no apt-get; missing: ${need[*]} (tests needing them skip)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
# policy-rc.d keeps the packages' init scripts from starting daemons (the tests start their own)
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
