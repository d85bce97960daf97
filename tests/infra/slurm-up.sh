#!/usr/bin/env bash
# usage: slurm-up.sh [N]   a Slurm cluster on test hosts h1..hN (default: every host; needs
# hosts-up.sh first); idempotent
#
# slurmctld runs on h1, one slurmd on each of those hosts (NodeName = its hostname hK, CPUs =
# $DSL_SLURM_CPUS, default 2, so `srun -n 4` on 2 hosts places 2 tasks per host), one munged in
# the root namespace (its unix socket is reached from every host through the shared /tmp).
# Clients need the config:  export SLURM_CONF=$DSL_STATE/slurm/slurm.conf, and must run inside a
# test host (tests/infra/onhost h1 srun ...): slurmctld listens on h1's address only.
set -euo pipefail
# shellcheck source=tests/infra/lib.sh
. "$(dirname "$0")/lib.sh"
need_root
need_cmd /usr/sbin/slurmctld slurmctld
need_cmd /usr/sbin/slurmd slurmd
need_cmd srun slurm-client
need_cmd /usr/sbin/munged munge
need_cmd mungekey munge
take_lock

HOSTS=$(host_count)
[ "$HOSTS" -ge 1 ] || die "no test hosts: run tests/infra/hosts-up.sh first"
N=${1:-$HOSTS}
[[ $N =~ ^[1-9][0-9]?$ ]] && [ "$N" -le "$HOSTS" ] || die "N must be 1..$HOSTS (the hosts that are up), got '$N'"
CPUS=${DSL_SLURM_CPUS:-2}
S=$DSL_STATE/slurm
M=$DSL_STATE/munge
export SLURM_CONF=$S/slurm.conf

all_up() {
  local k
  [ -f "$S/up" ] && [ "$(cat "$S/up")" = "$N $CPUS" ] || return 1
  pid_alive "$M/munged.pid" munged && pid_alive "$S/run/slurmctld.pid" slurmctld || return 1
  for k in $(seq 1 "$N"); do pid_alive "$S/run/slurmd-h$k.pid" slurmd || return 1; done
}
if all_up; then
  note "Slurm already up on h1..h$N (SLURM_CONF=$SLURM_CONF)"
  exit 0
fi
slurm_teardown

# munged with its own key and socket; the socket's directory must be world-executable
mkdir -p "$M" && chmod 755 "$M"
[ -s "$M/munge.key" ] || mungekey -c -k "$M/munge.key"
# 9>&- here and below: a daemon must not inherit the lock's descriptor (it would hold the lock for life)
"${DSL_CLEAN_ENV[@]}" /usr/sbin/munged 9>&- --key-file="$M/munge.key" --socket="$M/munge.sock" \
  --pid-file="$M/munged.pid" --log-file="$M/munged.log" --seed-file="$M/munged.seed" \
  || die "munged did not start: $(tail -n 3 "$M/munged.log" 2>/dev/null)"

rm -rf "$S/state" "$S"/spool-* "$S"/tmp-*  # a fresh cluster every time
mkdir -p "$S/state" "$S/log" "$S/run"
{
  echo "# written by tests/infra/slurm-up.sh: slurmctld on h1, one slurmd per test host"
  echo "SlurmctldHost=h1($DSL_NET.1)"
  for k in $(seq 1 "$N"); do
    echo "NodeName=h$k NodeAddr=$DSL_NET.$k CPUs=$CPUS RealMemory=1000 State=UNKNOWN"
    mkdir -p "$S/spool-h$k" "$S/tmp-h$k"
  done
  cat <<CONF
ClusterName=dslaunch
MailProg=/bin/true
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$M/munge.sock
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool-%n
TmpFS=$S/tmp-%n
SlurmctldPidFile=$S/run/slurmctld.pid
SlurmdPidFile=$S/run/slurmd-%n.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd-%n.log
# no cgroups needed: plain /proc tracking, no task plugin, no accounting
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# CPUs= may differ from the real core count without draining the node
SlurmdParameters=config_overrides
KillWait=2
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
} >"$SLURM_CONF"

onhost h1 "${DSL_CLEAN_ENV[@]}" /usr/sbin/slurmctld -f "$SLURM_CONF" 9>&-
for k in $(seq 1 "$N"); do
  onhost "h$k" "${DSL_CLEAN_ENV[@]}" /usr/sbin/slurmd -f "$SLURM_CONF" 9>&-  # NodeName from the hostname
done

# wait until every node is idle (< 1 s when all is well)
st=
for _ in $(seq 1 60); do
  st=$(cd / && onhost h1 sinfo -h -o %t 2>/dev/null | sort -u | tr '\n' ' ')
  [ "$st" = "idle " ] && break
  sleep 0.5
done
[ "$st" = "idle " ] || die "Slurm nodes not idle after 30 s (state: '${st:-none}'); logs in $S/log"
echo "$N $CPUS" >"$S/up"
note "Slurm up: slurmctld on h1, slurmd on h1..h$N, $CPUS CPUs each (SLURM_CONF=$SLURM_CONF)"
