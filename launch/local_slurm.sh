#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying bloomtrain's SLURM paths without a cluster
# (the tests start it this way). Needs root and Debian's packages:
#     apt-get install slurmctld slurmd slurm-client munge
# Usage: bash launch/local_slurm.sh start|stop|status
# Writes /etc/slurm/slurm.conf naming this host with all its CPUs and 90% of its memory in one
# partition, "local"; starts munged, slurmctld and slurmd; waits until the node takes jobs.
set -euo pipefail
action=${1:-start}
host=$(hostname -s)
conf=/etc/slurm/slurm.conf

write_conf() {
  local cpus memory_mb
  cpus=$(nproc)
  memory_mb=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  cat > "$conf" <<EOF
# Written by bloomtrain's launch/local_slurm.sh: one node, one partition.
ClusterName=bloomtrain-local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=$host CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

node_ready() {
  sinfo --noheader --nodes="$host" --format=%T 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'
}

case "$action" in
  start)
    for tool in munged slurmctld slurmd sinfo; do
      command -v "$tool" >/dev/null || { echo "local_slurm: $tool missing; apt-get install slurmctld slurmd slurm-client munge" >&2; exit 2; }
    done
    [ "$(id -u)" = 0 ] || { echo "local_slurm: must run as root (it starts system daemons)" >&2; exit 2; }
    if node_ready; then echo "local_slurm: already running ($host)"; exit 0; fi
    write_conf
    if ! pgrep -x munged >/dev/null; then
      mkdir -p /run/munge && chown munge:munge /run/munge
      runuser -u munge -- munged 2>/dev/null || munged --force 2>/dev/null
    fi
    pgrep -x slurmctld >/dev/null || slurmctld
    pgrep -x slurmd >/dev/null || slurmd
    for _ in $(seq 60); do
      node_ready && { echo "local_slurm: node $host ready, partition 'local'"; exit 0; }
      scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
      sleep 1
    done
    echo "local_slurm: node did not become ready; see /var/log/slurm/*.log" >&2
    sinfo >&2 || true
    exit 1
    ;;
  stop)
    pkill -x slurmd || true
    pkill -x slurmctld || true
    ;;
  status)
    sinfo
    ;;
  *)
    echo "usage: $0 start|stop|status" >&2
    exit 2
    ;;
esac
