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

They alternate step by step over several rounds after a warm-up, so drift in the machine's speed hits
both alike; tokens/s is the median per-step rate. MFU counts the model FLOPs (``bloomtrain/flops.py``)
against the matmul peak measured once, at length, in the same invocation. Peak memory: each framework
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
        started = time.perf_counter()
        batch = trainer.batch_layout.batch_at(trainer.progress.consumed_samples)
        trainer.scheduler.step(batch)
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


def _timed(step, *args) -> tuple[float, object]:
    started = time.perf_counter()
    out = step(*args)
    return time.perf_counter() - started, out


def run_pair(shape: str, precision: str, rounds: int, warmup: int, extra: list[str]) -> dict:
    """Worker: both frameworks in this process, alternating steps."""
    import torch

    from bloomtrain.flops import model_flops_per_step

    _single_process_env()
    with tempfile.TemporaryDirectory() as run_dir:
        ours = BloomtrainStep(_overrides(shape, precision, run_dir, extra))
        theirs = HuggingFaceStep(ours.config, precision)
        ours_s, theirs_s = [], []
        for index in range(warmup + rounds):
            elapsed, micro_batches = _timed(ours)
            their_elapsed, _ = _timed(theirs, micro_batches)
            if index >= warmup:
                ours_s.append(elapsed)
                theirs_s.append(their_elapsed)
        loader = ours.loader_seconds[warmup:]
        config = ours.config
        ours.close()
    train = config.train
    tokens = train.global_batch_size * train.seq_length
    return {"shape": shape, "precision": precision, "threads": torch.get_num_threads(),
            "parameters": sum(p.numel() for p in theirs.model.parameters()), "tokens_per_step": tokens,
            "flops_per_step": model_flops_per_step(config.model, train.global_batch_size, train.seq_length),
            "bloomtrain_s": ours_s, "hf_s": theirs_s, "loader_s": loader}


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
        kind, *rest = json.loads(args.worker)
        result = run_pair(*rest) if kind == "pair" else peak_memory(*rest)
        print(json.dumps(result))
        return

    import torch

    from bloomtrain.flops import measure_matmul_flops

    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count()))
    torch.set_num_threads(threads)
    peaks = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if precision in args.precisions.split(","):
            peaks[precision] = max(measure_matmul_flops(torch.device("cpu"), dtype, size, args.peak_seconds)
                                   for size in (2048, 3072, 4096))
            print(f"matmul peak {precision}: {peaks[precision] / 1e9:,.1f} GFLOP/s "
                  f"(best of 2048/3072/4096-square, 5 rounds of {args.peak_seconds:g} s, {threads} threads)",
                  flush=True)
    rows = []
    for shape in args.shapes.split(","):
        for precision in args.precisions.split(","):
            result = _worker(["pair", shape, precision, args.rounds, args.warmup, args.overrides])
            ours, theirs = statistics.median(result["bloomtrain_s"]), statistics.median(result["hf_s"])
            tokens, flops = result["tokens_per_step"], result["flops_per_step"]
            loader = statistics.median(result["loader_s"])
            rows.append((shape, precision, result["parameters"], tokens / ours, tokens / theirs, theirs / ours,
                         flops / ours / peaks[precision], flops / theirs / peaks[precision], loader / ours))
            print(f"{shape} {precision}: bloomtrain {ours:.3f} s/step, HF {theirs:.3f} s/step "
                  f"(per step: {[round(s, 3) for s in result['bloomtrain_s']]} vs "
                  f"{[round(s, 3) for s in result['hf_s']]})", flush=True)
    print("\n| shape | precision | parameters | bloomtrain tokens/s | HF tokens/s | ratio | bloomtrain MFU | "
          "HF MFU | loader / step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape, precision, params, ours, theirs, ratio, mfu, hf_mfu, loader in rows:
        print(f"| {shape} | {precision} | {params / 1e6:.1f}M | {ours:,.0f} | {theirs:,.0f} | {ratio:.2f}x | "
              f"{mfu:.1%} | {hf_mfu:.1%} | {loader:.2%} |")
    if args.memory_seq:
        print(f"\npeak memory, one step at sequence {args.memory_seq} (110m shape, fp32, growth of peak RSS):")
        for framework in ("bloomtrain", "hf"):
            result = _worker(["memory", framework, "110m", "fp32", args.memory_seq])
            print(f"  {framework}: {result['peak_growth'] / 2**30:.2f} GiB", flush=True)


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    main()
