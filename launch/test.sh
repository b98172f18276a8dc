#!/usr/bin/env bash
# Set up, then run the whole test suite. Fails when any test fails or when no test ran.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=$(bash "$repo/launch/setup.sh" | tail -n 1)
cd "$repo"
"$py" -m ruff check .
exec "$py" -m pytest "$@"
