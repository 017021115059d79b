#!/usr/bin/env bash
# Stop the single-host Slurm cluster that slurm/local/start.sh started.
#
# Usage: slurm/local/stop.sh [STATE_DIR]       (default: $DCLUSTER_SLURM_DIR or /tmp/dcluster-slurm)
#
# Cancels the cluster's jobs first, so that no job step outlives slurmd, then ends exactly the
# daemons named by start.sh's pid files (TERM, a bounded wait, then KILL). Any other Slurm or
# munged on the host is left alone. Running it when nothing is up is fine.
set -euo pipefail

STATE_DIR=${1:-${DCLUSTER_SLURM_DIR:-/tmp/dcluster-slurm}}
CONF=$STATE_DIR/slurm.conf
JOBS_GONE_TIMEOUT_S=30
TERM_TIMEOUT_S=15

log() { echo "stop.sh: $*" >&2; }

# Prints the pid in PIDFILE when it names a live process whose command is NAME: a stale
# pid file whose pid was reused by another program must never get that program killed.
live_pid() {
    local pidfile=$1 name=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/comm && $(</proc/"$pid"/comm) == "$name" ]] || return 1
    echo "$pid"
}

cancel_jobs() {
    live_pid "$STATE_DIR/run/slurmctld.pid" slurmctld >/dev/null || return 0
    export SLURM_CONF=$CONF
    scancel --user root || log "scancel failed; stopping the daemons anyway"
    local deadline=$(( SECONDS + JOBS_GONE_TIMEOUT_S ))
    # squeue lists pending, running and completing jobs by default: wait until none is left.
    while [[ -n $(squeue -h -o %i 2>/dev/null || true) ]]; do
        if (( SECONDS >= deadline )); then
            log "jobs still listed after ${JOBS_GONE_TIMEOUT_S}s; stopping the daemons anyway"
            return 0
        fi
        sleep 0.5
    done
}

stop_daemon() {
    local pidfile=$1 name=$2 pid deadline
    if pid=$(live_pid "$pidfile" "$name"); then
        kill -TERM "$pid"
        deadline=$(( SECONDS + TERM_TIMEOUT_S ))
        while [[ -d /proc/$pid ]] && (( SECONDS < deadline )); do
            sleep 0.2
        done
        if [[ -d /proc/$pid ]]; then
            log "$name (pid $pid) still running after ${TERM_TIMEOUT_S}s; sending KILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        log "stopped $name (pid $pid)"
    fi
    rm -f "$pidfile"
}

[[ $(id -u) -eq 0 ]] || { log "error: must run as root"; exit 1; }
cancel_jobs
# slurmd before slurmctld so the controller does not mark the node down while it stops;
# munged last because both Slurm daemons authenticate through it until they are gone.
stop_daemon "$STATE_DIR/run/slurmd.pid" slurmd
stop_daemon "$STATE_DIR/run/slurmctld.pid" slurmctld
stop_daemon "$STATE_DIR/munge/munged.pid" munged
