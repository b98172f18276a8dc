"""Throughput of each (tensor, pipeline, data) layout relative to one process, measured side by side.

    python benchmarks/layouts.py [--steps 30] [--layouts 111,112,211,121,221] [key=value ...]

Every layout trains the same config (default: bloom-tiny, the quickstart experiment) for the same
number of steps through ``python -m bloomtrain.launch``; the script reads each run's metrics.jsonl,
drops the first steps (warm-up), and prints the median tokens/s and its ratio to the (1,1,1) run.
On a CPU machine all ranks share the same cores, so the ratios show the cost of the parallel
machinery (communication, pipeline bubbles), not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WARMUP_STEPS = 5


def run_layout(layout: str, steps: int, extra: list[str], root: Path) -> dict:
    tensor, pipeline, data = (int(c) for c in layout)
    run_dir = root / f"layout-{layout}"
    command = [sys.executable, "-m", "bloomtrain.launch", "experiment=quickstart", f"run.dir={run_dir}",
               f"train.max_steps={steps}", "optimizer.warmup_steps=2", "checkpoint.interval=0",
               "logging.wandb.mode=disabled", f"parallel.tensor={tensor}", f"parallel.pipeline={pipeline}",
               f"launch.processes={tensor * pipeline * data}", *extra]
    subprocess.run(command, check=True, capture_output=True, text=True)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = metrics[WARMUP_STEPS:]
    return {"layout": layout, "tokens_per_s": statistics.median(m["tokens_per_s"] for m in timed),
            "final_loss": metrics[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--layouts", default="111,112,211,121,221")
    args, extra = parser.parse_known_args()
    layouts = args.layouts.split(",")
    if "111" not in layouts:
        layouts.insert(0, "111")
    with tempfile.TemporaryDirectory() as root:
        results = [run_layout(layout, args.steps, extra, Path(root)) for layout in layouts]
    baseline = next(r for r in results if r["layout"] == "111")["tokens_per_s"]
    print(f"{'layout (t,p,d)':>15} {'tokens/s':>10} {'vs (1,1,1)':>11} {'final loss':>11}")
    for result in results:
        t, p, d = result["layout"]
        print(f"{f'({t},{p},{d})':>15} {result['tokens_per_s']:>10,.0f} {result['tokens_per_s'] / baseline:>10.2f}x "
              f"{result['final_loss']:>11.4f}")


if __name__ == "__main__":
    main()
