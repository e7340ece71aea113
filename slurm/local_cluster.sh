#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for testing the templates in slurm/ (and for CI).
#
#   slurm/local_cluster.sh start    install munge + slurm where missing (Debian, as root), write a
#                                   minimal slurm.conf for this node, start munged, slurmctld, slurmd
#   slurm/local_cluster.sh status   print the daemons' state and `sinfo`; exit 0 only when the node is up
#   slurm/local_cluster.sh stop     stop the daemons this script started
#
# Idempotent: `start` on a running cluster only checks it; `stop` on a stopped one does nothing.
# Overrides: CDMPI_SLURM_STATE (state, spool and log files; default /var/tmp/cdmpi-slurm),
# CDMPI_SLURM_CONF (default /etc/slurm/slurm.conf; a slurm.conf not written by this script is never
# replaced), CDMPI_SLURM_INSTALL=0 (never run apt-get; fail if the packages are missing).
# The node uses proctrack/linuxproc and task/none, so it needs no cgroups or systemd (containers work).
set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then sed -n '2,/^set -euo/{/^#SBATCH/{p;d};/^#/s/^# \{0,1\}//p}' "$0"; exit 0; fi

STATE=${CDMPI_SLURM_STATE:-/var/tmp/cdmpi-slurm}
CONF=${CDMPI_SLURM_CONF:-/etc/slurm/slurm.conf}
INSTALL=${CDMPI_SLURM_INSTALL:-1}
MARKER="# written by cdmpi slurm/local_cluster.sh"
PACKAGES=(munge slurmctld slurmd slurm-client)
NODE=$(hostname -s)

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

have_packages() { command -v munged && command -v slurmctld && command -v slurmd && command -v sbatch; } >/dev/null

install_packages() {
    have_packages && return 0
    [[ $INSTALL == 1 ]] || die "munge/slurm are not installed and CDMPI_SLURM_INSTALL=0"
    [[ $(id -u) == 0 ]] || die "munge/slurm are not installed; installing them needs root"
    command -v apt-get >/dev/null || die "munge/slurm are not installed and there is no apt-get (not Debian)"
    echo "local_cluster.sh: installing ${PACKAGES[*]}"
    # Packages must not try to start their services here (no init system in containers): policy-rc.d says no.
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e $policy ]]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; created_policy=1; fi
    export DEBIAN_FRONTEND=noninteractive
    local rc=0
    { apt-get update -q && apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"; } >/dev/null || rc=$?
    [[ $created_policy == 1 ]] && rm -f "$policy"
    [[ $rc == 0 ]] && have_packages || die "installing ${PACKAGES[*]} failed"
}

write_conf() {
    if [[ -e $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; set CDMPI_SLURM_CONF to use another path"
    fi
    mkdir -p "$(dirname "$CONF")" "$STATE/ctld" "$STATE/spool" "$STATE/log"
    local conf
    conf=$(cat <<EOF
$MARKER; regenerated on every start
ClusterName=cdmpi
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again 5 s after it stopped (the default waits 120 s).
AuthInfo=cred_expire=5
# Containers have no usable cgroups: track processes by parent id, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Look at pending jobs every second: a requeued job otherwise waits for the next backfill pass (30 s).
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
JobRequeue=1
ReturnToService=2
KillWait=30
MinJobAge=600
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
)
    [[ -e $CONF && $(cat "$CONF") == "$conf" ]] || printf '%s\n' "$conf" > "$CONF"
}

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
    [[ -s /etc/munge/munge.key ]] || {
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key
        else dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; fi
    }
    local user=munge
    id -u munge >/dev/null 2>&1 || user=root
    mkdir -p "$STATE" /run/munge /var/log/munge /var/lib/munge
    chown "$user" /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
    chmod 0400 /etc/munge/munge.key
    chmod 0755 /run/munge
    if [[ $user == munge ]]; then runuser -u munge -- munged; else munged --force; fi
    touch "$STATE/munged.ours"
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    die "munged did not start (see /var/log/munge/munged.log)"
}

node_up() { sinfo -h -N -n "$NODE" -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc|comp)'; }

start() {
    install_packages
    write_conf
    start_munge
    pid_alive "$STATE/slurmctld.pid" || slurmctld -f "$CONF"
    pid_alive "$STATE/slurmd.pid" || slurmd -f "$CONF"
    for _ in $(seq 60); do
        if node_up; then echo "local_cluster.sh: node $NODE is up ($(nproc) CPUs), conf $CONF, logs $STATE/log"; return 0; fi
        sleep 0.5
    done
    # A node left DOWN/DRAIN by an earlier unclean stop comes back with a resume.
    scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
    for _ in $(seq 20); do node_up && return 0; sleep 0.5; done
    sinfo -N >&2 || true
    die "node $NODE did not come up; see $STATE/log/slurmctld.log and $STATE/log/slurmd.log"
}

stop_daemon() {  # name pidfile
    pid_alive "$2" || return 0
    local pid
    pid=$(cat "$2")
    kill -TERM "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
}

stop() {
    if command -v scancel >/dev/null && pid_alive "$STATE/slurmctld.pid"; then
        scancel --full --quiet --nodelist="$NODE" 2>/dev/null || true  # no job outlives the cluster
        # Wait until the node has no jobs left (processes of a killed job take a moment to go).
        for _ in $(seq 30); do [[ -z $(squeue -h -w "$NODE" 2>/dev/null) ]] && break; sleep 0.5; done
    fi
    stop_daemon slurmd "$STATE/slurmd.pid"
    stop_daemon slurmctld "$STATE/slurmctld.pid"
    # A munged that was running before `start` is left alone; the one this script started goes.
    if [[ -e $STATE/munged.ours ]]; then
        stop_daemon munged /run/munge/munged.pid
        rm -f "$STATE/munged.ours"
    fi
    echo "local_cluster.sh: stopped"
}

status() {
    local ok=0
    pid_alive "$STATE/slurmctld.pid" && echo "slurmctld: running" || { echo "slurmctld: stopped"; ok=1; }
    pid_alive "$STATE/slurmd.pid" && echo "slurmd: running" || { echo "slurmd: stopped"; ok=1; }
    if [[ $ok == 0 ]]; then sinfo -N; node_up || ok=1; fi
    return $ok
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
