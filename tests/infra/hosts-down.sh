#!/usr/bin/env bash
# usage: hosts-down.sh   stop Slurm and every test host sshd by pid file, delete the namespaces;
# idempotent. Processes still inside a test host (a failed test's leftovers) are listed and killed.
set -euo pipefail
# shellcheck source=tests/infra/lib.sh
. "$(dirname "$0")/lib.sh"
need_root
take_lock
hosts_teardown
note "test hosts down"
