#!/usr/bin/env bash
# usage: hosts-up.sh [N]   bring up test hosts h1..hN (default 2); idempotent
#
# Each host is a network namespace (dsl-hK, address 10.211.0.K/24 on eth0, joined by a bridge in
# namespace dsl-sw) running its own sshd in its own UTS and mount namespace: `hostname` says hK,
# and /etc/hosts (h1..hN, hdead) and /etc/ssh/ssh_config (key, user root, no prompts) are this
# infrastructure's files. The filesystem is shared, so the repository and its venvs are at the
# same path on every host. Inside any host `ssh hK`, pdsh, mpirun and srun work without flags.
# From the root namespace, enter a host with tests/infra/onhost hK CMD...
#
# Also brought up: hdead (10.211.0.200), a namespace with an address but no sshd, for
# "host does not answer ssh" tests (connection refused at once).
set -euo pipefail
# shellcheck source=tests/infra/lib.sh
. "$(dirname "$0")/lib.sh"
N=${1:-2}
[[ $N =~ ^[1-9][0-9]?$ ]] || die "N must be 1..99, got '$N'"

need_root
need_cmd ip iproute2
need_cmd nsenter util-linux
need_cmd unshare util-linux
need_cmd /usr/sbin/sshd openssh-server
need_cmd ssh openssh-client
need_cmd ssh-keygen openssh-client
take_lock

SSH=$DSL_STATE/ssh
all_up() {
  local k
  [ "$(host_count)" = "$N" ] || return 1
  for k in $(seq 1 "$N"); do pid_alive "$DSL_RUN/sshd-h$k.pid" sshd || return 1; done
  [ -e "/run/netns/${DSL_NS}$DSL_DEAD_HOST" ]
}
if all_up; then
  note "$N test host(s) already up"
  exit 0
fi
hosts_teardown  # a partial or different-sized set: start clean

mkdir -p "$DSL_RUN" "$SSH" /run/sshd  # sshd's privilege-separation directory must exist
if [ ! -s "$SSH/id_ed25519" ]; then
  rm -f "$SSH"/id_ed25519* "$SSH"/ssh_host_ed25519_key*
  ssh-keygen -q -t ed25519 -N '' -C dslaunch-test-client -f "$SSH/id_ed25519"
  ssh-keygen -q -t ed25519 -N '' -C dslaunch-test-host -f "$SSH/ssh_host_ed25519_key"
fi
cp "$SSH/id_ed25519.pub" "$SSH/authorized_keys"
chmod 600 "$SSH/id_ed25519" "$SSH/ssh_host_ed25519_key"

{
  echo '127.0.0.1 localhost'
  for k in $(seq 1 "$N"); do echo "$DSL_NET.$k h$k"; done
  echo "$DSL_DEAD_ADDR $DSL_DEAD_HOST"
  # dual-stack servers (torch's TCPStore) see IPv4 peers as ::ffff:a.b.c.d; resolve those here too
  # instead of asking a DNS server the hosts cannot reach
  for k in $(seq 1 "$N"); do echo "::ffff:$DSL_NET.$k h$k"; done
} >"$DSL_STATE/hosts"

cat >"$SSH/sshd_config" <<CONF
# sshd of the dslaunch test hosts (tests/infra/hosts-up.sh); one per host namespace
Port 22
HostKey $SSH/ssh_host_ed25519_key
AuthorizedKeysFile $SSH/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# the key files live under /tmp
StrictModes no
UseDNS no
# wide pdsh / MPI fan-outs must not be dropped (default 10:30:100)
MaxStartups 100:30:200
MaxSessions 100
AcceptEnv LANG LC_*
Subsystem sftp /usr/lib/openssh/sftp-server
CONF

cat >"$SSH/ssh_config" <<CONF
# ssh client config inside the test hosts (bind-mounted over /etc/ssh/ssh_config there)
Host *
    User root
    IdentityFile $SSH/id_ed25519
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    LogLevel ERROR
    BatchMode yes
    ConnectTimeout 5
CONF

ip netns add "${DSL_NS}sw"
ip -n "${DSL_NS}sw" link set lo up
ip -n "${DSL_NS}sw" link add br0 type bridge
ip -n "${DSL_NS}sw" link set br0 up

# add_host NAME INDEX ADDR: namespace dsl-NAME with eth0=ADDR/24 on the bridge. The veth is made in
# the switch namespace and its peer moved straight into the host: the root namespace never sees it.
add_host() {
  local ns=$DSL_NS$1
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip -n "${DSL_NS}sw" link add "p$2" type veth peer name eth0 netns "$ns"
  ip -n "${DSL_NS}sw" link set "p$2" master br0 up
  ip -n "$ns" addr add "$3/24" dev eth0
  ip -n "$ns" link set eth0 up
}

for k in $(seq 1 "$N"); do
  add_host "h$k" "$k" "$DSL_NET.$k"
  rm -f "$DSL_RUN/sshd-h$k.pid"
  # nsenter --net, not `ip netns exec` (which remounts /sys and hides /sys/fs/cgroup: slurmd dies).
  # 9>&-: a daemon must not inherit the lock's descriptor (it would hold the lock for its whole life).
  # shellcheck disable=SC2016 # $1..$3 are the inner sh's arguments
  "${DSL_CLEAN_ENV[@]}" nsenter 9>&- --net="/run/netns/${DSL_NS}h$k" unshare --uts --mount --propagation private sh -c '
    hostname "$1"
    mount --bind "$2/hosts" /etc/hosts
    mount --bind "$2/ssh/ssh_config" /etc/ssh/ssh_config
    exec /usr/sbin/sshd -f "$2/ssh/sshd_config" -o PidFile="$3/sshd-$1.pid" -E "$3/sshd-$1.log"' \
    sh "h$k" "$DSL_STATE" "$DSL_RUN"
done
add_host "$DSL_DEAD_HOST" 200 "$DSL_DEAD_ADDR"

# ready when h1 can ssh to every host (sshd writes its pid file only once it listens)
for k in $(seq 1 "$N"); do
  for _ in $(seq 1 100); do pid_alive "$DSL_RUN/sshd-h$k.pid" sshd && break; sleep 0.05; done
  pid_alive "$DSL_RUN/sshd-h$k.pid" sshd || die "sshd of h$k did not start: $(tail -n 3 "$DSL_RUN/sshd-h$k.log" 2>/dev/null)"
done
for k in $(seq 1 "$N"); do
  got=$(cd / && onhost h1 ssh "h$k" hostname 2>&1) || die "ssh h1 -> h$k failed: $got"
  [ "$got" = "h$k" ] || die "ssh h1 -> h$k answered '$got', expected h$k"
done
echo "$N" >"$DSL_STATE/nhosts"
echo "$DSL_NS" >"$DSL_STATE/ns"  # for whoever tears down a crashed session's hosts
note "$N test host(s) up: $(seq -f 'h%g' -s ' ' 1 "$N") (state in $DSL_STATE)"
