# shellcheck shell=bash
# Shared settings of the multi-node test infrastructure; sourced by the scripts beside it.
# shellcheck disable=SC2034 # the settings are used by the scripts that source this file
#
# Everything lives under $DSL_STATE (default /tmp/dslaunch-engines): keys, configs, pid files,
# logs. Test host K is the network namespace dsl-hK (address 10.211.0.K, hostname hK); the
# bridge joining them lives in namespace dsl-sw, so the root namespace gets no interface, no
# address and no route into the test network. Nothing under /etc or ~/.ssh is changed: each
# host's sshd runs in its own mount namespace where $DSL_STATE/hosts is bind-mounted over
# /etc/hosts and $DSL_STATE/ssh/ssh_config over /etc/ssh/ssh_config.

# One set of hosts per (state directory, namespace prefix): the test fixtures use their own pair
# per pytest session, so two sessions on one machine never share (or tear down) each other's hosts.
DSL_STATE=${DSLAUNCH_ENGINES_DIR:-/tmp/dslaunch-engines}
DSL_NS=${DSLAUNCH_ENGINES_NS:-dsl-}  # namespace name prefix: dsl-sw, dsl-h1, dsl-h2, ..., dsl-hdead
[[ $DSL_NS =~ ^[a-z0-9]+-$ ]] || { echo "DSLAUNCH_ENGINES_NS must match [a-z0-9]+-, got '$DSL_NS'" >&2; exit 1; }
DSL_NET=10.211.0             # /24 of the test network (inside the namespaces only)
DSL_DEAD_HOST=hdead          # resolves and routes, but nothing listens on port 22
DSL_DEAD_ADDR=$DSL_NET.200
DSL_RUN=$DSL_STATE/run       # pid files and daemon logs
# Daemons start with a clean environment: nothing of the caller (such as a test tag) leaks in.
DSL_CLEAN_ENV=(env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8)

die() { printf '%s: error: %s\n' "${0##*/}" "$*" >&2; exit 1; }
note() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }

need_root() { [ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces, sshd, mounts)"; }

# need_cmd PROGRAM PACKAGE: fail naming the Debian package that ships PROGRAM
need_cmd() {
  command -v "$1" >/dev/null 2>&1 || [ -x "$1" ] \
    || die "$1 not found: install the Debian package '$2' (make system-deps)"
}

# pid_alive PIDFILE [COMM]: the pid in PIDFILE is a live process (named COMM when given)
pid_alive() {
  local pid comm
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1  # a daemon may remove its pid file as it exits
  [ -d "/proc/$pid" ] || return 1
  grep -q '^State:[[:space:]]*[ZX]' "/proc/$pid/status" 2>/dev/null && return 1
  if [ -n "${2:-}" ]; then
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [ "$comm" = "$2" ] || return 1
  fi
  return 0
}

# stop_pidfiles COMM PIDFILE...: SIGTERM each process named by a PIDFILE if it still is COMM (a
# recycled pid, now another program, is left alone), wait up to 5 s for all of them together,
# SIGKILL what is left; remove the pid files.
stop_pidfiles() {
  local comm=$1 f pid left
  shift
  for f in "$@"; do
    pid_alive "$f" "$comm" && pid=$(cat "$f" 2>/dev/null) && kill -TERM "$pid" 2>/dev/null
  done
  for _ in $(seq 1 50); do
    left=0
    for f in "$@"; do pid_alive "$f" "$comm" && left=1; done
    [ "$left" = 0 ] && break
    sleep 0.1
  done
  for f in "$@"; do
    if pid_alive "$f" "$comm" && pid=$(cat "$f" 2>/dev/null); then
      note "$comm (pid $pid) ignored SIGTERM for 5 s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
  done
  return 0
}

# host_count: number of hosts the last hosts-up.sh made (0 if none)
host_count() { cat "$DSL_STATE/nhosts" 2>/dev/null || echo 0; }

# test_namespaces: the names of this infrastructure's network namespaces
test_namespaces() { ip netns list 2>/dev/null | awk -v p="$DSL_NS" 'index($1, p) == 1 {print $1}'; }

# take_lock: serialise up/down scripts (make targets and test fixtures may race); held until exit
take_lock() {
  mkdir -p "$DSL_STATE"
  exec 9>"$DSL_STATE/.lock"
  flock -w 60 9 || die "another tests/infra script has held $DSL_STATE/.lock for 60 s"
}

# onhost HOST CMD...: run CMD inside test host HOST (its network, hostname and mount
# namespaces: those of HOST's sshd) in the current directory
onhost() {
  local h=$1; shift
  pid_alive "$DSL_RUN/sshd-$h.pid" sshd || die "test host $h is not up (tests/infra/hosts-up.sh)"
  nsenter -t "$(cat "$DSL_RUN/sshd-$h.pid")" -n -u -m --wd="$PWD" -- "$@"
}

# slurm_teardown: stop slurmd(s), slurmctld and munged by their pid files
slurm_teardown() {
  local name
  stop_pidfiles slurmd "$DSL_STATE"/slurm/run/slurmd-*.pid
  stop_pidfiles slurmctld "$DSL_STATE/slurm/run/slurmctld.pid"
  stop_pidfiles munged "$DSL_STATE/munge/munged.pid"
  rm -f "$DSL_STATE/slurm/up"
  # a step daemon of a killed job (slurmstepd) is named by no pid file: find it by its namespace
  for name in $(test_namespaces); do
    for pid in $(ip netns pids "$name" 2>/dev/null); do
      [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = slurmstepd ] && kill -KILL "$pid" 2>/dev/null
    done
  done
  return 0
}

# hosts_teardown: Slurm first (it runs inside the hosts), then each host's sshd by pid file,
# then whatever still runs inside the test namespaces (only this infrastructure's processes
# can be there: a leftover of a failed test), then the namespaces themselves.
hosts_teardown() {
  local name pid left=()
  slurm_teardown
  stop_pidfiles sshd "$DSL_RUN"/sshd-*.pid
  for name in $(test_namespaces); do
    for pid in $(ip netns pids "$name" 2>/dev/null); do left+=("$pid"); done
    ip netns del "$name"
  done
  if [ ${#left[@]} -gt 0 ]; then
    note "killing ${#left[@]} process(es) left inside the test hosts:"
    ps -o pid=,args= -p "$(IFS=,; echo "${left[*]}")" >&2 || true
    kill -KILL "${left[@]}" 2>/dev/null || true
  fi
  rm -f "$DSL_STATE/nhosts"
}
