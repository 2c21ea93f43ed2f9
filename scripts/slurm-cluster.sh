#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests of the slurm profile.
#   scripts/slurm-cluster.sh start    install (apt) if needed, start munged + slurmctld + slurmd, wait for idle
#   scripts/slurm-cluster.sh stop     stop the daemons this script started (pid files in the state dir)
#   scripts/slurm-cluster.sh status   sinfo; exit 0 when the controller answers and the node is usable
# Needs root (it writes /etc/slurm/slurm.conf and starts daemons). State, spool, logs and pid files live
# in $MOA_SLURM_DIR (default /tmp/moa-slurm); $MOA_SLURM_TIMEOUT (default 60 s) bounds the wait for idle.
set -euo pipefail

STATE=${MOA_SLURM_DIR:-/tmp/moa-slurm}
TIMEOUT=${MOA_SLURM_TIMEOUT:-60}
CONF=/etc/slurm/slurm.conf
MARKER="# Written by moa scripts/slurm-cluster.sh"
NODE=$(hostname -s)

log() { echo "slurm-cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

# The pid in a pid file, if that process is alive and is the named program (guards against pid reuse).
live_pid() {
    local file=$1 name=$2 pid
    [ -s "$file" ] || return 1
    pid=$(cat "$file")
    [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$name" ] || return 1
    echo "$pid"
}

node_state() { sinfo -h -N -n "$NODE" -o '%T' 2>/dev/null | head -n1; }

# Up = the controller and this node's slurmd answer, and the node can take jobs (idle, or busy with
# some). slurmd is asked directly: slurmctld notices a dead slurmd only after SlurmdTimeout (300 s).
cluster_up() {
    scontrol ping 2>/dev/null | grep -q 'is UP' || return 1
    scontrol show slurmd >/dev/null 2>&1 || return 1
    case "$(node_state)" in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

install_slurm() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return
    [ "$(id -u)" -eq 0 ] || die "slurmctld/slurmd/munged are missing and installing them needs root"
    log "installing slurm-wlm and munge with apt-get"
    # Keep the packages' init scripts from starting daemons: this script owns their lifecycle.
    local policy=/usr/sbin/policy-rc.d added=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
    [ "$added" -eq 1 ] && rm -f "$policy"
    return 0
}

start_munge() {
    # An already working munged (ours or the system's) is reused: slurm only needs the socket.
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    local key=/etc/munge/munge.key
    if [ ! -s "$key" ]; then
        log "creating $key"
        mkdir -p /etc/munge
        dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
    fi
    # munged refuses a key or directories that others can read or write, and must own its key.
    chown munge:munge /etc/munge "$key"
    chmod 0700 /etc/munge
    chmod 0400 "$key"
    # /run is a tmpfs: the socket directory is gone after a reboot or in a fresh container.
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 "$STATE/munge"
    rm -f "$STATE/munge/munged.pid"
    # munged runs as the munge user (it will not trust a root-run daemon with a munge-owned key).
    runuser -u munge -- munged --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munge/munged.log" \
        --seed-file="$STATE/munge/munged.seed" </dev/null >/dev/null 2>&1 \
        || die "munged failed to start: $(tail -n 20 "$STATE/munge/munged.log" 2>/dev/null)"
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    die "munged does not answer: $(tail -n 20 "$STATE/munge/munged.log" 2>/dev/null)"
}

write_conf() {
    local cpus mem_mb
    cpus=$(nproc)
    # RealMemory must not exceed what slurmd detects, or the node is drained; leave headroom for the OS.
    mem_mb=$(awk '/^MemTotal:/ {m = int($2 / 1024); h = int(m / 10); if (h < 512) h = 512; m -= h; if (m < 256) m = 256; print m}' /proc/meminfo)
    mkdir -p /etc/slurm
    if [ -e "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
        log "keeping the existing $CONF as $CONF.moa-backup"
        mv "$CONF" "$CONF.moa-backup"
    fi
    cat >"$CONF" <<EOF
$MARKER for a single-node test cluster.
ClusterName=moa
# The node talks to itself over loopback, so no DNS entry for the hostname is needed.
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
SwitchType=switch/none
# cgroup-free, so it also works in containers without a writable cgroup hierarchy.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No slurmdbd: the snakemake slurm plugin then queries job status with squeue.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# Finished jobs stay in squeue for a day, so squeue-based status never misses a completion.
MinJobAge=86400
# A node that went down (e.g. the daemons were stopped) comes back as soon as slurmd registers.
ReturnToService=2
# Per-CPU allocation: several 1-CPU jobs share the node; memory is a consumable too.
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=256
# Trust this file over detected hardware (containers may see more cores than nproc grants).
SlurmdParameters=config_overrides
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

tails() {
    local f
    for f in "$STATE/slurmctld.log" "$STATE/slurmd.log" "$STATE/munge/munged.log"; do
        [ -e "$f" ] && { echo "==> $f <=="; tail -n 25 "$f"; }
    done
    sinfo -N -l 2>&1 || true
}

start() {
    if cluster_up; then
        log "already up"
        sinfo
        return
    fi
    install_slurm
    [ "$(id -u)" -eq 0 ] || die "starting the cluster needs root"
    mkdir -p "$STATE/ctld" "$STATE/d"
    start_munge
    # Rewrite the config only while no daemon of ours reads it.
    if ! live_pid "$STATE/slurmctld.pid" slurmctld >/dev/null && ! live_pid "$STATE/slurmd.pid" slurmd >/dev/null; then
        write_conf
    fi
    # Both daemonize and write their pid files; stdio to the log so a caller's pipes are not held open.
    live_pid "$STATE/slurmctld.pid" slurmctld >/dev/null || slurmctld </dev/null >>"$STATE/slurmctld.log" 2>&1
    live_pid "$STATE/slurmd.pid" slurmd >/dev/null || slurmd -N "$NODE" </dev/null >>"$STATE/slurmd.log" 2>&1
    local deadline=$((SECONDS + TIMEOUT)) resumed=0 state
    until cluster_up; do
        state=$(node_state)
        # A node drained or down from an earlier run (state is saved) is put back into service once.
        if [ "$resumed" -eq 0 ] && [[ $state == drain* || $state == down* ]]; then
            scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
            resumed=1
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            log "node $NODE not idle after ${TIMEOUT}s (state: ${state:-no answer}); logs:"
            tails >&2
            exit 1
        fi
        sleep 0.5
    done
    sinfo
}

stop_one() {
    local file=$1 name=$2 pid
    pid=$(live_pid "$file" "$name") || { rm -f "$file"; return 0; }
    kill "$pid"
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$file"; return 0; }
        sleep 0.1
    done
    log "$name ($pid) ignored SIGTERM for 10 s; sending SIGKILL"
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$file"
}

stop() {
    stop_one "$STATE/slurmd.pid" slurmd
    stop_one "$STATE/slurmctld.pid" slurmctld
    stop_one "$STATE/munge/munged.pid" munged
}

status() {
    sinfo || true
    cluster_up
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
