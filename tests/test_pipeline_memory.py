"""The dedup stage, the one stage that sees every document at once, in bounded memory: a million
documents' keys and MinHash signatures (730 MB on disk) deduplicated inside a memory cgroup capped
below the size of the signatures alone — what holding them in memory, as the stage did before, needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_tools.minhash import MinHashParameters, band_keys
from tests.conftest import REPO

DOCUMENTS = 1_000_000
SHARDS = 4
CAP_BYTES = 320 * 2**20  # the signatures alone are 488 MiB
LANGUAGES = ["en", "fr", "zh", "ar", "hi"]


def _memory_cgroup(name: str, limit: int) -> Path:
    """A cgroup (v1 memory controller, or v2) limited to ``limit`` bytes of RAM, no swap; skip without one."""
    v1, v2 = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")
    if os.geteuid() != 0:
        pytest.skip("a memory cgroup needs root")
    if (v1 / "memory.limit_in_bytes").exists():
        group = v1 / name
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(limit))
        if (group / "memory.memsw.limit_in_bytes").exists():
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
        return group
    if "memory" in (v2 / "cgroup.controllers").read_text(errors="ignore") if (v2 / "cgroup.controllers").exists() \
            else False:
        group = v2 / name
        group.mkdir(exist_ok=True)
        (group / "memory.max").write_text(str(limit))
        (group / "memory.swap.max").write_text("0")
        return group
    pytest.skip("no memory cgroup controller on this machine")


def _peak(group: Path) -> int:
    for name in ("memory.max_usage_in_bytes", "memory.peak"):
        if (group / name).exists():
            return int((group / name).read_text())
    raise AssertionError(f"{group} reports no peak")


def _write_clean_stage(clean: Path, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """What the clean stage leaves for a million documents, with planted exact and near duplicates."""
    parameters = MinHashParameters()
    signatures = rng.integers(0, 2**32, size=(DOCUMENTS, parameters.num_perm), dtype=np.uint32)
    exact = rng.integers(0, 2**63, size=DOCUMENTS, dtype=np.uint64)
    originals = rng.choice(DOCUMENTS // 2, size=2000, replace=False)
    copies = DOCUMENTS // 2 + rng.choice(DOCUMENTS // 2, size=2000, replace=False)
    exact[copies[:1000]] = exact[originals[:1000]]
    near_originals, near_copies = originals[1000:], copies[1000:]
    signatures[near_copies] = signatures[near_originals]
    edited = rng.integers(0, parameters.num_perm, size=(1000, 6))  # a few functions differ: Jaccard ~0.95
    signatures[near_copies[:, None], edited] = rng.integers(0, 2**32, size=(1000, 6), dtype=np.uint32)
    clean.mkdir(parents=True)
    for shard, rows in enumerate(np.array_split(np.arange(DOCUMENTS), SHARDS)):
        name = f"{shard:05d}"
        np.save(clean / f"{name}.exact.npy", exact[rows])
        np.save(clean / f"{name}.split.npy", rng.integers(0, 2**63, size=rows.size, dtype=np.uint64))
        np.save(clean / f"{name}.signatures.npy", signatures[rows])
        np.save(clean / f"{name}.bands.npy", np.ascontiguousarray(band_keys(signatures[rows], parameters).T))
        (clean / f"{name}.langs.json").write_text(json.dumps([LANGUAGES[i % 5] for i in rows]))
    return copies[:1000], near_copies


@pytest.mark.slow
def test_dedup_of_a_million_documents_fits_under_a_cap_below_their_signatures(tmp_path):
    out = tmp_path / "out"
    exact_copies, near_copies = _write_clean_stage(out / "work" / "clean", np.random.default_rng(0))
    group = _memory_cgroup(f"bloomtrain-test-{os.getpid()}", CAP_BYTES)
    script = ("from data_tools.pipeline.config import load_pipeline_config; "
              "from data_tools.pipeline.stages import dedup; "
              f"config = load_pipeline_config(['input.paths=[{tmp_path}]', 'output.dir={out}']); "
              f"dedup(config, 0, list(range({SHARDS})))")
    try:
        result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                                timeout=600, preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
        peak = _peak(group)
    finally:
        group.rmdir()
    assert result.returncode == 0, f"dedup failed under a {CAP_BYTES >> 20} MiB cap ({result.returncode}): " \
                                   f"{result.stderr[-3000:]}"
    assert peak < CAP_BYTES
    reason = np.concatenate([np.load(out / "work" / "dedup" / f"{shard:05d}.reason.npy") for shard in range(SHARDS)])
    assert (reason[exact_copies] == 1).all() and (reason[near_copies] == 2).all()
    assert (reason != 0).sum() == 2000  # nothing else removed
    print(f"dedup of {DOCUMENTS:,} documents: peak {peak / 2**20:.0f} MiB in the cgroup")
