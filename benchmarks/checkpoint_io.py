"""Checkpoint save and load speed vs writing and reading the same bytes raw, side by side in one run.

    .venv/bin/python benchmarks/checkpoint_io.py [--hidden 1024 --layers 8 --repeats 3]

One process, layout (1,1,1), ZeRO 1, fp32, one training step first (so Adam's moments exist). Save:
bloomtrain's CheckpointManager (DeepSpeed's files, SHA-256 manifest, fsync, atomic publish). Load:
manifest verification, then DeepSpeed's load under weights-only unpickling. The raw baseline writes
the same file sizes from a prepared buffer with one write and an fsync per file, then reads them
back, in the same directory. The page cache is dropped before reads when allowed (root).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def raw_write_read(directory: Path, sizes: list[int]) -> tuple[float, float]:
    directory.mkdir(parents=True, exist_ok=True)
    megabyte = 1 << 20
    data = memoryview(os.urandom(megabyte) * (max(sizes) // megabyte + 1))  # built before the clock starts
    started = time.perf_counter()
    for index, size in enumerate(sizes):
        with open(directory / f"raw_{index}", "wb") as handle:
            handle.write(data[:size])
            handle.flush()
            os.fsync(handle.fileno())
    written = time.perf_counter() - started
    drop_page_cache()
    started = time.perf_counter()
    for index in range(len(sizes)):
        (directory / f"raw_{index}").read_bytes()
    read = time.perf_counter() - started
    shutil.rmtree(directory)
    return written, read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()

    import torch

    from bloomtrain.build import build_engine
    from bloomtrain.checkpoint.manager import CheckpointManager
    from bloomtrain.checkpoint.store import TrainingProgress
    from bloomtrain.config_loader import load_config, to_yaml
    from bloomtrain.data.blend import read_blend
    from bloomtrain.distributed import init_distributed, shutdown_distributed
    from bloomtrain.parallel.cpu import apply_cpu_accommodations
    from bloomtrain.parallel.groups import init_parallel_groups
    from bloomtrain.parallel.layout import resolve_layout
    from data_tools.sample import prepare_sample

    root = Path(args.dir or tempfile.mkdtemp(prefix="bloomtrain-ckpt-bench-"))
    config = load_config(["experiment=quickstart", f"run.dir={root / 'run'}", f"model.hidden_size={args.hidden}",
                          f"model.num_layers={args.layers}", "model.num_attention_heads=16",
                          "parallel.zero_stage=1", "checkpoint.keep=1"])
    layout = resolve_layout(config, 1)
    apply_cpu_accommodations()
    context = init_distributed("cpu")
    init_parallel_groups(layout)
    tokenizer = read_blend(prepare_sample(config.data.cache_dir)).tokenizer
    manager = CheckpointManager(config.checkpoint, root / "run", layout, config.model, tokenizer, to_yaml(config))
    engine, scheduler = build_engine(config, layout, context.device, manager.plan_resume())
    parameters = sum(p.numel() for p in engine.module.parameters())
    # One optimizer step so Adam's moments exist and the checkpoint has its full size.
    train = config.train
    tokens = torch.randint(0, config.model.vocab_size, (train.micro_batch_size, train.seq_length))
    engine.train_step([{"tokens": tokens, "labels": tokens}] * (train.global_batch_size // train.micro_batch_size))

    saves, loads, raw_writes, raw_reads = [], [], [], []
    cold = False
    for repeat in range(args.repeats):
        started = time.perf_counter()
        checkpoint = manager.save(engine.engine, scheduler, TrainingProgress(step=repeat + 1))
        saves.append(time.perf_counter() - started)
        sizes = [p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()]
        cold = drop_page_cache()
        started = time.perf_counter()
        plan = manager.plan_resume()  # verifies the manifest's checksums, reads meta.json
        assert plan.checkpoint == checkpoint and not plan.universal
        manager.restore(plan, engine.engine, scheduler)
        loads.append(time.perf_counter() - started)
        written, read = raw_write_read(root / "raw", sizes)
        raw_writes.append(written)
        raw_reads.append(read)
    total = sum(sizes)
    save, load = statistics.median(saves), statistics.median(loads)
    raw_write, raw_read = statistics.median(raw_writes), statistics.median(raw_reads)
    print(f"model: hidden {args.hidden}, {args.layers} layers, {parameters / 1e6:.1f}M parameters; "
          f"checkpoint {total / 1e9:.2f} GB in {len(sizes)} files; page cache dropped before reads: {cold}")
    print(f"{'':24}{'seconds':>10}{'GB/s':>10}{'raw GB/s':>10}{'ratio':>8}")
    print(f"{'save (manifest, fsync)':24}{save:10.2f}{total / save / 1e9:10.2f}{total / raw_write / 1e9:10.2f}"
          f"{raw_write / save:8.2f}")
    print(f"{'load (verify, restore)':24}{load:10.2f}{total / load / 1e9:10.2f}{total / raw_read / 1e9:10.2f}"
          f"{raw_read / load:8.2f}")
    shutdown_distributed()
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
