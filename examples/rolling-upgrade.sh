#!/usr/bin/env bash
# Upgrade the handler's package in ksup's virtual environment, then roll every worker onto it,
# one at a time, with no message lost; check that the new version is the one running.
#
#   examples/rolling-upgrade.sh /opt/ksup my-billing-handler==2.4.0 orders
#
# Exits non-zero, saying why, when the install fails, the roll stops (the old workers keep
# running), or a worker still runs another version afterwards.
set -euo pipefail

venv=${1:?usage: rolling-upgrade.sh VENV PACKAGE[==VERSION] GROUP}
spec=${2:?usage: rolling-upgrade.sh VENV PACKAGE[==VERSION] GROUP}
group=${3:?usage: rolling-upgrade.sh VENV PACKAGE[==VERSION] GROUP}
package=${spec%%[=<>!~ ]*}

"$venv/bin/python" -m pip install --quiet --upgrade "$spec"
want=$("$venv/bin/python" -c 'import importlib.metadata, sys; print(importlib.metadata.version(sys.argv[1]))' "$package")
echo "installed $package $want; rolling the workers of group $group"

# Returns when the last worker was replaced and has its partitions; prints per worker the old
# and new pid and how long its partitions had no consumer. Non-zero when the roll stopped.
"$venv/bin/ksup" reload --wait --group "$group"

running=$("$venv/bin/ksup" status --json --group "$group" |
  "$venv/bin/python" -c 'import json, sys; print(" ".join(sorted({w["handler_version"] for w in json.load(sys.stdin)["workers"]})))')
if [ "$running" != "$want" ]; then
  echo "rolling-upgrade: workers run version(s) '$running', expected '$want'" >&2
  exit 1
fi
echo "every worker runs $package $want"
