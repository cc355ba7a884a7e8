#!/usr/bin/env bash
# Stop the SLURM that .ci/slurm/start.sh started: cancel its jobs, then stop each daemon by
# the PID start.sh recorded (slurmd, slurmctld, slurmdbd, mariadbd, munged), SIGTERM first
# and SIGKILL after 20 s. Safe to run twice, or after a partial start.
set -uo pipefail
STATE="${RGEOM_SLURM_STATE:-/tmp/rgeom-slurm}"
log() { echo "[slurm-ci] $*" >&2; }
[[ -d "$STATE/pids" ]] || { log "nothing to stop ($STATE/pids missing)"; exit 0; }

pid_of() { [[ -s "$STATE/pids/$1.pid" ]] && cat "$STATE/pids/$1.pid"; }

# Jobs first, while slurmctld still answers, so no slurmstepd outlives its slurmd.
if [[ -n "$(pid_of slurmctld)" ]] && kill -0 "$(pid_of slurmctld)" 2>/dev/null; then
    scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 100); do
        [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break
        sleep 0.2
    done
fi

status=0
for name in slurmd slurmctld slurmdbd mariadbd munged; do
    pid=$(pid_of "$name") || continue
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name (pid $pid) ignored SIGTERM; SIGKILL"
            kill -KILL "$pid" 2>/dev/null
            sleep 0.5
        fi
        if kill -0 "$pid" 2>/dev/null; then
            log "$name (pid $pid) still running"
            status=1
            continue
        fi
        log "stopped $name (pid $pid)"
    fi
    rm -f "$STATE/pids/$name.pid"
done

for name in slurm.conf slurmdbd.conf; do
    if [[ -L /etc/slurm/$name && "$(readlink /etc/slurm/$name)" == "$STATE/$name" ]]; then
        rm -f "/etc/slurm/$name"
        [[ -e "/etc/slurm/$name.rgeom-ci-saved" ]] && mv "/etc/slurm/$name.rgeom-ci-saved" "/etc/slurm/$name"
    fi
done
exit $status
