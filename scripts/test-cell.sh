#!/usr/bin/env bash
# Set up (idempotently) and start the local test cell: a single-node Son of Grid Engine cell and an
# OpenSSH sshd on 127.0.0.1:2222 with a test user, plus an ssh config alias "fear" for root.
# Debian 12, run as root. Fast when everything is already up. Pitfalls it works around: docs/test-cell.rst.
# --multi-host: also the multi-host cell of scripts/cell/multihost.sh (ssh alias "fear-multi").
# --slurm: also the single-node Slurm of scripts/cell/slurm.sh (ssh alias "fear-slurm").
set -euo pipefail
MULTI_HOST=
SLURM=
args=()
for arg in "$@"; do
  case "$arg" in --multi-host) MULTI_HOST=1 ;; --slurm) SLURM=1 ;; *) args+=("$arg") ;; esac
done
set -- "${args[@]+"${args[@]}"}"

. "$(dirname "${BASH_SOURCE[0]}")/cell/common.sh"  # TEST_USER, OTHER_USER, KEY, sshd_config, ssh_alias
SSH_PORT=${SHEEPDOG_TEST_PORT:-2222}
SLOTS=${SHEEPDOG_TEST_SLOTS:-8}
SGE_ROOT=/var/lib/gridengine
CELL_DIR=$SGE_ROOT/default
STATE_DIR=/var/lib/sheepdog-test-cell
log() { printf '[test-cell] %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }

# --- packages -------------------------------------------------------------------------------
need=()
command -v qsub >/dev/null || need+=(gridengine-master gridengine-exec gridengine-client)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh-keyscan >/dev/null || need+=(openssh-client)
command -v ss >/dev/null || need+=(iproute2)
[ -x /usr/bin/python3 ] || need+=(python3)
/usr/bin/python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)  # tests install dask for the nodes
[ -f /etc/profile.d/modules.sh ] || need+=(environment-modules)  # `module load` in setup= lines
command -v patchelf >/dev/null || need+=(patchelf)  # the other Pythons' copies (below)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
mkdir -p "$STATE_DIR"

# --- host names: the machine's name resolves to 127.0.0.1 which reverse-resolves to localhost --
alias_line="localhost $(hostname)"
if [ "$(cat $CELL_DIR/common/host_aliases 2>/dev/null)" != "$alias_line" ]; then
  echo "$alias_line" > $CELL_DIR/common/host_aliases
  # a master started before the alias file must not linger
  pid=$(ss -ltnpH 'sport = :6444' 2>/dev/null | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2 || true)
  if [ -n "${pid:-}" ]; then kill "$pid"; sleep 2; fi
fi

listening() { ss -ltnH "sport = :$1" 2>/dev/null | grep -q .; }
wait_port() { for _ in $(seq 1 100); do listening "$1" && return 0; sleep 0.1; done; return 1; }

# --- daemons ---------------------------------------------------------------------------------
if ! listening 6444; then
  log "starting sge_qmaster"
  /etc/init.d/gridengine-master start >/dev/null 2>&1 || true
  wait_port 6444 || { echo "sge_qmaster did not start" >&2; exit 1; }
fi
. $CELL_DIR/common/settings.sh

# --- cell configuration (once) ---------------------------------------------------------------
# the slot count the cell was last configured with; a different SHEEPDOG_TEST_SLOTS reconfigures it
if [ "$(cat "$STATE_DIR/configured-slots" 2>/dev/null)" != "$SLOTS" ]; then
  log "configuring the cell ($SLOTS slots)"
  tmp=$(mktemp -d)
  for _ in $(seq 1 20); do   # the fresh master may refuse for a moment
    qconf -ss 2>/dev/null | grep -qx localhost && break
    qconf -as localhost >/dev/null 2>&1 || sleep 0.5
  done
  qconf -ss | grep -qx localhost || { echo "could not add localhost as submit host" >&2; exit 1; }
  printf 'hostname localhost\nload_scaling NONE\ncomplex_values NONE\nuser_lists NONE\nxuser_lists NONE\nprojects NONE\nxprojects NONE\nusage_scaling NONE\nreport_variables NONE\n' > $tmp/exec
  qconf -se localhost >/dev/null 2>&1 || qconf -Ae $tmp/exec >/dev/null
  printf 'group_name @allhosts\nhostlist localhost\n' > $tmp/hgrp
  qconf -shgrp @allhosts >/dev/null 2>&1 || qconf -Ahgrp $tmp/hgrp >/dev/null
  printf 'pe_name smp\nslots 999\nuser_lists NONE\nxuser_lists NONE\nstart_proc_args /bin/true\nstop_proc_args /bin/true\nallocation_rule $pe_slots\ncontrol_slaves FALSE\njob_is_first_task TRUE\nurgency_slots min\naccounting_summary FALSE\nqsort_args NONE\n' > $tmp/pe
  qconf -sp smp >/dev/null 2>&1 || qconf -Ap $tmp/pe >/dev/null
  if qconf -sq all.q >/dev/null 2>&1; then qconf -sq all.q > $tmp/q; mode=-Mq; else qconf -sq > $tmp/q; mode=-Aq; fi
  sed -i -e 's/^qname .*/qname all.q/' -e 's/^hostlist .*/hostlist @allhosts/' \
         -e 's/^load_thresholds .*/load_thresholds NONE/' -e 's/^pe_list .*/pe_list smp/' \
         -e "s/^slots .*/slots $SLOTS/" -e 's/^shell .*/shell \/bin\/sh/' $tmp/q
  qconf $mode $tmp/q >/dev/null
  qconf -ssconf > $tmp/sconf
  sed -i -e 's/^schedule_interval .*/schedule_interval 0:0:1/' -e 's/^flush_submit_sec .*/flush_submit_sec 1/' \
         -e 's/^flush_finish_sec .*/flush_finish_sec 1/' -e 's/^job_load_adjustments .*/job_load_adjustments NONE/' \
         -e 's/^load_adjustment_decay_time .*/load_adjustment_decay_time 0:0:0/' $tmp/sconf
  qconf -Msconf $tmp/sconf >/dev/null
  rm -rf $tmp
  rm -f "$STATE_DIR"/configured-[0-9]*  # markers of older versions of this script
  echo "$SLOTS" > "$STATE_DIR/configured-slots"
fi

if ! listening 6445; then
  log "starting sge_execd"
  /etc/init.d/gridengine-exec start >/dev/null 2>&1 || true
  wait_port 6445 || { echo "sge_execd did not start" >&2; exit 1; }
fi

# --- what set-up lines use in tests/test_setup_lines.py ----------------------------------------
# Environment Modules (a login shell's /etc/profile.d/modules.sh defines `module`) with a module
# that puts a Python on PATH: a venv of the system python3, so its sys.prefix tells it apart.
[ -x /opt/sheepdog-test-python/bin/python3 ] || /usr/bin/python3 -m venv --without-pip /opt/sheepdog-test-python
cat > /etc/environment-modules/modules/sheepdog-python <<'MODULE'
#%Module1.0
## The test cell's Python (tests/test_setup_lines.py): `module load sheepdog-python`
prepend-path PATH /opt/sheepdog-test-python/bin
MODULE

# --- the other Pythons CI runs a client on (scripts/run-tests.sh), the same minor on the nodes ------
# pyenv's builds live under /root, which the test user cannot read: a copy in /opt, its libpython
# found next to it ($ORIGIN) instead of under /root.
for version in ${SHEEPDOG_TEST_PYTHONS-3.10 3.13}; do
  dest=/opt/sheepdog-pythons/$version
  [ -x "$dest/bin/python$version" ] && continue
  src=$(ls -d /root/.pyenv/versions/"$version".* 2>/dev/null | sort -V | tail -1)
  if [ -z "$src" ] || [ ! -x "$src/bin/python$version" ]; then
    echo "Python $version not found in /root/.pyenv/versions: install it (pyenv install $version)," \
      "or leave it out of SHEEPDOG_TEST_PYTHONS (now: ${SHEEPDOG_TEST_PYTHONS-3.10 3.13})" >&2
    exit 1
  fi
  log "copying $src to $dest"
  rm -rf "$dest.tmp"; mkdir -p "$dest.tmp"
  tar -C "$src" --exclude="./lib/python$version/test" --exclude="./lib/python$version/site-packages/*" -cf - . \
    | tar -C "$dest.tmp" -xf -
  patchelf --set-rpath '$ORIGIN/../lib' "$dest.tmp/bin/python$version"
  chmod -R a+rX "$dest.tmp"
  mv -T "$dest.tmp" "$dest"
done

# --- test user and key -----------------------------------------------------------------------
if ! id "$TEST_USER" >/dev/null 2>&1; then
  log "creating user $TEST_USER"
  useradd -m -s /bin/bash "$TEST_USER"
fi
usermod -p '*' "$TEST_USER"   # unlock for key login only
home=$(getent passwd "$TEST_USER" | cut -d: -f6)
mkdir -p /root/.ssh && chmod 700 /root/.ssh
[ -f "$KEY" ] || ssh-keygen -q -t ed25519 -N '' -f "$KEY" -C sheepdog-test
install -d -m 700 -o "$TEST_USER" -g "$TEST_USER" "$home/.ssh"
grep -qF "$(cut -d' ' -f2 "$KEY.pub")" "$home/.ssh/authorized_keys" 2>/dev/null || cat "$KEY.pub" >> "$home/.ssh/authorized_keys"
chown "$TEST_USER:$TEST_USER" "$home/.ssh/authorized_keys"; chmod 600 "$home/.ssh/authorized_keys"

# --- a second user, for tests of what another user of the head node can do (never logs in) ------
if ! id "$OTHER_USER" >/dev/null 2>&1; then
  log "creating user $OTHER_USER"
  useradd -m -s /bin/bash "$OTHER_USER"
fi

# --- sshd on loopback ------------------------------------------------------------------------
sshd_config "$SSH_PORT" 127.0.0.1 "$STATE_DIR/sshd.pid" > "$STATE_DIR/sshd_config"
if ! listening "$SSH_PORT"; then
  log "starting sshd on 127.0.0.1:$SSH_PORT"
  mkdir -p /run/sshd
  ls /etc/ssh/ssh_host_*_key >/dev/null 2>&1 || ssh-keygen -A
  /usr/sbin/sshd -f "$STATE_DIR/sshd_config"
  wait_port "$SSH_PORT" || { echo "sshd did not start" >&2; exit 1; }
fi

# --- root's ssh config alias and known_hosts -------------------------------------------------
ssh_alias "test cell" "fear sheepdog-test-cell" 127.0.0.1 "$SSH_PORT"

# --- smoke check: the test user can submit over ssh --------------------------------------------
if [ ! -f "$STATE_DIR/smoke-ok" ] || [ "${1:-}" = "--check" ]; then
  for _ in $(seq 1 30); do
    if ssh -o BatchMode=yes fear 'qstat -f' 2>/dev/null | grep -q 'all.q@localhost'; then ok=1; break; fi
    sleep 1
  done
  [ "${ok:-}" = 1 ] || { echo "cell not reachable over ssh (ssh fear qstat -f)" >&2; exit 1; }
  touch "$STATE_DIR/smoke-ok"
fi
log "ready: ssh alias 'fear' -> $TEST_USER@127.0.0.1:$SSH_PORT, $SLOTS slots"
[ -z "$MULTI_HOST" ] || bash "$(dirname "$0")/cell/multihost.sh" "$@"
[ -z "$SLURM" ] || SHEEPDOG_TEST_SLOTS=$SLOTS bash "$(dirname "$0")/cell/slurm.sh"
