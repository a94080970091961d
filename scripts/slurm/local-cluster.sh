#!/usr/bin/env bash
# A one-node Slurm cluster on localhost, from Debian's packages (slurm-wlm, munge), with two
# pretend GPUs so that job scripts asking for --gres=gpu:1 run unchanged. For trying the eval
# scripts without a real cluster; CI uses it through test-local.sh.
#
#   scripts/slurm/local-cluster.sh start DIR   # installs the packages if missing (needs root)
#   export SLURM_CONF=DIR/slurm.conf           # then sbatch, squeue, sinfo talk to it
#   scripts/slurm/local-cluster.sh stop DIR
set -euo pipefail

action=${1:?start or stop}
dir=$(realpath -m "${2:?state folder}")

# Whether something listens on the controller's port (another cluster, or one still stopping).
port_in_use() {
    ss -Hltn "sport = :6817" 2>/dev/null | grep -q .
}

stop() {
    if [ -f "$dir/slurm.conf" ]; then
        SLURM_CONF=$dir/slurm.conf scontrol shutdown >/dev/null 2>&1 || true
    fi
    for daemon in slurmd slurmctld; do
        if [ -f "$dir/$daemon.pid" ]; then
            kill "$(cat "$dir/$daemon.pid")" 2>/dev/null || true
            rm -f "$dir/$daemon.pid"
        fi
    done
    for _ in $(seq 20); do
        port_in_use || return 0
        sleep 0.5
    done
}

case $action in
stop)
    stop
    exit 0
    ;;
start) ;;
*)
    echo "usage: $0 start|stop DIR" >&2
    exit 2
    ;;
esac

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q slurm-wlm munge >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm munge >/dev/null; }
fi

# munge authenticates every Slurm message; one key and one daemon serve the whole machine.
if ! pgrep -x munged >/dev/null; then
    [ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge && dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
    runuser -u munge -- /usr/sbin/munged 2>/dev/null || /usr/sbin/munged --force
fi

mkdir -p "$dir/state" "$dir/spool"
cpus=$(nproc)
cat > "$dir/slurm.conf" <<CONF
ClusterName=vlm-local
SlurmctldHost=localhost
SlurmUser=$(id -un)
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
NodeName=localhost CPUs=$cpus RealMemory=1000 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
# Two pretend GPUs: Slurm drops a GPU without a device file and wants a device there, but binds
# nothing with task/none, so two copies of /dev/null stand in for /dev/nvidia0 and /dev/nvidia1.
mkdir -p "$dir/dev"
for gpu in 0 1; do
    [ -c "$dir/dev/gpu$gpu" ] || mknod -m 666 "$dir/dev/gpu$gpu" c 1 3
done
echo "NodeName=localhost Name=gpu File=$dir/dev/gpu[0-1]" > "$dir/gres.conf"

export SLURM_CONF=$dir/slurm.conf
stop
if port_in_use; then
    echo "port 6817 is taken: another slurmctld runs here (stop it first)" >&2
    exit 1
fi
slurmctld -c  # a fresh cluster: no jobs or node states from an earlier start
slurmd -N localhost
for _ in $(seq 60); do
    if sinfo -h -o %T 2>/dev/null | grep -qx idle; then
        echo "Slurm is up: export SLURM_CONF=$SLURM_CONF"
        exit 0
    fi
    sleep 1
done
echo "Slurm did not come up; logs:" >&2
tail -n 20 "$dir/slurmctld.log" "$dir/slurmd.log" >&2
exit 1
