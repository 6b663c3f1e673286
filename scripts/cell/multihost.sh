#!/usr/bin/env bash
# Set up (idempotently) and start a multi-host Grid Engine test cell on this one machine:
#   mh-head  (qmaster and sshd, 10.97.0.10)   mh-node1 (execd, .11)   mh-node2 (execd, .12)
# Each "host" is a process holding its own network, UTS (host name) and mount namespace (its own
# /tmp); /home and the rest of the file system are shared, as NFS would share them. The hosts sit on
# a private bridge, sdmbr0, whose address 10.97.0.1 is this machine's; their names are in /etc/hosts,
# as a cluster's DNS would have them. It is a SEPARATE cell (SGE_CELL=multi, ports 6454/6455, its
# own spool, disjoint gid ranges), so the single-node cell of test-cell.sh keeps working beside it.
# ssh alias "fear-multi" (root's ~/.ssh/config) reaches the head node as the test user.
# Called by scripts/test-cell.sh --multi-host, after the single-node cell (packages, user, key).
# Stop: bash scripts/cell/multihost.sh --stop (ends its daemons and removes namespaces and links).
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/common.sh"  # TEST_USER, KEY, sshd_config, ssh_alias
SGE_ROOT=/var/lib/gridengine
CELL=multi
CELL_DIR=$SGE_ROOT/$CELL
SPOOL=/var/spool/gridengine-multi
STATE=/var/lib/sheepdog-test-cell/multi
QPORT=6454
EPORT=6455
NET=10.97.0
BRIDGE=sdmbr0
SLOTS_PER_NODE=${SHEEPDOG_MULTI_SLOTS:-8}
HEAD=mh-head
NODES=(mh-node1 mh-node2)
declare -A ADDR=([mh-head]=$NET.10 [mh-node1]=$NET.11 [mh-node2]=$NET.12)
declare -A GIDS=([mh-node1]=71000-71999 [mh-node2]=72000-72999)  # fear uses the default 65400-65500
SGE_ENV=(SGE_ROOT=$SGE_ROOT SGE_CELL=$CELL SGE_QMASTER_PORT=$QPORT SGE_EXECD_PORT=$EPORT)
log() { printf '[multi-host cell] %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
mkdir -p "$STATE"

holder() { cat "$STATE/$1.holder" 2>/dev/null || true; }
# the host's holder is alive and is the host (a recycled pid would have another host name)
host_up() {
  local pid; pid=$(holder "$1")
  [ -n "$pid" ] && [ "$(nsenter -t "$pid" -u hostname 2>/dev/null)" = "$1" ]
}
# run a command as root on a host: in its network, UTS and mount namespaces
on() { local host=$1; shift; nsenter -t "$(holder "$host")" -n -u -m -- "$@"; }
sge() { local host=$1; shift; on "$host" env "${SGE_ENV[@]}" "$@"; }
listening() { on "$1" ss -ltnH "sport = :$2" 2>/dev/null | grep -q .; }
wait_port() { for _ in $(seq 1 150); do listening "$1" "$2" && return 0; sleep 0.1; done; return 1; }

stop_all() {
  for host in "${NODES[@]}" "$HEAD"; do
    if host_up "$host"; then
      for pid in $(ip netns pids "sdm-$host" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    fi
    ip netns del "sdm-$host" 2>/dev/null || true
    rm -f "$STATE/$host.holder"
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  log "stopped"
}
[ "${1:-}" = "--stop" ] && { stop_all; exit 0; }

# --- network: a bridge, a namespace per host, names in /etc/hosts ---------------------------------
if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
  ip link add "$BRIDGE" type bridge
  ip addr add "$NET.1/24" dev "$BRIDGE"
fi
ip link set "$BRIDGE" up
if ! grep -q '^# >>> sheepdog multi-host cell' /etc/hosts; then
  {
    echo "# >>> sheepdog multi-host cell >>>"
    for host in "$HEAD" "${NODES[@]}"; do echo "${ADDR[$host]} $host"; done
    echo "# <<< sheepdog multi-host cell <<<"
  } >> /etc/hosts
fi

make_host() {
  local host=$1 ns=sdm-$1 link=v-$1
  host_up "$host" && return 0
  log "making host $host (${ADDR[$host]})"
  ip netns del "$ns" 2>/dev/null || true
  ip link del "$link" 2>/dev/null || true
  ip netns add "$ns"
  ip link add "$link" type veth peer name eth0 netns "$ns"
  ip link set "$link" master "$BRIDGE" up
  ip -n "$ns" addr add "${ADDR[$host]}/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
  # the holder: its own host name and /tmp; it writes its pid, then sleeps for as long as the cell lives
  rm -f "$STATE/$host.holder"
  ip netns exec "$ns" setsid unshare --uts --mount --propagation private sh -c \
    "hostname $host && mount -t tmpfs -o mode=1777 tmpfs /tmp && echo \$\$ > $STATE/$host.holder && exec sleep infinity" \
    </dev/null >/dev/null 2>&1 &
  for _ in $(seq 1 50); do host_up "$host" && return 0; sleep 0.1; done
  echo "could not start host $host" >&2; exit 1
}
make_host "$HEAD"
for node in "${NODES[@]}"; do make_host "$node"; done

# --- the cell's files and spool (once) -------------------------------------------------------------
if [ ! -f "$CELL_DIR/common/settings.sh" ] || [ ! -d "$SPOOL/spooldb" ]; then
  log "creating Grid Engine cell '$CELL'"
  rm -rf "$SPOOL" "$CELL_DIR"
  install -d -o sgeadmin -g sgeadmin "$CELL_DIR/common" "$SPOOL" "$SPOOL/qmaster" "$SPOOL/execd" "$SPOOL/spooldb"
  sed -e "s|/var/spool/gridengine/spooldb|$SPOOL/spooldb|" -e "s|/var/spool/gridengine/qmaster|$SPOOL/qmaster|" \
    "$SGE_ROOT/default/common/bootstrap" > "$CELL_DIR/common/bootstrap"
  echo "$HEAD" > "$CELL_DIR/common/act_qmaster"
  printf '%s; export %s\n' "SGE_ROOT=$SGE_ROOT" SGE_ROOT "SGE_CELL=$CELL" SGE_CELL \
    "SGE_QMASTER_PORT=$QPORT" SGE_QMASTER_PORT "SGE_EXECD_PORT=$EPORT" SGE_EXECD_PORT > "$CELL_DIR/common/settings.sh"
  tmp=$(mktemp -d "$STATE/tmp.XXXXXX"); chmod 755 "$tmp"  # not /tmp: each host has its own
  sed -e "s|^execd_spool_dir .*|execd_spool_dir $SPOOL/execd|" -e 's/^gid_range .*/gid_range 70000-70999/' \
      -e 's/flush_time=00:00:15/flush_time=00:00:01/' /usr/share/gridengine/default-configuration > "$tmp/global"
  (
    export "${SGE_ENV[@]}"
    /usr/lib/gridengine/spoolinit berkeleydb libspoolb "$SPOOL/spooldb" init >/dev/null
    /usr/lib/gridengine/spooldefaults configuration "$tmp/global" >/dev/null
    /usr/lib/gridengine/spooldefaults complexes /usr/share/gridengine/util/resources/centry >/dev/null
    /usr/lib/gridengine/spooldefaults usersets /usr/share/gridengine/util/resources/usersets >/dev/null
    /usr/lib/gridengine/spooldefaults managers sgeadmin root >/dev/null
  )
  chown -R sgeadmin:sgeadmin "$CELL_DIR" "$SPOOL"
  rm -rf "$tmp" "$STATE/configured-$SLOTS_PER_NODE"
fi

# --- daemons ---------------------------------------------------------------------------------------
if ! listening "$HEAD" "$QPORT"; then
  log "starting sge_qmaster on $HEAD"
  sge "$HEAD" SGE_MASTER_PIDFILE="$STATE/$HEAD.qmaster.pid" /usr/sbin/sge_qmaster
  wait_port "$HEAD" "$QPORT" || { echo "sge_qmaster did not start on $HEAD" >&2; exit 1; }
fi

if [ ! -f "$STATE/configured-$SLOTS_PER_NODE" ]; then
  log "configuring the cell ($SLOTS_PER_NODE slots on each of ${NODES[*]})"
  tmp=$(mktemp -d "$STATE/tmp.XXXXXX"); chmod 755 "$tmp"  # not /tmp: each host has its own
  for _ in $(seq 1 30); do sge "$HEAD" qconf -as "$HEAD" >/dev/null 2>&1 && break; sleep 0.5; done
  for node in "${NODES[@]}"; do
    sge "$HEAD" qconf -ah "$node" >/dev/null 2>&1 || true
    printf 'hostname %s\nload_scaling NONE\ncomplex_values NONE\nuser_lists NONE\nxuser_lists NONE\nprojects NONE\nxprojects NONE\nusage_scaling NONE\nreport_variables NONE\n' "$node" > "$tmp/exec"
    sge "$HEAD" qconf -se "$node" >/dev/null 2>&1 || sge "$HEAD" qconf -Ae "$tmp/exec" >/dev/null
    # a host-local configuration: disjoint group ids (one kernel: a job's end kills every process
    # of its group id, including another execd's job that drew the same id)
    printf 'mailer /usr/bin/mail\nxterm /usr/bin/xterm\ngid_range %s\n' "${GIDS[$node]}" > "$tmp/$node"
    sge "$HEAD" qconf -sconf "$node" >/dev/null 2>&1 || sge "$HEAD" qconf -Aconf "$tmp/$node" >/dev/null
  done
  printf 'group_name @allhosts\nhostlist %s\n' "${NODES[*]}" > "$tmp/hgrp"
  sge "$HEAD" qconf -shgrp @allhosts >/dev/null 2>&1 || sge "$HEAD" qconf -Ahgrp "$tmp/hgrp" >/dev/null
  printf 'pe_name smp\nslots 999\nuser_lists NONE\nxuser_lists NONE\nstart_proc_args /bin/true\nstop_proc_args /bin/true\nallocation_rule $pe_slots\ncontrol_slaves FALSE\njob_is_first_task TRUE\nurgency_slots min\naccounting_summary FALSE\nqsort_args NONE\n' > "$tmp/pe"
  sge "$HEAD" qconf -sp smp >/dev/null 2>&1 || sge "$HEAD" qconf -Ap "$tmp/pe" >/dev/null
  if sge "$HEAD" qconf -sq all.q >/dev/null 2>&1; then sge "$HEAD" qconf -sq all.q > "$tmp/q"; mode=-Mq
  else sge "$HEAD" qconf -sq > "$tmp/q"; mode=-Aq; fi
  sed -i -e 's/^qname .*/qname all.q/' -e 's/^hostlist .*/hostlist @allhosts/' \
         -e 's/^load_thresholds .*/load_thresholds NONE/' -e 's/^pe_list .*/pe_list smp/' \
         -e "s/^slots .*/slots $SLOTS_PER_NODE/" -e 's/^shell .*/shell \/bin\/sh/' "$tmp/q"
  sge "$HEAD" qconf $mode "$tmp/q" >/dev/null
  sge "$HEAD" qconf -ssconf > "$tmp/sconf"
  sed -i -e 's/^schedule_interval .*/schedule_interval 0:0:1/' -e 's/^flush_submit_sec .*/flush_submit_sec 1/' \
         -e 's/^flush_finish_sec .*/flush_finish_sec 1/' -e 's/^job_load_adjustments .*/job_load_adjustments NONE/' \
         -e 's/^load_adjustment_decay_time .*/load_adjustment_decay_time 0:0:0/' "$tmp/sconf"
  sge "$HEAD" qconf -Msconf "$tmp/sconf" >/dev/null
  rm -rf "$tmp"
  touch "$STATE/configured-$SLOTS_PER_NODE"
fi

for node in "${NODES[@]}"; do
  if ! listening "$node" "$EPORT"; then
    log "starting sge_execd on $node"
    sge "$node" SGE_EXECD_PIDFILE="$STATE/$node.execd.pid" /usr/sbin/sge_execd
    wait_port "$node" "$EPORT" || { echo "sge_execd did not start on $node" >&2; exit 1; }
  fi
done

# a queue instance left in an error state (a host that died under a job) takes no jobs until cleared
if sge "$HEAD" qstat -f 2>/dev/null | grep -q '^all\.q@.* E *$'; then
  log "clearing error states of all.q"
  sge "$HEAD" qmod -c 'all.q' >/dev/null 2>&1 || true
fi

# --- sshd on the head node: the test user, with the cell's environment ----------------------------
sshd_config 22 0.0.0.0 "$STATE/sshd.pid" "SetEnv ${SGE_ENV[*]}" > "$STATE/sshd_config"
if ! listening "$HEAD" 22; then
  log "starting sshd on $HEAD (${ADDR[$HEAD]}:22)"
  mkdir -p /run/sshd
  on "$HEAD" /usr/sbin/sshd -f "$STATE/sshd_config"
  wait_port "$HEAD" 22 || { echo "sshd did not start on $HEAD" >&2; exit 1; }
fi

ssh_alias "multi-host cell" fear-multi "${ADDR[$HEAD]}" 22

# --- smoke check: both execution hosts are up, seen over ssh as the test user ----------------------
if [ ! -f "$STATE/smoke-ok" ] || [ "${1:-}" = "--check" ]; then
  ok=
  for _ in $(seq 1 60); do
    up=$(ssh -o BatchMode=yes fear-multi 'qstat -f' 2>/dev/null | grep -c "all.q@mh-node[12] .* [0-9.]* *lx-amd64 *$" || true)
    [ "$up" = 2 ] && { ok=1; break; }
    sleep 1
  done
  [ -n "$ok" ] || { echo "multi-host cell not usable over ssh (ssh fear-multi qstat -f)" >&2; exit 1; }
  touch "$STATE/smoke-ok"
fi
log "ready: ssh alias 'fear-multi' -> $TEST_USER@${ADDR[$HEAD]} ($HEAD), execution hosts ${NODES[*]}"
