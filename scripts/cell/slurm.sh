#!/usr/bin/env bash
# Set up (idempotently) and start a single-node Slurm cluster next to the Grid Engine cell: munge,
# MariaDB, slurmdbd (so that sacct answers, as on real sites), slurmctld and slurmd, and an ssh alias
# "fear-slurm" for the same sshd and test user as "fear". Called by scripts/test-cell.sh --slurm
# after it made the test user, sshd and root's ssh config. Debian 12, as root. Pitfalls met: at the end.
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # TEST_USER, OTHER_USER, KEY, ssh_alias
SSH_PORT=${SHEEPDOG_TEST_PORT:-2222}
SLOTS=${SHEEPDOG_TEST_SLOTS:-8}
STATE_DIR=/var/lib/sheepdog-test-cell
CONF=/etc/slurm
DB_PASS_FILE=$STATE_DIR/slurmdbd-db-password
log() { printf '[slurm-cell] %s\n' "$*" >&2; }
listening() { ss -ltnH "sport = :$1" 2>/dev/null | grep -q .; }
wait_for() { for _ in $(seq 1 "$2"); do eval "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done; return 1; }

[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }

# --- packages -------------------------------------------------------------------------------
need=()
command -v slurmctld >/dev/null || need+=(slurm-wlm)
command -v slurmdbd >/dev/null || need+=(slurmdbd)
command -v munged >/dev/null || need+=(munge)
command -v mariadbd >/dev/null || need+=(mariadb-server)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${need[@]}" >/dev/null
fi
mkdir -p "$STATE_DIR" /var/log/slurm /var/spool/slurmctld /var/spool/slurmd /run/munge

# --- munge -------------------------------------------------------------------------------------
[ -s /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
chown munge:munge /etc/munge/munge.key /run/munge && chmod 400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged
  wait_for "munge -n | unmunge" 50 || { echo "munged did not start" >&2; exit 1; }
fi

# --- MariaDB and the accounting database ---------------------------------------------------------
if ! mysqladmin ping >/dev/null 2>&1; then
  log "starting MariaDB"
  /etc/init.d/mariadb start >/dev/null 2>&1 || true
  wait_for "mysqladmin ping" 150 || { echo "MariaDB did not start" >&2; exit 1; }
fi
[ -s "$DB_PASS_FILE" ] || { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$DB_PASS_FILE"; chmod 600 "$DB_PASS_FILE"; }
db_pass=$(cat "$DB_PASS_FILE")
mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$db_pass';
          ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$db_pass';
          GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"

# --- configuration -------------------------------------------------------------------------------
# Tuned for quick tests as the Grid Engine cell is: the scheduler runs at once on submit and on job
# end, finished jobs leave slurmctld's memory quickly; real clusters run with the defaults.
cat > "$STATE_DIR/slurm.conf" <<CFG
ClusterName=sheepdog
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=256
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageEnforce=limits
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=5
JobAcctGatherParams=OverMemoryKill
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_min_interval=0,batch_sched_delay=0,default_queue_depth=1000,sched_interval=5,bf_interval=5
MinJobAge=30
KillWait=5
InactiveLimit=0
MaxArraySize=1001
NodeName=localhost CPUs=$SLOTS RealMemory=16000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=short Nodes=localhost MaxTime=00:01:00 State=UP
CFG
cat > "$STATE_DIR/slurmdbd.conf" <<CFG
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$db_pass
StorageLoc=slurm_acct_db
CFG
changed=
for name in slurm.conf slurmdbd.conf; do
  if ! cmp -s "$STATE_DIR/$name" "$CONF/$name"; then install -m 600 "$STATE_DIR/$name" "$CONF/$name"; changed=1; fi
done
chmod 644 "$CONF/slurm.conf"  # users' commands read it; slurmdbd.conf (the password) stays 600

# --- daemons -------------------------------------------------------------------------------------
stop() { [ -f "$1" ] && kill "$(cat "$1")" 2>/dev/null && sleep 1 || true; }
if [ -n "$changed" ]; then  # a changed configuration needs restarted daemons (ours, by pid file)
  stop /run/slurmd.pid; stop /run/slurmctld.pid; stop /run/slurmdbd.pid
fi
if ! listening 6819; then
  log "starting slurmdbd"
  /usr/sbin/slurmdbd
  wait_for "listening 6819" 150 || { echo "slurmdbd did not start (see /var/log/slurm/slurmdbd.log)" >&2; exit 1; }
fi
if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx sheepdog; then
  sacctmgr -i add cluster sheepdog >/dev/null
fi
if ! listening 6817; then
  log "starting slurmctld"
  /usr/sbin/slurmctld
  wait_for "scontrol ping | grep -q UP" 150 || { echo "slurmctld did not start (see /var/log/slurm/slurmctld.log)" >&2; exit 1; }
fi
if ! listening 6818; then
  log "starting slurmd"
  /usr/sbin/slurmd -N localhost
fi
# accounts for the test users (sacct then shows their jobs with an association, as on real sites)
if ! sacctmgr -n -P list account format=account 2>/dev/null | grep -qx sheepdog; then
  sacctmgr -i add account sheepdog description=tests organization=sheepdog >/dev/null
fi
for user in "$TEST_USER" "$OTHER_USER"; do
  id "$user" >/dev/null 2>&1 || continue
  sacctmgr -n -P list user "$user" format=user 2>/dev/null | grep -qx "$user" \
    || sacctmgr -i add user "$user" account=sheepdog >/dev/null
done
wait_for "sinfo -h -n localhost -o %t | grep -Eq '^(idle|mix|alloc)'" 150 \
  || scontrol update nodename=localhost state=resume 2>/dev/null || true
wait_for "sinfo -h -n localhost -o %t | grep -Eq '^(idle|mix|alloc)'" 150 \
  || { echo "the Slurm node is not up: $(sinfo -h -N -o '%N %t %E')" >&2; exit 1; }

# --- root's ssh alias --------------------------------------------------------------------------------
ssh_alias "slurm cell" fear-slurm 127.0.0.1 "$SSH_PORT"  # the same sshd as "fear": its key is known

# --- smoke check: the test user submits over ssh and sacct answers ------------------------------------
if [ ! -f "$STATE_DIR/slurm-smoke-ok" ] || [ -n "$changed" ]; then
  job=$(ssh -o BatchMode=yes fear-slurm 'sbatch --parsable --wait -J sheepdog-smoke -o /dev/null --wrap true') \
    || { echo "cannot run a Slurm job over ssh (ssh fear-slurm sbatch ...)" >&2; exit 1; }
  wait_for "sacct -n -X -j ${job%%;*} -o State | grep -q COMPLETED" 150 \
    || { echo "sacct has no record of job $job (slurmdbd?)" >&2; exit 1; }
  touch "$STATE_DIR/slurm-smoke-ok"
fi
log "ready: ssh alias 'fear-slurm' -> $TEST_USER@127.0.0.1:$SSH_PORT, Slurm $(sinfo -V | cut -d' ' -f2), $SLOTS CPUs"
# Pitfalls met building this on Debian 12 (Slurm 22.05.8, no systemd, a sandboxed kernel):
# - the packages' post-install cannot start any daemon (policy-rc.d); everything is started here.
# - without slurmdbd, sacct has nothing: a lost task could not be explained.
# - memory is enforced only with a memory-aware select (CR_Core_Memory) plus
#   JobAcctGatherParams=OverMemoryKill (no cgroups here): a task over its mem= is killed with signal 9
#   and sacct says FAILED, ExitCode 0:9, MaxRSS above ReqMem (OUT_OF_MEMORY needs cgroup enforcement).
#   DefMemPerCPU keeps a job without mem= from taking the whole node's memory.
# - time limits have minute granularity (time="0:05" is one minute) and are checked about every 30 s.
# - slurmd must be told its node name (-N localhost): the machine's name resolves to 127.0.0.1.
