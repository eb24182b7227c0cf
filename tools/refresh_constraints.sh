#!/usr/bin/env bash
# Move tools/constraints.txt forward on purpose: install the newest releases (no constraints) into a
# scratch venv, run the whole suite there, and only when it is green write what was installed into
# tools/constraints.txt. Review the diff and commit it with the suite's result.
# Usage, from anywhere: bash tools/refresh_constraints.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
echo "refresh: newest releases into $SCRATCH/venv"
NZRT_VENV="$SCRATCH/venv" NZRT_CONSTRAINTS="" bash tools/setup.sh
echo "refresh: running the suite with them"
"$SCRATCH/venv/bin/pytest" "$@"
{
    sed -n '1,/^# Last refreshed/p' tools/constraints.txt | sed '$d'
    echo "# Last refreshed: $(date -u +%Y-%m-%d), $("$SCRATCH/venv/bin/python" -V), $(uname -m); green: pytest ${*:-(the whole suite)}."
    "$SCRATCH/venv/bin/python" -m pip freeze --all | grep -v -e '^-e' -e '^#' -e '^nzrt' | sed 's/+[a-z0-9.]*$//'
} > "$SCRATCH/constraints.txt"
mv "$SCRATCH/constraints.txt" tools/constraints.txt
echo "refresh: tools/constraints.txt rewritten; git diff tools/constraints.txt shows what moved"
