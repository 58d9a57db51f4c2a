#!/usr/bin/env bash
# A private single-node Slurm for trying the job templates (and for the tests).
#
#   tools/slurm.sh start DIR [CPUS]   install Slurm and munge if missing, start them with
#                                     every file under DIR, wait until the node is idle,
#                                     then print:  export SLURM_CONF=DIR/slurm.conf
#   tools/slurm.sh stop DIR           cancel its jobs and stop its daemons, by PID
#   tools/slurm.sh env DIR            print the export line again
#
# Debian 12, as root, no systemd needed: munged, slurmctld and slurmd run in the
# foreground (-F/-D) as background processes whose PIDs are kept in DIR/pids/.
# munge listens on a socket of its own in DIR and the daemons on free ports, so
# this cluster does not touch a system Slurm or munge. CPUS (default: this
# machine's) may exceed the real cores: the node is declared with that many CPUs
# (SlurmdParameters=config_overrides), so `-n 8` jobs run on a 2-core machine.
# Facts and pitfalls behind each line: ../shared/notes/SLURM.md.
set -euo pipefail

PACKAGES=(munge slurmctld slurmd slurm-client libpmix-dev)

die() { echo "slurm.sh: $*" >&2; exit 1; }

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

install_if_missing() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null) == installed ]] || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return
    ((EUID == 0)) || die "missing Debian packages ${missing[*]}; as root: apt-get install --no-install-recommends ${missing[*]}"
    echo "slurm.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 ||
        { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; }
}

free_port() {
    /usr/bin/python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Start a daemon in the background with its output in DIR/log, and record its PID.
# HESSMPI_SLURM_DIR marks it and what it spawns (slurmstepd) for the sweep in stop.
launch() {
    local name=$1
    shift
    HESSMPI_SLURM_DIR=$dir "$@" </dev/null >"$dir/log/$name.out" 2>&1 &
    echo $! >"$dir/pids/$name"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll every 0.2 s
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            echo "slurm.sh: $what did not happen within $seconds s; logs:" >&2
            tail -n 20 "$dir"/log/* >&2 || true
            stop_cluster
            exit 1
        fi
        sleep 0.2
    done
}

node_idle() { [[ $(sinfo -h -o %T 2>/dev/null) == idle ]]; }

start_cluster() {
    local cpus=${1:-$(nproc)}
    ((EUID == 0)) || die "slurmd must run as root"
    install_if_missing
    [[ ! -e $dir/pids ]] || die "$dir already holds a cluster; stop it first: $0 stop $dir"
    mkdir -p "$dir"/{munge,state,spool,log,pids}
    chmod 755 "$dir"  # munged (user munge) must reach its folder
    local host mem ctld_port slurmd_port
    host=$(hostname -s)
    mem=$(awk '/^MemTotal:/ { print int($2 / 1024 * 0.9) }' /proc/meminfo)
    ctld_port=$(free_port)
    slurmd_port=$(free_port)
    while [[ $slurmd_port == "$ctld_port" ]]; do slurmd_port=$(free_port); done

    # munge: its own key, socket and files; must run as the munge user.
    mungekey -c -f -k "$dir/munge/munge.key"
    chown -R munge:munge "$dir/munge"
    chmod 755 "$dir/munge"  # munged insists that everyone may reach its socket
    chmod 400 "$dir/munge/munge.key"
    launch munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F \
        --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
        --seed-file="$dir/munge/munged.seed"
    wait_for 10 "munged answering" bash -c "munge -n -S '$dir/munge/munge.socket' | unmunge -S '$dir/munge/munge.socket'"

    cat >"$dir/slurm.conf" <<EOF
# A private single-node cluster written by tools/slurm.sh
ClusterName=hessmpi
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may run again (120 s by default)
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
EnforcePartLimits=ALL
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=600
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=ci Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
    export SLURM_CONF=$dir/slurm.conf
    launch slurmctld /usr/sbin/slurmctld -D -i -f "$SLURM_CONF"
    launch slurmd /usr/sbin/slurmd -D -f "$SLURM_CONF" -N "$host"
    wait_for 30 "the node becoming idle" node_idle
    echo "export SLURM_CONF=$SLURM_CONF"
}

# PIDs of processes whose environment marks them as this cluster's: the daemons and
# slurmstepd (HESSMPI_SLURM_DIR), and job processes (SLURM_JOB_ID with our SLURM_CONF).
ours() {
    local env pid vars
    for env in /proc/[0-9]*/environ; do
        pid=${env#/proc/}
        pid=${pid%/environ}
        [[ $pid != "$$" ]] || continue
        vars=$(tr '\0' '\n' 2>/dev/null <"$env") || continue
        if grep -qx "HESSMPI_SLURM_DIR=$dir" <<<"$vars" ||
           { grep -q '^SLURM_JOB_ID=' <<<"$vars" && grep -qx "SLURM_CONF=$dir/slurm.conf" <<<"$vars"; }; then
            echo "$pid"
        fi
    done
}

stop_pid() {  # stop_pid NAME: SIGTERM the recorded PID if it is still that program, then SIGKILL
    local name=$1 pid i
    [[ -f $dir/pids/$name ]] || return 0
    pid=$(<"$dir/pids/$name")
    if grep -q "$name" "/proc/$pid/cmdline" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$dir/pids/$name"
}

stop_cluster() {
    export SLURM_CONF=$dir/slurm.conf
    local i jobs pids
    if [[ -f $SLURM_CONF && -f $dir/pids/slurmctld ]]; then
        jobs=$(squeue -h -o %A 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            scancel $jobs 2>/dev/null || true
            for i in $(seq 50); do
                [[ -z $(squeue -h -o %A 2>/dev/null) ]] && break
                sleep 0.2
            done
        fi
    fi
    stop_pid slurmd
    stop_pid slurmctld
    stop_pid munged
    pids=$(ours)
    if [[ -n $pids ]]; then
        echo "slurm.sh: ending leftover processes of this cluster: $pids" >&2
        kill -KILL $pids 2>/dev/null || true
    fi
    rmdir "$dir/pids" 2>/dev/null || true
}

(($# >= 2)) || usage
cmd=$1
dir=$(realpath -m "$2")
case $cmd in
    start) start_cluster "${3:-}" ;;
    stop) stop_cluster ;;
    env) echo "export SLURM_CONF=$dir/slurm.conf" ;;
    *) usage ;;
esac
