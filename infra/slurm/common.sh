# Shared settings for infra/slurm/{up,down,status}; sourced, not run.
# Everything lives under one state folder so that `down` can remove it whole and two
# checkouts on one machine can pick different folders and ports.
STATE=${SEERLIKE_SLURM_STATE:-/tmp/seerlike-slurm}
ETC=$STATE/etc
RUN=$STATE/run
LOGS=$STATE/log
CLUSTER=${SEERLIKE_SLURM_CLUSTER:-seerlike}
CTLD_PORT=${SEERLIKE_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SEERLIKE_SLURMD_PORT:-6818}
DBD_PORT=${SEERLIKE_SLURMDBD_PORT:-6819}
DB_PORT=${SEERLIKE_SLURM_DB_PORT:-3307}
MUNGE_SOCKET=$RUN/munge.socket.2
export SLURM_CONF=$ETC/slurm.conf
# The system path, so that `sbatch` finds the config from any shell without SLURM_CONF.
SYSTEM_CONF=/etc/slurm/slurm.conf
# Daemons in start order; `down` stops them in reverse.
DAEMONS="munged mariadbd slurmdbd slurmctld slurmd"

pid_of() {  # the pid recorded for daemon $1 if that process is alive
  local f=$RUN/$1.pid
  [ -s "$f" ] || return 1
  local pid; pid=$(cat "$f")
  kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

log() { echo "[slurm $(date +%H:%M:%S)] $*" >&2; }
