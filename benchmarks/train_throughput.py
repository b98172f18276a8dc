"""bloomtrain's training step against Hugging Face's ``BloomForCausalLM`` + torch AdamW, side by side.

    .venv/bin/python benchmarks/train_throughput.py                       # both shapes, fp32 and bf16
    .venv/bin/python benchmarks/train_throughput.py --shapes 110m --precisions fp32 --rounds 7
    .venv/bin/python benchmarks/train_throughput.py --against parallel.activation_checkpointing=true  # a trade-off

For each shape and precision, two worker processes:

- bloomtrain as a run does (``build_trainer``: DeepSpeed, ZeRO 1, the real data loader over the bundled
  sample) and times what the training loop does per step: take the step's micro-batches from the
  loader, advance the LR schedule, ``train_step``, the parameter norm;
- Hugging Face's model at the same shape, batch, precision (bf16 through autocast over fp32 weights, as
  HF's Trainer runs it) and thread count, with torch's AdamW, gradient clipping at 1.0, and the loss
  computed as bloomtrain computes it, on the batches bloomtrain's loader produced (its loading is not
  timed).

Each runs in its own process (its own heap, as in real use; sharing one process slowed HF's step by up
to 30% here, its allocations landing in memory the other had just freed). They take turns, a round of
consecutive steps each, over several rounds after a warm-up, so drift in the machine's speed hits both
alike; a round lasts about a second (one step at the 110M shape, about ten at bloom-tiny's, whose single
steps vary by half between neighbours). tokens/s is the median over rounds. MFU counts the model FLOPs
(``bloomtrain/flops.py``) against the best matmul peak measured in the same invocation, before and after
the runs. Peak memory: each framework in a fresh process, two steps at sequence 2048, the growth of its
peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
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
ROUND_SECONDS = 1.0


def _single_process_env() -> None:
    from bloomtrain.distributed import free_port

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


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
        if trainer.finetune is not None:  # as Trainer.train_step: the weights of the step's share
            from bloomtrain.data.finetune import scale_loss_weights

            scale_loss_weights(micro_batches, trainer.dataset.denominator(trainer.progress.consumed_samples, batch),
                               trainer.layout.data)
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
    """A framework's own process: one timed round of consecutive steps per request, until told to stop
    (None). bloomtrain is asked for a number of steps and answers with the batches its loader produced;
    HF is handed those batches."""
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
    while (request := connection.recv()) is not None:
        if kind == "hf":
            steps = [[{key: torch.tensor(value) for key, value in batch.items()} for batch in micro_batches]
                     for micro_batches in request]
        started = time.perf_counter()
        produced = [step() for _ in range(request)] if kind == "bloomtrain" else [step(batches) for batches in steps]
        elapsed = time.perf_counter() - started
        # OpenMP's threads spin for a while after a parallel region; let them settle before the other
        # process starts its round, so neither is timed against the other's idle spinning.
        time.sleep(SETTLE_SECONDS)
        if kind == "bloomtrain":  # the batches as lists: no shared-memory tensors between processes
            batches = [[{key: value.tolist() for key, value in batch.items()} for batch in micro_batches]
                       for micro_batches in produced]
            connection.send((elapsed, sum(step.loader_seconds[-request:]), batches))
        else:
            connection.send((elapsed, 0.0, None))
    if kind == "bloomtrain":
        step.close()


def _take_turns(workers: dict, warmup: int, rounds: int, hand_over_batches: bool) -> tuple[dict, int]:
    """The rounds, bloomtrain first; seconds per step of each round after the warm-up, and the steps in a
    round. The other worker is handed bloomtrain's batches (HF) or asked for as many steps (a variant)."""
    for _, connection in workers.values():
        connection.recv()  # "ready": both are built before the first round starts
    seconds = {"bloomtrain": [], "other": [], "loader": []}
    steps_per_round = 1
    for index in range(warmup + rounds):
        if index == warmup:  # short steps run in rounds of about ROUND_SECONDS, which steadies their timing
            fastest = min(min(seconds["bloomtrain"]), min(seconds["other"]))
            steps_per_round = max(1, math.ceil(ROUND_SECONDS / fastest))
            seconds = {"bloomtrain": [], "other": [], "loader": []}
        workers["bloomtrain"][1].send(steps_per_round)
        elapsed, loader, steps = workers["bloomtrain"][1].recv()
        workers["other"][1].send(steps if hand_over_batches else steps_per_round)
        their_elapsed, _, _ = workers["other"][1].recv()
        seconds["bloomtrain"].append(elapsed / steps_per_round)
        seconds["other"].append(their_elapsed / steps_per_round)
        seconds["loader"].append(loader / steps_per_round)
    return seconds, steps_per_round


def run_pair(shape: str, precision: str, rounds: int, warmup: int, extra: list[str], threads: int,
             against: list[str] | None = None) -> dict:
    """Each framework in its own process (its own heap, as in real use), taking turns round by round:
    bloomtrain's steps, then HF's on the batches bloomtrain's loader produced, or, given ``against``
    (overrides), bloomtrain's with those overrides on its own loader's (the same) batches. Seconds per step."""
    import multiprocessing

    from bloomtrain.config import ConfigError
    from bloomtrain.config_loader import load_config
    from bloomtrain.flops import model_flops_per_step
    from bloomtrain.model.bloom import count_parameters

    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = _overrides(shape, precision, run_dir, extra)
        other = ("hf", overrides) if against is None else \
            ("bloomtrain", _overrides(shape, precision, f"{run_dir}/other", [*extra, *against]))
        try:  # bad overrides stop here, with the config's own message, before any worker starts
            config = load_config(overrides)
            load_config(other[1])
        except ConfigError as error:
            raise SystemExit(f"train_throughput: {error}") from None
        workers = {}
        for name, (kind, its_overrides) in {"bloomtrain": ("bloomtrain", overrides), "other": other}.items():
            ours_end, their_end = context.Pipe()
            process = context.Process(target=serve, args=(kind, its_overrides, precision, threads, their_end))
            process.start()
            their_end.close()  # only the worker holds it now: its exit ends our recv() instead of hanging it
            workers[name] = (process, ours_end)
        try:
            seconds, steps_per_round = _take_turns(workers, warmup, rounds, hand_over_batches=against is None)
        except EOFError:
            for process, _ in workers.values():
                process.kill()
            raise SystemExit("train_throughput: a worker process ended early (its error is above)") from None
        for process, connection in workers.values():
            connection.send(None)
            process.join()
    model, train = config.model, config.train
    return {"shape": shape, "precision": precision, "threads": threads, "parameters": count_parameters(model),
            "tokens_per_step": train.global_batch_size * train.seq_length,
            "flops_per_step": model_flops_per_step(model, train.global_batch_size, train.seq_length),
            "steps_per_round": steps_per_round, "bloomtrain_s": seconds["bloomtrain"], "other_s": seconds["other"],
            "loader_s": seconds["loader"]}


def peak_memory(framework: str, shape: str, precision: str, seq_length: int, extra: tuple[str, ...] = ()) -> dict:
    """Worker: one framework, two steps at ``seq_length`` (the optimizer's state and the gradients exist
    from the first step's end, so the second one's peak is a run's); the growth of this process's peak RSS."""
    import psutil

    _single_process_env()
    extra = [*extra, f"train.seq_length={seq_length}"]
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
            step()
            step.close()
        else:
            import torch

            from bloomtrain.data.loader import step_batches  # noqa: F401

            hf = HuggingFaceStep(config, precision)
            generator = torch.Generator().manual_seed(0)
            tokens = torch.randint(0, config.model.vocab_size, (config.train.global_batch_size, seq_length + 1),
                                   generator=generator)
            for _ in range(2):
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
    parser.add_argument("--against", help="instead of HF, bloomtrain with these overrides (space-separated), "
                        "e.g. --against parallel.activation_checkpointing=true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra bloomtrain config overrides, e.g. train.compile=true")
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be at least 1: the warm-up sizes the rounds")
    if args.worker:
        print(json.dumps(peak_memory(*json.loads(args.worker))))
        return

    import torch

    from bloomtrain.flops import measure_matmul_flops

    against = args.against.split() if args.against else None
    other = "HF" if against is None else f"bloomtrain {args.against}"
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
            result = run_pair(shape, precision, args.rounds, args.warmup, args.overrides, threads, against)
            results.append(result)
            print(f"{shape} {precision}, seconds per step in each round of {result['steps_per_round']} steps: "
                  f"bloomtrain {[round(s, 3) for s in result['bloomtrain_s']]}, "
                  f"{other} {[round(s, 3) for s in result['other_s']]}", flush=True)
    measure_peaks("after")
    rows = []
    for result in results:
        precision = result["precision"]
        ours, theirs = statistics.median(result["bloomtrain_s"]), statistics.median(result["other_s"])
        tokens, flops = result["tokens_per_step"], result["flops_per_step"]
        loader = statistics.median(result["loader_s"])
        rows.append((result["shape"], precision, result["parameters"], tokens / ours, tokens / theirs, theirs / ours,
                     flops / ours / peaks[precision], flops / theirs / peaks[precision], loader / ours))
    print(f"\n| shape | precision | parameters | bloomtrain tokens/s | {other} tokens/s | ratio | bloomtrain MFU | "
          f"{other} MFU | loader / step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape, precision, params, ours, theirs, ratio, mfu, hf_mfu, loader in rows:
        print(f"| {shape} | {precision} | {params / 1e6:.1f}M | {ours:,.0f} | {theirs:,.0f} | {ratio:.2f}x | "
              f"{mfu:.1%} | {hf_mfu:.1%} | {loader:.2%} |")
    if args.memory_seq:
        print(f"\npeak memory, two steps at sequence {args.memory_seq} (110m shape, fp32, growth of peak RSS):")
        runs = {"bloomtrain": ("bloomtrain", args.overrides)}
        runs[other] = ("hf", args.overrides) if against is None else ("bloomtrain", [*args.overrides, *against])
        for label, (framework, overrides) in runs.items():
            result = _worker([framework, "110m", "fp32", args.memory_seq, overrides])
            print(f"  {label}: {result['peak_growth'] / 2**30:.2f} GiB", flush=True)


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    main()
