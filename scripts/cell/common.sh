# What the test cells share; sourced (not run) by scripts/test-cell.sh and scripts/cell/*.sh.

TEST_USER=${SHEEPDOG_TEST_USER:-sdtest}
OTHER_USER=${SHEEPDOG_TEST_OTHER_USER:-sdother}  # tests/test_security.py: another user of the head node
KEY=/root/.ssh/sheepdog_test_ed25519

# sshd_config PORT ADDRESS PIDFILE [DIRECTIVE...]: a test sshd's configuration, on stdout: the test
# user with a key only, port forwarding (the tunnel route), room for the many connections tests open.
sshd_config() {
  cat <<CFG
Port $1
ListenAddress $2
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
UsePAM no
PermitRootLogin no
AllowTcpForwarding yes
Subsystem sftp internal-sftp
MaxStartups 200:30:400
PidFile $3
CFG
  shift 3
  [ $# -eq 0 ] || printf '%s\n' "$@"
}

# ssh_alias CELL HOSTS ADDRESS PORT: the alias(es) HOSTS in root's ~/.ssh/config for the test user
# at ADDRESS:PORT (once, between markers naming CELL), and that sshd's host key in known_hosts.
ssh_alias() {
  local cell=$1 hosts=$2 address=$3 port=$4 known=$3
  [ "$port" = 22 ] || known="[$address]:$port"
  mkdir -p /root/.ssh && chmod 700 /root/.ssh
  touch /root/.ssh/config /root/.ssh/known_hosts; chmod 600 /root/.ssh/config
  if ! grep -qxF "# >>> sheepdog-executor $cell >>>" /root/.ssh/config; then
    cat >> /root/.ssh/config <<CFG
# >>> sheepdog-executor $cell >>>
Host $hosts
    HostName $address
    Port $port
    User $TEST_USER
    IdentityFile $KEY
    IdentitiesOnly yes
# <<< sheepdog-executor $cell <<<
CFG
  fi
  if ! ssh-keygen -F "$known" -f /root/.ssh/known_hosts >/dev/null; then
    ssh-keyscan -p "$port" -t ed25519 "$address" 2>/dev/null >> /root/.ssh/known_hosts
  fi
}
