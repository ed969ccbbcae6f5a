#!/bin/bash
# A one-node SLURM on this machine for the real-scheduler tests (tests/test_slurm_real.py), and for
# trying the job scripts in slurm/ before a cluster run.
#
#   tests/slurm/local_cluster.sh install   # apt-get install slurmctld slurmd slurm-client munge (root + apt)
#   tests/slurm/local_cluster.sh up        # start munged, slurmctld, slurmd (installs first if it can)
#   eval "$(tests/slurm/local_cluster.sh env)"   # SLURM_CONF for sbatch / squeue / scontrol in this shell
#   tests/slurm/local_cluster.sh status
#   tests/slurm/local_cluster.sh down      # stop the daemons started by `up`, remove their state
#
# Everything lives in one state folder (DINODEPTH_SLURM_DIR, default /tmp/dinodepth-slurm): its own
# slurm.conf (clients find it through SLURM_CONF), its own munge key and socket, spool, logs and pid
# files. `up` writes nothing under /etc and starts no system service (no systemd), so a machine's own
# SLURM or munge, if any, is left alone. Node and controller are addressed as 127.0.0.1 (ports
# 16817/16818 unless DINODEPTH_SLURM_PORT sets the first; SLURM's daemons bind every interface, and
# munge authenticates each message). One node with this machine's CPUs and memory, one partition
# `cpu`, no GPUs (job scripts run with --gpus-per-node=0), requeue allowed. The state folder must
# allow executing files (slurmd runs the batch scripts from its spool there).
#
# The daemons run as root (slurmd must switch to the job's user), so `up` needs root. Exit status:
# 0 ready; 77 SLURM cannot run here (not root, packages missing and not installable), with the reason
# on stderr (the tests skip with it); 1 a daemon did not start (see the logs in the state folder).
set -uo pipefail

STATE=${DINODEPTH_SLURM_DIR:-/tmp/dinodepth-slurm}
PORT=${DINODEPTH_SLURM_PORT:-16817}
PACKAGES=(slurmctld slurmd slurm-client munge)
NODE=localhost  # slurmd is started with -N localhost: no dependence on the machine's host name resolving

cant() { echo "local SLURM unavailable: $*" >&2; exit 77; }
log() { echo "local_cluster: $*" >&2; }

have_packages() {
    local b
    for b in munged mungekey slurmctld slurmd sbatch scontrol squeue sinfo; do
        command -v "$b" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin command -v "$b" >/dev/null 2>&1 || return 1
    done
}

install_packages() {
    have_packages && return 0
    [[ $(id -u) == 0 ]] || cant "SLURM is not installed and installing it needs root (apt-get install ${PACKAGES[*]})"
    command -v apt-get >/dev/null 2>&1 || cant "SLURM is not installed and there is no apt-get to install it (${PACKAGES[*]})"
    export DEBIAN_FRONTEND=noninteractive
    log "installing ${PACKAGES[*]} with apt-get"
    # policy-rc.d: Debian's post-install scripts must not start the system services (this script starts
    # its own daemons with its own configuration). Only added when the machine has none.
    local policy=/usr/sbin/policy-rc.d added=0
    if [[ ! -e $policy ]]; then printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && added=1; fi
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null; }
    local status=$?
    (( added )) && rm -f "$policy"
    (( status == 0 )) || cant "apt-get install ${PACKAGES[*]} failed (status $status)"
    have_packages || cant "apt-get installed ${PACKAGES[*]} but their programs are not on PATH"
}

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_config() {
    local cpus mem_mb
    cpus=$(nproc)
    mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))  # leave 10 % to the system
    mkdir -p "$STATE"/{spool/ctld,spool/d,log,run,munge}
    chmod 700 "$STATE/munge"
    cat > "$STATE/slurm.conf" <<CONF
# Written by tests/slurm/local_cluster.sh: a one-node test cluster on localhost.
ClusterName=dinodepth-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$(( PORT + 1 ))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job becomes eligible again once its credentials expired (default 120 s).
AuthInfo=socket=$STATE/munge/munge.socket,cred_expire=10
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
JobRequeue=1
ReturnToService=2
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=300
KillWait=30
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
    echo "$STATE/slurm.conf"
}

up() {
    [[ $(id -u) == 0 ]] || cant "the test cluster's daemons run as root (slurmd switches to the job's user); run as root"
    install_packages
    export PATH=$PATH:/usr/sbin:/sbin
    if pid_alive "$STATE/run/slurmctld.pid" && pid_alive "$STATE/run/slurmd.pid" && pid_alive "$STATE/run/munged.pid"; then
        SLURM_CONF=$STATE/slurm.conf wait_idle && return 0
    fi
    down quiet
    write_config >/dev/null
    export SLURM_CONF=$STATE/slurm.conf
    [[ -s $STATE/munge/munge.key ]] || mungekey --create --keyfile="$STATE/munge/munge.key" ||
        { log "mungekey failed"; exit 1; }
    chmod 400 "$STATE/munge/munge.key"
    munged --force --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
        --pid-file="$STATE/run/munged.pid" --log-file="$STATE/log/munged.log" \
        --seed-file="$STATE/munge/munged.seed" || { log "munged did not start: $(tail -n 3 "$STATE/log/munged.log")"; exit 1; }
    slurmctld -f "$SLURM_CONF" -i || { log "slurmctld did not start: $(tail -n 5 "$STATE/log/slurmctld.log")"; exit 1; }
    slurmd -f "$SLURM_CONF" -N "$NODE" || { log "slurmd did not start: $(tail -n 5 "$STATE/log/slurmd.log")"; exit 1; }
    wait_idle || { log "the node did not become idle: $(tail -n 5 "$STATE/log/slurmctld.log") $(tail -n 5 "$STATE/log/slurmd.log")"; exit 1; }
    log "up: $(sinfo -h -o '%P %a %D %t %c CPUs %m MB' 2>&1); export SLURM_CONF=$SLURM_CONF"
}

wait_idle() {
    local i state
    for i in $(seq 1 60); do
        state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null)
        case "$state" in idle|mix|alloc) return 0 ;; esac
        sleep 0.5
    done
    return 1
}

down() {
    local d pid
    export PATH=$PATH:/usr/sbin:/sbin
    if [[ -s $STATE/slurm.conf ]] && pid_alive "$STATE/run/slurmctld.pid"; then  # end running jobs first
        SLURM_CONF=$STATE/slurm.conf scancel --full --quiet --partition=cpu 2>/dev/null
    fi
    for d in slurmd slurmctld munged; do  # only the daemons this script started (their pid files)
        pid_alive "$STATE/run/$d.pid" || continue
        pid=$(cat "$STATE/run/$d.pid")
        kill "$pid" 2>/dev/null
        for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    done
    [[ ${1:-} == quiet ]] || { rm -rf "$STATE"; log "down"; }
    return 0
}

case "${1:-}" in
    install) install_packages ;;
    up) up ;;
    down) down ;;
    env) echo "export SLURM_CONF=$STATE/slurm.conf" ;;
    status)  # (without the file, sinfo would spend a minute looking for a configuration elsewhere)
        [[ -s $STATE/slurm.conf ]] && pid_alive "$STATE/run/slurmctld.pid" || { echo "local cluster not running" >&2; exit 1; }
        export PATH=$PATH:/usr/sbin:/sbin SLURM_CONF=$STATE/slurm.conf
        sinfo && squeue ;;
    *) echo "usage: $0 install|up|down|env|status" >&2; exit 2 ;;
esac
