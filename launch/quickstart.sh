#!/usr/bin/env bash
# The CPU demo: set up, then train bloom-tiny on the bundled multilingual sample (a few hundred steps),
# with checkpoints, per-language validation every 100 steps, an offline W&B run and TensorBoard files,
# then write the run's report (curves and summary). Extra arguments are passed on as config overrides.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=$(bash "$repo/launch/setup.sh" | tail -n 1)
cd "$repo"
run_dir=${BLOOMTRAIN_RUN_DIR:-runs/quickstart-$(date +%Y%m%d-%H%M%S)}
# Two processes (data parallel 2) through the launcher, as on a cluster, only smaller.
"$py" -m bloomtrain.launch experiment=quickstart launch.processes=2 run.dir="$run_dir" "$@"
"$py" -m bloomtrain.report "$run_dir"
