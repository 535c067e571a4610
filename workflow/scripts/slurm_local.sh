#!/usr/bin/env bash
# Start a real one-node SLURM cluster on this machine (munge + slurmctld + slurmd), for running the
# pipeline through `snakemake --profile workflow/profiles/slurm`. Debian packages: slurm-wlm, munge.
#   bash workflow/scripts/slurm_local.sh start|stop|status
# Accounting is off (no slurmdbd): the Snakemake SLURM executor queries job status with squeue, which
# is reliable because MinJobAge keeps finished jobs visible for an hour.
set -euo pipefail
cmd=${1:-start}
STATE=${SLURM_LOCAL_DIR:-/var/tmp/rex-slurm}
CONF=/etc/slurm/slurm.conf
host=$(hostname -s)

install_pkgs() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    (apt-get install -y -q slurm-wlm munge >/dev/null 2>&1) || \
      (apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm munge >/dev/null) || {
        echo "slurm: could not install slurm-wlm + munge (apt-get); install them and rerun" >&2
        exit 3
      }
  fi
}

write_conf() {
  mkdir -p "$STATE"/{state,spool,log} /etc/slurm /run/munge /var/log/munge /var/lib/munge
  local mem_mb
  mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  cat > "$CONF" <<CONF
ClusterName=rexlocal
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MinJobAge=3600
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
NodeName=$host CPUs=$(nproc) RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  rm -f /etc/slurm/cgroup.conf  # containers have no usable cgroups: proctrack/linuxproc + task/none need none
}

start() {
  install_pkgs
  write_conf
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  fi
  chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged 2>/dev/null || /usr/sbin/munged --force
  pgrep -x slurmctld >/dev/null || slurmctld -c
  pgrep -x slurmd >/dev/null || slurmd -c
  for _ in $(seq 1 60); do
    if sinfo -h -o "%T" 2>/dev/null | grep -qE "^idle"; then
      echo "slurm: up"; sinfo; return 0
    fi
    scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  echo "slurm: node did not become idle; logs in $STATE/log" >&2
  sinfo >&2 || true
  tail -20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
  return 1
}

stop() {
  pkill -x slurmd || true
  pkill -x slurmctld || true
  echo "slurm: stopped"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status) sinfo; squeue ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
