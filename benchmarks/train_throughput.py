"""bloomtrain's training step against Hugging Face's ``BloomForCausalLM`` + torch AdamW, side by side.

    .venv/bin/python benchmarks/train_throughput.py                       # both shapes, fp32 and bf16
    .venv/bin/python benchmarks/train_throughput.py --shapes 110m --precisions fp32 --rounds 7

For each shape and precision one worker process builds both:

- bloomtrain as a run does (``build_trainer``: DeepSpeed, ZeRO 1, the real data loader over the bundled
  sample) and times what the training loop does per step: take the step's micro-batches from the
  loader, advance the LR schedule, ``train_step``, the parameter norm;
- Hugging Face's model at the same shape, batch, precision (bf16 through autocast over fp32 weights, as
  HF's Trainer runs it) and thread count, with torch's AdamW, gradient clipping at 1.0, and the loss
  computed as bloomtrain computes it, on the batches bloomtrain's loader produced (its loading is not
  timed).

Each runs in its own process (its own heap, as in real use; sharing one process slowed HF's step by up
to 30% here, its allocations landing in memory the other had just freed) and they take turns step by
step over several rounds after a warm-up, so drift in the machine's speed hits both alike; tokens/s is
the median per-step rate. MFU counts the model FLOPs (``bloomtrain/flops.py``)
against the best matmul peak measured in the same invocation, before and after the runs. Peak memory: each framework
in a fresh process, one step at sequence 2048, the growth of its peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    # bloom-tiny as the quickstart trains it
    "tiny": ["model=bloom-tiny", "train.seq_length=128", "train.micro_batch_size=8", "train.global_batch_size=8"],
    # 110M parameters: 85M in the blocks, 25M in a 32,768-token embedding
    "110m": ["model.hidden_size=768", "model.num_layers=12", "model.num_attention_heads=12",
             "model.vocab_size=32768", "train.seq_length=1024", "train.micro_batch_size=2",
             "train.global_batch_size=2"],
}


SETTLE_SECONDS = 0.3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _single_process_env() -> None:
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))


def _overrides(shape: str, precision: str, run_dir: str, extra: list[str]) -> list[str]:
    return ["experiment=quickstart", *SHAPES[shape], f"train.precision={precision}", "parallel.zero_stage=1",
            f"run.dir={run_dir}", "train.max_steps=1000", "optimizer.warmup_steps=10", "eval.interval=0",
            "checkpoint.interval=0", "logging.wandb.mode=disabled", "logging.tensorboard=false",
            "train.peak_tflops=1", *extra]


class BloomtrainStep:
    """The training loop's per-step work, without its logging."""

    def __init__(self, overrides: list[str]) -> None:
        from bloomtrain.config_loader import load_config
        from bloomtrain.train import build_trainer

        self.config = load_config(overrides)
        self.trainer = build_trainer(self.config)
        self.loader_seconds: list[float] = []

    def __call__(self) -> list:
        trainer = self.trainer
        batch = trainer.batch_layout.batch_at(trainer.progress.consumed_samples)
        trainer.scheduler.step(batch)
        started = time.perf_counter()
        micro_batches = next(trainer.batches)
        self.loader_seconds.append(time.perf_counter() - started)
        trainer.engine.train_step(micro_batches)
        trainer.engine.parameter_norm()
        trainer.progress.consumed_samples += batch
        return micro_batches

    def close(self) -> None:
        self.trainer.close()


class HuggingFaceStep:
    def __init__(self, config, precision: str) -> None:
        import torch
        import transformers

        model = config.model
        hf_config = transformers.BloomConfig(vocab_size=model.padded_vocab_size(), hidden_size=model.hidden_size,
                                             n_layer=model.num_layers, n_head=model.num_attention_heads,
                                             layer_norm_epsilon=model.layer_norm_epsilon)
        self.model = transformers.BloomForCausalLM(hf_config).train()
        opt = config.optimizer
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=opt.lr, betas=(opt.beta1, opt.beta2),
                                           eps=opt.eps, weight_decay=opt.weight_decay)
        self.autocast = precision == "bf16"

    def __call__(self, micro_batches: list) -> None:
        import torch
        import torch.nn.functional as F

        for batch in micro_batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.model(batch["tokens"]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())
            (loss / len(micro_batches)).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def serve(kind: str, overrides: list[str], precision: str, threads: int, connection) -> None:
    """A framework's own process: one timed step per request, until told to stop (None)."""
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    _single_process_env()
    from bloomtrain.config_loader import load_config

    if kind == "bloomtrain":
        step = BloomtrainStep(overrides)
    else:
        step = HuggingFaceStep(load_config(overrides), precision)
    connection.send("ready")
    while (micro_batches := connection.recv()) is not None:
        if kind == "hf":
            micro_batches = [{key: torch.tensor(value) for key, value in batch.items()} for batch in micro_batches]
        started = time.perf_counter()
        produced = step() if kind == "bloomtrain" else step(micro_batches)
        elapsed = time.perf_counter() - started
        # OpenMP's threads spin for a while after a parallel region; let them settle before the other
        # process starts its step, so neither is timed against the other's idle spinning.
        time.sleep(SETTLE_SECONDS)
        if kind == "bloomtrain":  # the batches as lists: no shared-memory tensors between processes
            batches = [{key: value.tolist() for key, value in batch.items()} for batch in produced]
            connection.send((elapsed, step.loader_seconds[-1], batches))
        else:
            connection.send((elapsed, 0.0, None))
    if kind == "bloomtrain":
        step.close()


def run_pair(shape: str, precision: str, rounds: int, warmup: int, extra: list[str], threads: int) -> dict:
    """Each framework in its own process (its own heap, as in real use), taking turns step by step:
    bloomtrain's step, then HF's on the batch bloomtrain's loader produced."""
    import multiprocessing

    from bloomtrain.config_loader import load_config
    from bloomtrain.flops import model_flops_per_step
    from bloomtrain.model.bloom import count_parameters

    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = _overrides(shape, precision, run_dir, extra)
        config = load_config(overrides)
        workers = {}
        for kind in ("bloomtrain", "hf"):
            ours_end, their_end = context.Pipe()
            process = context.Process(target=serve, args=(kind, overrides, precision, threads, their_end))
            process.start()
            workers[kind] = (process, ours_end)
        for _, connection in workers.values():
            if connection.recv() != "ready":
                raise SystemExit("a benchmark worker failed to start")
        seconds = {"bloomtrain": [], "hf": [], "loader": []}
        for index in range(warmup + rounds):
            workers["bloomtrain"][1].send(True)
            elapsed, loader, micro_batches = workers["bloomtrain"][1].recv()
            workers["hf"][1].send(micro_batches)
            their_elapsed, _, _ = workers["hf"][1].recv()
            if index >= warmup:
                seconds["bloomtrain"].append(elapsed)
                seconds["hf"].append(their_elapsed)
                seconds["loader"].append(loader)
        for process, connection in workers.values():
            connection.send(None)
            process.join()
    model, train = config.model, config.train
    return {"shape": shape, "precision": precision, "threads": threads, "parameters": count_parameters(model),
            "tokens_per_step": train.global_batch_size * train.seq_length,
            "flops_per_step": model_flops_per_step(model, train.global_batch_size, train.seq_length),
            "bloomtrain_s": seconds["bloomtrain"], "hf_s": seconds["hf"], "loader_s": seconds["loader"]}


def peak_memory(framework: str, shape: str, precision: str, seq_length: int) -> dict:
    """Worker: one framework, one step at ``seq_length``; the growth of this process's peak RSS."""
    import psutil

    _single_process_env()
    extra = [f"train.seq_length={seq_length}"]
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = _overrides(shape, precision, run_dir, extra)
        from bloomtrain.config_loader import load_config

        config = load_config(overrides)
        import transformers  # noqa: F401

        from bloomtrain.train import build_trainer  # noqa: F401 -- both import the same libraries first

        before = psutil.Process().memory_info().rss
        if framework == "bloomtrain":
            step = BloomtrainStep(overrides)
            step()
            step.close()
        else:
            import torch

            from bloomtrain.data.loader import step_batches  # noqa: F401

            hf = HuggingFaceStep(config, precision)
            generator = torch.Generator().manual_seed(0)
            tokens = torch.randint(0, config.model.vocab_size, (config.train.global_batch_size, seq_length + 1),
                                   generator=generator)
            hf([{"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"framework": framework, "peak_growth": peak - before}


def _worker(args: list[str]) -> dict:
    command = [sys.executable, __file__, "--worker", json.dumps(args)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,110m")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-seq", type=int, default=2048, help="0 skips the memory comparison")
    parser.add_argument("--peak-seconds", type=float, default=1.0, help="length of each matmul-peak round")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra bloomtrain config overrides, e.g. train.compile=true")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(peak_memory(*json.loads(args.worker))))
        return

    import torch

    from bloomtrain.flops import measure_matmul_flops

    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count()))
    torch.set_num_threads(threads)
    precisions = args.precisions.split(",")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {precision: 0.0 for precision in precisions}

    def measure_peaks(when: str) -> None:
        # Before and after the runs, the best counting: a peak read while the machine was slow would
        # flatter every MFU below.
        for precision in precisions:
            measured = max(measure_matmul_flops(torch.device("cpu"), dtypes[precision], size, args.peak_seconds)
                           for size in (2048, 3072, 4096))
            peaks[precision] = max(peaks[precision], measured)
            print(f"matmul peak {precision} {when}: {measured / 1e9:,.1f} GFLOP/s (best of 2048/3072/4096-square, "
                  f"5 rounds of {args.peak_seconds:g} s, {threads} threads)", flush=True)

    measure_peaks("before")
    results = []
    for shape in args.shapes.split(","):
        for precision in precisions:
            result = run_pair(shape, precision, args.rounds, args.warmup, args.overrides, threads)
            results.append(result)
            print(f"{shape} {precision}: per step bloomtrain {[round(s, 3) for s in result['bloomtrain_s']]} s, "
                  f"HF {[round(s, 3) for s in result['hf_s']]} s", flush=True)
    measure_peaks("after")
    rows = []
    for result in results:
        precision = result["precision"]
        ours, theirs = statistics.median(result["bloomtrain_s"]), statistics.median(result["hf_s"])
        tokens, flops = result["tokens_per_step"], result["flops_per_step"]
        loader = statistics.median(result["loader_s"])
        rows.append((result["shape"], precision, result["parameters"], tokens / ours, tokens / theirs, theirs / ours,
                     flops / ours / peaks[precision], flops / theirs / peaks[precision], loader / ours))
    print("\n| shape | precision | parameters | bloomtrain tokens/s | HF tokens/s | ratio | bloomtrain MFU | "
          "HF MFU | loader / step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape, precision, params, ours, theirs, ratio, mfu, hf_mfu, loader in rows:
        print(f"| {shape} | {precision} | {params / 1e6:.1f}M | {ours:,.0f} | {theirs:,.0f} | {ratio:.2f}x | "
              f"{mfu:.1%} | {hf_mfu:.1%} | {loader:.2%} |")
    if args.memory_seq:
        print(f"\npeak memory, one step at sequence {args.memory_seq} (110m shape, fp32, growth of peak RSS):")
        for framework in ("bloomtrain", "hf"):
            result = _worker([framework, "110m", "fp32", args.memory_seq])
            print(f"  {framework}: {result['peak_growth'] / 2**30:.2f} GiB", flush=True)


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    main()
