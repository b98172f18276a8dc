#!/usr/bin/env bash
# Set up, then lint (ruff), check the import layers (import-linter's contracts in pyproject.toml) and
# run the whole test suite. Fails when any of them fails or when no test ran.
#   bash launch/test.sh -m "not slow"    # the fast tier, for the development loop (a few minutes)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=$(bash "$repo/launch/setup.sh" | tail -n 1)
cd "$repo"
"$py" -m ruff check .
"$(dirname "$py")/lint-imports" --no-cache
exec "$py" -m pytest "$@"
