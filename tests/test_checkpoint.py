"""Checkpoints: new layouts, Hugging Face export from a parallel layout, weights-only loading, pruning
(CPU, gloo, bloom-tiny). Kills, stop signals and damaged checkpoints are in tests/faults/."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bloomtrain.checkpoint import store
from bloomtrain.metrics import read_metrics
from tests.conftest import REPO, run_torchrun, run_train, tiny_run


def _losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run_dir)}


# ------------------------------------------------------------------------------------------ new layouts

LAYOUT_CHANGES = [((2, 2, 2), (1, 1, 1)), ((1, 1, 1), (2, 1, 2)), ((2, 1, 1), (1, 2, 1))]


def _layout(tensor: int, pipeline: int, data: int) -> list[str]:
    return [f"parallel.tensor={tensor}", f"parallel.pipeline={pipeline}", f"parallel.data={data}"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("source,target", LAYOUT_CHANGES,
                         ids=["{}{}{}->{}{}{}".format(*a, *b) for a, b in LAYOUT_CHANGES])
def test_resume_under_a_new_layout(source, target, tmp_path, sample_cache):
    # A small clip keeps clipping active, so the restored optimizer state and norms must be right.
    common = ["train.max_steps=4", "checkpoint.interval=2", "checkpoint.keep=0", "optimizer.grad_clip=0.3"]
    original = tmp_path / "original"
    run_torchrun(source[0] * source[1] * source[2], tiny_run(original, sample_cache, *common, *_layout(*source)))

    resumed = tmp_path / "resumed"
    result = run_torchrun(target[0] * target[1] * target[2],
                          tiny_run(resumed, sample_cache, *common, *_layout(*target),
                                     f"checkpoint.resume={original}/checkpoints/step_2"))
    assert "through a universal checkpoint" in result.stderr
    want, got = _losses(original), _losses(resumed)
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got[step], want[step])


@pytest.mark.multiprocess
def test_hf_export_from_a_tensor_and_pipeline_parallel_run(tmp_path, sample_cache):
    transformers = pytest.importorskip("transformers")
    from bloomtrain.checkpoint.universal import convert_to_universal
    from bloomtrain.convert import to_hf
    from bloomtrain.model import Bloom

    run_dir = tmp_path / "run"
    run_torchrun(4, tiny_run(run_dir, sample_cache, "train.max_steps=2", "optimizer.warmup_steps=1",
                               *_layout(2, 2, 1)))
    checkpoint = run_dir / "checkpoints" / "step_2"
    hf_dir = to_hf(run_dir, tmp_path / "hf")
    hf_model = transformers.BloomForCausalLM.from_pretrained(hf_dir).eval()

    # The weights as DeepSpeed's own universal conversion merges them, independent of our export path.
    universal = convert_to_universal(checkpoint, tmp_path / "universal")
    meta = store.read_meta(checkpoint)
    model = Bloom(meta.model, meta.padded_vocab_size)
    state = {name: torch.load(universal / "zero" / name / "fp32.pt", weights_only=True)["param"]
             for name, _ in model.named_parameters()}
    model.load_state_dict(state, strict=True)
    tokens = torch.randint(0, meta.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(tokens)[..., : meta.model.vocab_size]
        theirs = hf_model(tokens).logits
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


# ------------------------------------------------------------------------------------ the on-disk format


def test_prune_keeps_the_newest_and_every_nth(tmp_path):
    for step in range(10, 80, 10):
        (tmp_path / f"step_{step}").mkdir()
    store.prune(tmp_path, keep=2, keep_every=30)
    assert sorted(store.step_of(p) for p in store.published_checkpoints(tmp_path)) == [30, 60, 70]


@pytest.mark.multiprocess
def test_zero_0_checkpoint_names_the_fix_for_a_new_layout(tmp_path, sample_cache):
    common = ["train.max_steps=2", "optimizer.warmup_steps=1", "parallel.zero_stage=0"]
    run_train(tiny_run(tmp_path / "a", sample_cache, *common))
    result = run_torchrun(2, tiny_run(tmp_path / "b", sample_cache, *common, "parallel.tensor=2",
                                        f"checkpoint.resume={tmp_path / 'a'}"), check=False)
    assert result.returncode != 0
    assert "config error" in result.stderr and "parallel.zero_stage>=1" in result.stderr


@pytest.mark.multiprocess
def test_training_starts_from_hugging_face_weights_under_any_layout(tmp_path, sample_cache):
    from bloomtrain.convert import from_hf_to_checkpoint, to_hf

    common = ["train.max_steps=2", "optimizer.warmup_steps=1"]
    run_train(tiny_run(tmp_path / "trained", sample_cache, "train.max_steps=6", "optimizer.warmup_steps=1"))
    hf_dir = to_hf(tmp_path / "trained", tmp_path / "hf")
    start = from_hf_to_checkpoint(hf_dir, tmp_path / "from_hf")

    fresh = tmp_path / "fresh"
    run_train(tiny_run(fresh, sample_cache, *common))
    single, tensor = tmp_path / "single", tmp_path / "tensor"
    result = run_train(tiny_run(single, sample_cache, *common, f"checkpoint.resume={start}"))
    assert "starting from the weights in" in result.stderr
    # The Hugging Face folder itself as checkpoint.init_from (what fine-tuning runs start from): converted
    # once into the run directory, the same weights.
    run_torchrun(2, tiny_run(tensor, sample_cache, *common, "parallel.tensor=2", f"checkpoint.init_from={hf_dir}"))
    assert (tensor / "init" / "latest").is_file()
    assert [m["step"] for m in read_metrics(single)] == [1, 2]  # a new run: step 1, fresh optimizer
    assert _losses(single)[1] < _losses(fresh)[1] - 0.1  # the trained weights, not a fresh init
    for step in (1, 2):
        assert _losses(tensor)[step] == pytest.approx(_losses(single)[step], rel=1e-5)


@pytest.mark.slow
def test_continued_pretraining_of_a_hugging_face_bloom_on_its_own_tokenizer(tmp_path):
    """A Hugging Face BLOOM folder (weights + byte-level BPE tokenizer.json) -> the pipeline tokenizes with
    that tokenizer -> from-hf -> training starts from the weights: its first loss is what transformers
    computes on the same batch; data tokenized otherwise is refused; to-hf gives the tokenizer back."""
    transformers = pytest.importorskip("transformers")
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.tokenizers import MegatronTokenizer

    from bloomtrain.convert import from_hf_to_checkpoint, to_hf
    from bloomtrain.data.blend import read_blend
    from bloomtrain.data.loader import build_train_dataset
    from bloomtrain.data.tokenizer import tokenizer_fingerprint
    from data_tools.sample import SAMPLE_CORPUS
    from tests.conftest import save_byte_level_bpe

    documents = [json.loads(line) for line in SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines()[::4]]
    hf_dir = save_byte_level_bpe([d["text"] for d in documents], 512, tmp_path / "hf-bloom")
    torch.manual_seed(0)
    hf_config = transformers.BloomConfig(vocab_size=512, hidden_size=64, n_layer=2, n_head=4)
    transformers.BloomForCausalLM(hf_config).save_pretrained(hf_dir)

    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"id": f"d{i}", "text": d["text"]}, ensure_ascii=False) + "\n"
                           for i, d in enumerate(documents)), encoding="utf-8")
    data = tmp_path / "data"
    subprocess.run([sys.executable, "-m", "data_tools.pipeline", f"input.paths=[{raw}]", f"output.dir={data}",
                    "quality.enabled=false", f"tokenizer.existing={hf_dir}"], cwd=REPO, check=True,
                   capture_output=True, timeout=600)
    blend = read_blend(data / "blend.json")
    assert Path(blend.tokenizer) == data / "tokenizer"
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(data / "tokenizer")
    cleaned = [json.loads(line) for path in sorted((data / "cleaned").glob("*.jsonl"))
               for line in path.read_text(encoding="utf-8").splitlines()]
    english = [d["text"] for d in cleaned if d["lang"] == "en" and d["split"] == "train"]
    tokens = IndexedDataset(str(data / "tokens" / "en"))
    assert len(tokens) == len(english) > 0
    for i, text in enumerate(english):
        assert hf_tokenizer.decode(tokens[i].tolist()) == text + "</s>"

    start = from_hf_to_checkpoint(hf_dir, tmp_path / "from_hf")
    fingerprint = tokenizer_fingerprint(hf_dir)
    assert store.read_meta(start).tokenizer == fingerprint == tokenizer_fingerprint(data / "tokenizer")
    model = ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4", "model.vocab_size=512"]
    common = ["experiment=quickstart", *model, "train.max_steps=2", "train.seq_length=64", "optimizer.warmup_steps=1",
              "logging.wandb.mode=disabled", f"checkpoint.resume={start}"]
    run_dir = tmp_path / "run"
    run_train([*common, f"run.dir={run_dir}", f"data.blend={data / 'blend.json'}"])

    # The batch the trainer saw at step 1, rebuilt from megatron-core's dataset the run indexed.
    dataset = build_train_dataset(blend, MegatronTokenizer.from_pretrained(blend.tokenizer), 64, 2 * 16, 1234,
                                  run_dir / "data_index")
    samples = [dataset[i] for i in range(16)]
    inputs = torch.stack([torch.as_tensor(s["tokens"]) for s in samples])
    labels = torch.stack([torch.as_tensor(s["labels"]) for s in samples])
    hf_model = transformers.BloomForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        logits = hf_model(inputs).logits
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()
    assert _losses(run_dir)[1] == pytest.approx(want, rel=1e-5)

    # Data tokenized with anything else is refused before training, with the way out.
    other = data / "other-tokenizer"
    shutil.copytree(data / "tokenizer", other)
    content = json.loads((other / "tokenizer.json").read_text())
    content["model"]["merges"] = content["model"]["merges"][:-1]
    (other / "tokenizer.json").write_text(json.dumps(content))
    payload = json.loads((data / "blend.json").read_text())
    (data / "other-blend.json").write_text(json.dumps({**payload, "tokenizer": "other-tokenizer"}))
    refused = run_train([*common, f"run.dir={tmp_path / 'refused'}", f"data.blend={data / 'other-blend.json'}"],
                        check=False)
    assert refused.returncode != 0
    assert "another tokenizer" in refused.stderr and f"tokenizer.existing={start / 'tokenizer'}" in refused.stderr

    exported = to_hf(run_dir, tmp_path / "exported")
    round_trip = transformers.AutoTokenizer.from_pretrained(exported)
    assert round_trip(english[0])["input_ids"] == hf_tokenizer(english[0])["input_ids"]
    assert store.read_meta(run_dir / "checkpoints" / "step_2").tokenizer == fingerprint


# ------------------------------------------------------------------------------------ batch-size ramp-up

@pytest.mark.multiprocess
def test_a_resume_in_the_middle_of_a_ramp_up_continues_exactly(tmp_path, sample_cache):
    # Data parallel 2, micro batch 4: the global batch is 8 for the first 40 samples, then 16.
    ramp = ["train.micro_batch_size=4", "train.rampup_batch_size=[8,8,40]", "parallel.data=2",
            "optimizer.decay_steps=8", "checkpoint.interval=4", "checkpoint.keep=0"]
    reference = tmp_path / "uninterrupted"
    run_torchrun(2, tiny_run(reference, sample_cache, "train.max_steps=8", *ramp))
    want = read_metrics(reference)
    assert [m["global_batch_size"] for m in want] == [8, 8, 8, 8, 8, 16, 16, 16]
    assert [m["consumed_samples"] for m in want] == [8, 16, 24, 32, 40, 56, 72, 88]

    # The same ramp through DeepSpeed's pipeline engine (1F1B over two stages, one replica) trains the same
    # curve: each step's micro-batches end exactly at its optimizer step in both engines.
    ramp_pipeline = [item for item in ramp if item != "parallel.data=2"] + ["parallel.pipeline=2", "parallel.data=1"]
    run_torchrun(2, tiny_run(tmp_path / "pipeline", sample_cache, "train.max_steps=8", *ramp_pipeline))
    for mine, theirs in zip(read_metrics(tmp_path / "pipeline"), want, strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5), mine["step"]

    resumed = tmp_path / "resumed"
    run_torchrun(2, tiny_run(resumed, sample_cache, "train.max_steps=4", *ramp))  # stops inside the ramp
    result = run_torchrun(2, tiny_run(resumed, sample_cache, "train.max_steps=8", *ramp))
    assert "resumed from" in result.stderr and "step_4" in result.stderr
    got = read_metrics(resumed)
    assert [m["step"] for m in got] == list(range(1, 9))
    for mine, theirs in zip(got, want, strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-6, abs=0), mine["step"]
        assert (mine["lr"], mine["global_batch_size"]) == (theirs["lr"], theirs["global_batch_size"])
