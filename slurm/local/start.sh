#!/usr/bin/env bash
# Start a single-host Slurm cluster (munged + slurmctld + slurmd) for tests and development.
#
# Usage: slurm/local/start.sh [STATE_DIR]      (default: $DCLUSTER_SLURM_DIR or /tmp/dcluster-slurm)
#        eval "$(slurm/local/start.sh)"        # sets SLURM_CONF in the calling shell
#
# Needs root on Debian: installs slurm-wlm and munge with apt-get when they are missing.
# Everything it creates (config, munge key and socket, state, spool, logs, pid files) lives in
# STATE_DIR, so a system Slurm or munged on the same host is neither used nor disturbed; only
# the TCP ports are shared (override with DCLUSTER_SLURMCTLD_PORT / DCLUSTER_SLURMD_PORT).
# Re-running while the cluster is up changes nothing. Stop it with slurm/local/stop.sh.
# Only the `export SLURM_CONF=...` line goes to stdout; progress and errors go to stderr.
set -euo pipefail

STATE_DIR=${1:-${DCLUSTER_SLURM_DIR:-/tmp/dcluster-slurm}}
CTLD_PORT=${DCLUSTER_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${DCLUSTER_SLURMD_PORT:-6818}
READY_TIMEOUT_S=60

CONF=$STATE_DIR/slurm.conf
RUN_DIR=$STATE_DIR/run
LOG_DIR=$STATE_DIR/log
# munged runs as the munge user and checks that its key, socket, pid and log paths are not
# writable by anyone else, so it gets a directory of its own owned by munge.
MUNGE_DIR=$STATE_DIR/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
MUNGE_KEY=$MUNGE_DIR/munge.key
MUNGED_PID=$MUNGE_DIR/munged.pid
SLURMCTLD_PID=$RUN_DIR/slurmctld.pid
SLURMD_PID=$RUN_DIR/slurmd.pid

log() { echo "start.sh: $*" >&2; }

# True when PIDFILE names a live process whose command is NAME: a stale pid file whose pid
# was reused by another program must not count as our daemon.
running() {
    local pidfile=$1 name=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/comm && $(</proc/"$pid"/comm) == "$name" ]]
}

tail_logs() {
    local f
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" "$MUNGE_DIR/munged.log"; do
        [[ -f $f ]] && { echo "--- tail of $f" >&2; tail -n 20 "$f" >&2; }
    done
    return 0
}

die() { log "error: $*"; tail_logs; exit 1; }

# The daemons write their pid file shortly after they have forked into the background.
await_pidfile() {
    local pidfile=$1 name=$2 deadline=$(( SECONDS + 15 ))
    until running "$pidfile" "$name"; do
        (( SECONDS < deadline )) || die "$name did not come up (no live pid in $pidfile)"
        sleep 0.2
    done
    log "started $name (pid $(<"$pidfile"))"
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sinfo >/dev/null && command -v munged >/dev/null \
        && command -v mungekey >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || die "slurm-wlm/munge are missing and apt-get is not available (not Debian?)"
    export DEBIAN_FRONTEND=noninteractive
    local pkgs=(slurm-wlm munge)
    log "installing ${pkgs[*]} with apt-get"
    # The package lists are refreshed only when installing from the current ones fails
    # (missing or stale lists): apt-get update is slow and hits the network.
    if ! apt-get install -y -q --no-install-recommends "${pkgs[@]}" >&2; then
        log "install failed with the current package lists; running apt-get update and retrying"
        apt-get update -q >&2
        apt-get install -y -q --no-install-recommends "${pkgs[@]}" >&2
    fi
}

write_conf() {
    local host cpus mem_mib real_mib
    host=$(hostname -s)
    cpus=$(nproc)
    mem_mib=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 ))
    # slurmd drains a node whose RealMemory exceeds what it measures itself, and the
    # kernel's own share varies, so the node declares 10% less than MemTotal.
    real_mib=$(( mem_mib - mem_mib / 10 ))
    cat >"$CONF" <<EOF
# Written by slurm/local/start.sh: a one-host test cluster. Regenerated on every fresh start.
ClusterName=dcluster-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# socket=: our own munged, not the system one. cred_expire=10: a requeued job becomes
# eligible again after about 45 s instead of about 137 s (measured on these machines).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
MpiDefault=none
# No mail on this host; the default MailProg is absent and slurmctld logs an error for it.
MailProg=/bin/true
# No cgroup setup needed on a plain host or in a container.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
# Allocate logical CPUs (not whole cores, so SMT hosts can run one task per CPU) and memory.
SelectTypeParameters=CR_CPU_Memory
# Jobs that ask for no memory get a share per CPU instead of the whole node, so that two
# small jobs can run side by side.
DefMemPerCPU=$(( real_mib / cpus ))
ReturnToService=2
JobRequeue=1
# Look at pending jobs every 5 s (default 60 s, backfill 30 s): a requeued job whose start
# time has come (scontrol update StartTime=...) starts promptly.
SchedulerParameters=sched_interval=5,bf_interval=5
# A requeue or cancel sends SIGTERM, which submitit's tasks ignore (they only log it);
# SIGKILL follows after KillWait, so keep it short for fast requeues in tests.
KillWait=5
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$SLURMCTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mib State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=UNLIMITED State=UP
EOF
    log "wrote $CONF (node $host: $cpus CPUs, ${real_mib} MiB)"
}

start_munged() {
    if running "$MUNGED_PID" munged; then
        log "munged already running (pid $(<"$MUNGED_PID"))"
        return
    fi
    # Readable by all: jobs of non-root users reach the socket from srun inside their job.
    install -d -m 0755 -o munge -g munge "$MUNGE_DIR"
    # A private key: this cluster's credentials are only ever checked by its own munged.
    if [[ ! -s $MUNGE_KEY ]]; then
        runuser -u munge -- mungekey --create --keyfile="$MUNGE_KEY"
    fi
    runuser -u munge -- munged --key-file="$MUNGE_KEY" --socket="$MUNGE_SOCKET" \
        --pid-file="$MUNGED_PID" --log-file="$MUNGE_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" || die "munged failed to start"
    await_pidfile "$MUNGED_PID" munged
    munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET" >/dev/null \
        || die "munged does not answer on $MUNGE_SOCKET"
}

start_slurmctld() {
    if running "$SLURMCTLD_PID" slurmctld; then
        log "slurmctld already running (pid $(<"$SLURMCTLD_PID"))"
        return
    fi
    # -c: start with no jobs, so that jobs left by an unclean stop never run again here.
    slurmctld -c -f "$CONF" || die "slurmctld failed to start"
    await_pidfile "$SLURMCTLD_PID" slurmctld
}

start_slurmd() {
    if running "$SLURMD_PID" slurmd; then
        log "slurmd already running (pid $(<"$SLURMD_PID"))"
        return
    fi
    slurmd -f "$CONF" || die "slurmd failed to start"
    await_pidfile "$SLURMD_PID" slurmd
}

wait_until_ready() {
    local deadline=$(( SECONDS + READY_TIMEOUT_S )) state=""
    while (( SECONDS < deadline )); do
        state=$(SLURM_CONF=$CONF sinfo -h -o %T 2>/dev/null || true)
        # A re-run may find the node busy with jobs: busy counts as up.
        case $state in
            idle | mixed | allocated | completing) return ;;
        esac
        sleep 0.5
    done
    die "node not ready after ${READY_TIMEOUT_S}s (sinfo state: '${state:-none}')"
}

main() {
    [[ $(id -u) -eq 0 ]] || { log "error: must run as root (slurmd and munged need it)"; exit 1; }
    install_packages
    install -d -m 0755 "$STATE_DIR" "$RUN_DIR" "$LOG_DIR" "$STATE_DIR/state" "$STATE_DIR/spool"
    # The config may only change while no Slurm daemon of ours reads it.
    if ! running "$SLURMCTLD_PID" slurmctld && ! running "$SLURMD_PID" slurmd; then
        write_conf
    fi
    start_munged
    start_slurmctld
    start_slurmd
    wait_until_ready
    log "cluster ready ($(SLURM_CONF=$CONF sinfo -h -o '%N %T %c CPUs %m MiB'))"
    echo "export SLURM_CONF=$CONF"
}

main
