#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install bloomtrain into it with its test extra.
#   - reuses the active venv ($VIRTUAL_ENV) if there is one, else ./.venv (created on first use);
#   - keeps a torch that is already installed (a CUDA build stays); where torch is missing it installs
#     torch==2.13.0, which is the CPU build on machines without CUDA;
#   - skips pip entirely when pyproject.toml has not changed since the last successful install.
# Prints the venv's python path on its last line, for the other scripts.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VIRTUAL_ENV:-$repo/.venv}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  echo "bloomtrain setup: creating $venv" >&2
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.bloomtrain-installed"
want=$(cat "$repo/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$py" -c "import bloomtrain, torch" 2>/dev/null; then
  echo "$py"
  exit 0
fi
if ! "$py" -c "import torch" 2>/dev/null; then
  echo "bloomtrain setup: installing torch==2.13.0" >&2
  "$py" -m pip install --quiet torch==2.13.0 >&2
fi
echo "bloomtrain setup: installing bloomtrain and its dependencies (a few minutes the first time)" >&2
"$py" -m pip install --quiet -e "$repo[test]" >&2
echo "$want" > "$stamp"
echo "$py"
