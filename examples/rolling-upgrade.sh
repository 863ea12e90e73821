#!/usr/bin/env bash
# Upgrade the handler's package in ksup's virtual environment, then roll every worker onto it,
# one at a time, with no message lost; check that the new version is the one running.
#
#   examples/rolling-upgrade.sh /opt/ksup my-billing-handler==2.4.0 orders
#
# Fleet mode: several ksup instances of the group (hosts, or several ksup on one host), rolled
# one after another; the first failure stops the rollout (the hosts not yet rolled keep the
# old release, the failed one keeps its old workers). Each TARGET is a control socket path, or
# ssh:HOST[:SOCKET] for a ksup on another host (run there over ssh with the same VENV; default
# socket: ksup's default for GROUP on that host):
#
#   examples/rolling-upgrade.sh /opt/ksup my-billing-handler==2.4.0 orders \
#       ssh:kafka-consumer-1 ssh:kafka-consumer-2 ssh:kafka-consumer-3
#
# Exits non-zero, saying why and which target, when an install fails, a roll stops, or a
# worker still runs another version afterwards.
set -euo pipefail

usage="usage: rolling-upgrade.sh VENV PACKAGE[==VERSION] GROUP [TARGET...]"
venv=${1:?$usage}
spec=${2:?$usage}
group=${3:?$usage}
shift 3
package=${spec%%[=<>!~ ]*}

# roll TARGET-LABEL RUNNER... : install, reload --wait, check the versions, on one ksup.
roll_one() {
  local label=$1 where=$2; shift 2
  local run=("$@") want running
  # (Called as `roll_one ... || stop`, where bash ignores set -e: every step checks itself.)
  "${run[@]}" "$venv/bin/python" -m pip install --quiet --upgrade "$spec" || return 1
  want=$("${run[@]}" "$venv/bin/python" -c 'import importlib.metadata, sys; print(importlib.metadata.version(sys.argv[1]))' "$package") || return 1
  echo "$label: installed $package $want; rolling the workers of group $group"
  # Returns when the last worker was replaced and is a settled member of the group again;
  # prints per worker the old and new pid and how long its partitions had no consumer.
  # shellcheck disable=SC2086  # $where is two words on purpose
  "${run[@]}" "$venv/bin/ksup" reload --wait $where || return 1
  # shellcheck disable=SC2086
  running=$("${run[@]}" "$venv/bin/ksup" status --json $where |
    "$venv/bin/python" -c 'import json, sys; print(" ".join(sorted({w["handler_version"] for w in json.load(sys.stdin)["workers"]})))') || return 1
  if [ "$running" != "$want" ]; then
    echo "rolling-upgrade: $label: workers run version(s) '$running', expected '$want'" >&2
    return 1
  fi
  echo "$label: every worker runs $package $want"
}

if [ $# -eq 0 ]; then
  roll_one "group $group" "--group $group" || exit 1
  exit 0
fi

done_targets=0
for target in "$@"; do
  case $target in
    ssh:*)
      rest=${target#ssh:}; host=${rest%%:*}; sock=${rest#"$host"}; sock=${sock#:}
      where=${sock:+--socket $sock}; where=${where:---group $group}
      roll_one "$host" "$where" ssh "$host" || { echo "rolling-upgrade: stopped at $host after $done_targets of $# target(s)" >&2; exit 1; }
      ;;
    *)
      roll_one "$target" "--socket $target" || { echo "rolling-upgrade: stopped at $target after $done_targets of $# target(s)" >&2; exit 1; }
      ;;
  esac
  done_targets=$((done_targets + 1))
done
echo "rolled $done_targets ksup instance(s) of group $group onto $spec"
