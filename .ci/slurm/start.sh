#!/usr/bin/env bash
# Start a real single-node SLURM (munged, MariaDB + slurmdbd, slurmctld, slurmd) without
# systemd, for CI. Every daemon runs in the foreground under this script's control and its
# PID goes to $RGEOM_SLURM_STATE/pids/<name>.pid; .ci/slurm/stop.sh stops them by PID.
# If any step fails, the daemons already started are stopped before exiting non-zero.
#
#   .ci/slurm/start.sh            # needs root (apt-get, /etc/slurm, munge user)
#   RGEOM_SLURM_STATE=/tmp/x .ci/slurm/start.sh
#
# Prints `export SLURM_*`-free: the config lives at /etc/slurm/slurm.conf (a symlink into the
# state dir) because the executor plugin's jobstep clears SLURM_CONF before its inner srun.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
STATE="${RGEOM_SLURM_STATE:-/tmp/rgeom-slurm}"
PARTITION="${RGEOM_SLURM_PARTITION:-ci}"
MAXTIME="${RGEOM_SLURM_MAXTIME:-60}"          # the partition's time limit, minutes
DB_PORT="${RGEOM_SLURM_DB_PORT:-3307}"
log() { echo "[slurm-ci] $*" >&2; }
t0=$(date +%s)

if [[ -e "$STATE/pids" ]] && ls "$STATE"/pids/*.pid >/dev/null 2>&1; then
    log "already started (PID files in $STATE/pids); run .ci/slurm/stop.sh first"
    exit 1
fi

# --- packages: Debian 12's slurm-wlm 22.05, munge, slurmdbd and MariaDB -----------------
if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null \
    || ! command -v munged >/dev/null || ! command -v mariadbd >/dev/null; then
    log "installing slurm-wlm slurmdbd munge mariadb-server"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm slurmdbd munge mariadb-server >/dev/null
fi

rm -rf "$STATE"
mkdir -p "$STATE"/{pids,log,slurmctld,slurmd,mysql,run}
chmod 755 "$STATE"

started=()
fail() {
    log "FAILED: $*"
    for f in "$STATE"/log/*.log; do [[ -s $f ]] && { log "== $f"; tail -20 "$f" >&2; }; done
    "$HERE/stop.sh" || true
    exit 1
}
trap 'fail "line $LINENO: $BASH_COMMAND"' ERR

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local secs=$1 what=$2; shift 2
    for _ in $(seq $((secs * 5))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    fail "timed out waiting for $what"
}
alive() { kill -0 "$(cat "$STATE/pids/$1.pid")" 2>/dev/null || fail "$1 exited"; }

# --- munge: the munge key from the package, munged as user munge ------------------------
[[ -s /etc/munge/munge.key ]] || { mungekey --create --force; chown munge:munge /etc/munge/munge.key; }
install -d -o munge -g munge -m 755 /run/munge
install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
setpriv --reuid munge --regid munge --init-groups \
    munged --foreground --force --log-file="$STATE/log/munged.log" \
    >"$STATE/log/munged.out" 2>&1 &
echo $! >"$STATE/pids/munged.pid"
wait_for 10 munged sh -c 'munge -n | unmunge'
log "munged up (pid $(cat "$STATE/pids/munged.pid"))"

# --- MariaDB with a private datadir, TCP on 127.0.0.1 only --------------------------------
mariadb-install-db --no-defaults --datadir="$STATE/mysql" --user=root \
    --auth-root-authentication-method=socket --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1
mariadbd --no-defaults --user=root --datadir="$STATE/mysql" --socket="$STATE/run/mysqld.sock" \
    --pid-file="$STATE/run/mysqld.pid" --bind-address=127.0.0.1 --port="$DB_PORT" \
    --innodb-buffer-pool-size=64M --log-error="$STATE/log/mariadb.log" &
echo $! >"$STATE/pids/mariadbd.pid"
wait_for 30 mariadb mariadb --no-defaults --socket="$STATE/run/mysqld.sock" -uroot -e 'select 1'
mariadb --no-defaults --socket="$STATE/run/mysqld.sock" -uroot -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
log "mariadb up (pid $(cat "$STATE/pids/mariadbd.pid"))"

# --- configs: /etc/slurm/{slurm,slurmdbd}.conf are symlinks into the state dir -----------
CPUS=$(nproc)
MEM_MB=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.8}' /proc/meminfo)
DEF_MEM=$((MEM_MB / CPUS / 2))   # per CPU: without it each job takes the node's memory
cat >"$STATE/slurm.conf" <<CONF
# Written by .ci/slurm/start.sh: a single-node SLURM for CI.
ClusterName=rgeomci
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
MinJobAge=300
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
AccountingStoreFlags=job_comment
SchedulerParameters=batch_sched_delay=0,sched_min_interval=100000
NodeName=localhost CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=$MAXTIME DefMemPerCPU=$DEF_MEM State=UP
CONF
cat >"$STATE/slurmdbd.conf" <<CONF
# Written by .ci/slurm/start.sh.
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
CONF
chmod 600 "$STATE/slurmdbd.conf"
mkdir -p /etc/slurm
for name in slurm.conf slurmdbd.conf; do
    if [[ -e /etc/slurm/$name && ! -L /etc/slurm/$name ]]; then
        mv /etc/slurm/$name "/etc/slurm/$name.rgeom-ci-saved"
    fi
    ln -sfn "$STATE/$name" "/etc/slurm/$name"
done

# --- slurmdbd, the cluster and an account, then slurmctld and slurmd ----------------------
slurmdbd -D >"$STATE/log/slurmdbd.out" 2>&1 &
echo $! >"$STATE/pids/slurmdbd.pid"
wait_for 30 slurmdbd sacctmgr -n list cluster
alive slurmdbd
sacctmgr -i add cluster rgeomci >/dev/null
sacctmgr -i add account rgeomci Cluster=rgeomci Description=ci Organization=ci >/dev/null
sacctmgr -i add user root Account=rgeomci Cluster=rgeomci >/dev/null
log "slurmdbd up (pid $(cat "$STATE/pids/slurmdbd.pid")); cluster and account rgeomci added"

slurmctld -D -i >"$STATE/log/slurmctld.out" 2>&1 &
echo $! >"$STATE/pids/slurmctld.pid"
wait_for 30 slurmctld scontrol ping
slurmd -D -N localhost >"$STATE/log/slurmd.out" 2>&1 &
echo $! >"$STATE/pids/slurmd.pid"
wait_for 30 "node localhost idle" sh -c "sinfo -h -N -o %t | grep -qx idle"
alive slurmctld
alive slurmd
# The controller has registered with slurmdbd once sacct answers.
wait_for 30 sacct sacct -n -X -S now-1hour
trap - ERR
log "SLURM up in $(($(date +%s) - t0)) s: partition $PARTITION, $CPUS CPUs, ${MEM_MB} MB," \
    "DefMemPerCPU=$DEF_MEM, MaxTime=$MAXTIME min; state in $STATE"
sinfo >&2
