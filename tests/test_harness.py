"""The lm-evaluation-harness model, the shipped task suites, ``python -m bloomtrain.harness`` and
``eval.tasks`` during training.

The runs here train on the bundled sample tokenized with a tiny BLOOM-style byte-level BPE (a Hugging Face
``tokenizer.json``), so that an export of their checkpoints is a folder lm-eval's own ``hf`` model reads:
the reference every number here is compared with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bloomtrain.metrics import EVAL_FILE, read_metrics
from tests.conftest import REPO, run_process, run_torchrun, run_train, save_byte_level_bpe, tiny_run

pytest.importorskip("lm_eval")

TASKS_OF_OUR_OWN = REPO / "tests" / "harness_tasks"  # letters_sentiment: one-token answers
TASKS = ["nusax_sentiment_eng", "nusax_mt_eng_ind", "heldout", "letters_sentiment"]
TASK_KEYS = [f"eval.tasks=[{','.join(TASKS)}]", "eval.tasks_limit=8", "eval.tasks_max_length=128",
             f"eval.tasks_include_path=[{TASKS_OF_OUR_OWN}]"]
HARNESS_FLAGS = ["--tasks", ",".join(TASKS), "--limit", "8", "--max_length", "128", "--bootstrap_iters", "0",
                 "--split", "validation",
                 "--include_path", str(TASKS_OF_OUR_OWN)]
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def hf_sample(tmp_path_factory) -> Path:
    """The bundled sample as a blend (train and validation token files per language) tokenized with a
    512-token byte-level BPE trained on it and on NusaX's English sentences; returns the blend file."""
    from bloomtrain.data.blend import Blend, BlendEntry, write_blend
    from bloomtrain.data.tokenizer import install_tokenizer
    from bloomtrain.harness.tasks.nusax import nusax
    from data_tools.sample import SAMPLE_CORPUS, read_documents
    from data_tools.token_files import write_token_files

    root = tmp_path_factory.mktemp("hf_sample")
    documents = list(read_documents(SAMPLE_CORPUS))
    english = [row["text"] for row in nusax._rows(nusax.DATA / "sentiment" / "english" / "train.csv")]
    save_byte_level_bpe([d["text"] for d in documents] + english, 500, root / "bpe")
    install_tokenizer(root / "bpe", root / "tokenizer")
    splits: dict[str, dict[str, list[str]]] = {"train": {}, "valid": {}}
    for index, doc in enumerate(documents):
        splits["valid" if index % 10 == 0 else "train"].setdefault(doc["lang"], []).append(doc["text"])
    counts = write_token_files(splits["train"], root / "tokenizer", root / "tokens")
    valid = write_token_files(splits["valid"], root / "tokenizer", root / "tokens" / "valid")
    write_blend(root / "blend.json", Blend(tokenizer="tokenizer", datasets=[
        BlendEntry(prefix=f"tokens/{lang}", weight=1.0 / len(counts), lang=lang, tokens=counts[lang],
                   valid_prefix=f"tokens/valid/{lang}", valid_tokens=valid[lang]) for lang in sorted(counts)]))
    return root / "blend.json"


def _task_run(run_dir: Path, blend: Path, cache: Path, *extra: str) -> list[str]:
    """Eight steps (enough for greedy text that is not empty), validation and the tasks after the last."""
    return tiny_run(run_dir, cache, f"data.blend={blend}", "model.vocab_size=500", "train.max_steps=8",
                    "optimizer.warmup_steps=1", "optimizer.lr=3e-3", "eval.interval=8", "eval.iters=2",
                    *TASK_KEYS, *extra)


@pytest.fixture(scope="module")
def task_run(tmp_path_factory, hf_sample, sample_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("task_run") / "run"
    run_train(_task_run(run_dir, hf_sample, sample_cache, "logging.tensorboard=true", "logging.wandb.mode=offline"),
              env=OFFLINE)
    return run_dir


def run_harness(path: Path, *flags: str, processes: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1", **(env or {})}
    if processes == 1:
        command = [sys.executable, "-m", "bloomtrain.harness", str(path), *flags]
        return run_process(command, REPO, full_env, timeout=600)
    return run_torchrun(processes, [str(path), *flags], module="bloomtrain.harness", env=full_env, check=False)


def harness_scores(path: Path, out: Path, processes: int = 1) -> dict:
    result = run_harness(path, *HARNESS_FLAGS, "--output_path", str(out), processes=processes)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def last_task_scores(run_dir: Path) -> dict[str, float]:
    """``{"<task>/<metric>": score}`` of the last line of eval.jsonl with task scores."""
    tasks = [record for record in read_metrics(run_dir, EVAL_FILE) if record.get("tasks")][-1]["tasks"]
    return {f"{task}/{metric}": value for task, metrics in tasks.items() for metric, value in metrics.items()}


# ----------------------------------------------------------------------------------- exactness


def _requests():
    """~300 log-likelihood requests (NusaX's three label words after 100 prompts, and empty contexts),
    rolling log-likelihoods of whole sentences, and greedy generations with and without a stop string."""
    from lm_eval.api.instance import Instance

    from bloomtrain.harness.tasks.nusax import nusax

    rows = nusax._rows(nusax.DATA / "sentiment" / "english" / "test.csv")[:100]
    pairs = [(f"Text: {row['text']}\nSentiment:", f" {label}") for row in rows for label in nusax.LABELS]
    pairs += [(f"Text: {row['text']}\nAnswer:", f" {letter}") for row in rows[:30] for letter in "abc"]
    pairs += [("", row["text"][:40]) for row in rows[:10]]
    rolling = [(row["text"],) for row in rows[:12]]
    generations = [(f"Text: {row['text']}\n", {"until": ["\n"], "max_gen_toks": 24, "do_sample": False})
                   for row in rows[:8]] + [(row["text"][:30], {"until": [], "max_gen_toks": 16}) for row in rows[8:12]]

    def instances(kind, arguments):
        return [Instance(kind, doc={}, arguments=args, idx=0) for args in arguments]

    return instances("loglikelihood", pairs), instances("loglikelihood_rolling", rolling), \
        instances("generate_until", generations)


def _ours(path: Path, max_length: int = 128):
    from bloomtrain.checkpoint.loading import load_model
    from bloomtrain.harness.lm import BloomtrainLM
    from bloomtrain.harness.scoring import PlainScorer

    loaded = load_model(path)
    scorer = PlainScorer(loaded.model, loaded.model.config.vocab_size)
    return BloomtrainLM(scorer, loaded.tokenizer, max_length, batch_size=16, show_progress=False)


def assert_equals_lm_evals_hf_model(checkpoint: Path, hf_dir: Path) -> None:
    from lm_eval.models.huggingface import HFLM

    from bloomtrain.data.tokenizer import TokenEncoder

    reference = HFLM(pretrained=str(hf_dir), backend="causal", dtype="float32", device="cpu", batch_size=16,
                     max_length=128, prefix_token_id=TokenEncoder(hf_dir).eos_id)
    loglikelihood, rolling, generations = _requests()
    want = reference.loglikelihood(loglikelihood, disable_tqdm=True)
    want_rolling = reference.loglikelihood_rolling(rolling, disable_tqdm=True)
    want_text = reference.generate_until(generations, disable_tqdm=True)
    assert sum(bool(text.strip()) for text in want_text) >= 4  # the comparison holds text, not blanks
    for path in (checkpoint, hf_dir):
        ours = _ours(path)
        got = ours.loglikelihood(loglikelihood, disable_tqdm=True)
        assert len(got) == len(want) >= 300 and all(len(ours.tok_encode(f" {letter}")) == 1 for letter in "abc")
        for (logprob, greedy), (want_logprob, want_greedy) in zip(got, want, strict=True):
            assert logprob == pytest.approx(want_logprob, rel=1e-4)
            assert greedy == want_greedy
        assert ours.loglikelihood_rolling(rolling) == pytest.approx(want_rolling, rel=1e-4)
        assert ours.generate_until(generations) == want_text


@pytest.mark.slow
def test_the_adapter_equals_lm_evals_hf_model_on_the_same_weights(task_run, tmp_path):
    from bloomtrain.checkpoint.hf import to_hf
    from bloomtrain.checkpoint.store import resolve_checkpoint

    checkpoint = resolve_checkpoint(task_run)
    assert_equals_lm_evals_hf_model(checkpoint, to_hf(checkpoint, tmp_path / "hf"))


# ----------------------------------------------------------------------------------- scores


@pytest.mark.slow
def test_in_training_scores_equal_the_harness_on_the_checkpoint_with_no_network(task_run, tmp_path):
    """One process. The harness runs with every socket refused but local ones (a sitecustomize), as on a
    machine without network; the held-out perplexity agrees with the run's per-language validation."""
    no_network = tmp_path / "no_network"
    no_network.mkdir()
    (no_network / "sitecustomize.py").write_text(
        "import socket\n_connect = socket.socket.connect\n"
        "def connect(self, address):\n"
        "    local = address[0] in ('127.0.0.1', '::1', 'localhost')\n"
        "    if self.family in (socket.AF_INET, socket.AF_INET6) and not local:\n"
        "        raise OSError('network disabled by the test: ' + str(address))\n"
        "    return _connect(self, address)\n"
        "socket.socket.connect = connect\n")
    out = tmp_path / "results.json"
    result = run_harness(task_run, *HARNESS_FLAGS, "--output_path", str(out),
                         env={"PYTHONPATH": f"{no_network}:{REPO}"})
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    scores, in_training = results["bloomtrain"]["scores"], last_task_scores(task_run)
    assert set(scores) == set(in_training) and len(scores) > 10
    for name, value in in_training.items():
        assert scores[name] == pytest.approx(value, rel=1e-5, abs=1e-9), name
    assert results["bloomtrain"]["step"] == 8 and results["bloomtrain"]["code_version"]
    assert results["n-samples"]["nusax_sentiment_eng"]["effective"] == 8

    validation = [record for record in read_metrics(task_run, EVAL_FILE) if "loss" in record][-1]
    gaps = [abs(scores[f"heldout_{language}/loss"] - values["loss"]) / values["loss"]
            for language, values in validation["languages"].items()]
    spread = max(v["loss"] for v in validation["languages"].values()) - min(
        v["loss"] for v in validation["languages"].values())
    assert spread > 0.1 and max(gaps) < 0.02, (gaps, spread)  # per language, not just on average


@pytest.mark.slow
def test_task_scores_reach_wandb_tensorboard_and_the_report(task_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bloomtrain.report import main as report
    from tests.conftest import read_wandb_history

    scores = last_task_scores(task_run)
    events = EventAccumulator(str(task_run / "tensorboard"))
    events.Reload()
    logged = [row for row in read_wandb_history(task_run) if "tasks/nusax_sentiment_eng/acc" in row]
    for name, value in scores.items():
        assert [(e.step, e.value) for e in events.Scalars(f"tasks/{name}")] == [(8, pytest.approx(value))]
        assert logged[-1][f"tasks/{name}"] == pytest.approx(value) and logged[-1]["_step"] == 8
    assert report([str(task_run)]) == 0
    summary = json.loads((task_run / "report" / "summary.json").read_text())
    assert summary["tasks"] == pytest.approx(scores) and summary["tasks_step"] == 8
    assert "## Task scores" in (task_run / "report" / "summary.md").read_text()


@pytest.mark.multiprocess
def test_in_training_scores_under_tensor_pipeline_and_data_parallel_equal_the_harness(tmp_path, hf_sample,
                                                                                      sample_cache):
    """tensor 2 x pipeline 2 x data 2: the requests are split over the data-parallel ranks in training and over
    the harness's two processes after it; the checkpoint the run saves is also exact against lm-eval's hf model."""
    from bloomtrain.checkpoint.hf import to_hf
    from bloomtrain.checkpoint.store import resolve_checkpoint

    run_dir = tmp_path / "run"
    run_torchrun(8, _task_run(run_dir, hf_sample, sample_cache, "parallel.tensor=2", "parallel.pipeline=2",
                              "parallel.data=2"), env=OFFLINE)
    results = harness_scores(run_dir, tmp_path / "results.json", processes=2)
    in_training = last_task_scores(run_dir)
    assert set(results["bloomtrain"]["scores"]) == set(in_training)
    for name, value in in_training.items():
        assert results["bloomtrain"]["scores"][name] == pytest.approx(value, rel=1e-5, abs=1e-9), name
    checkpoint = resolve_checkpoint(run_dir)
    assert_equals_lm_evals_hf_model(checkpoint, to_hf(checkpoint, tmp_path / "hf"))


# ----------------------------------------------------------------------------------- the model alone


def test_batching_and_padding_change_no_score(tmp_path):
    """Rows right-padded in a batch score as they do alone; a stop string ends the text before it."""
    from lm_eval.api.instance import Instance

    from bloomtrain.config import ModelConfig
    from bloomtrain.data.tokenizer import TokenEncoder
    from bloomtrain.harness.lm import BloomtrainLM
    from bloomtrain.harness.scoring import PlainScorer
    from bloomtrain.model import build_model

    texts = ["The rights of everyone", "Everyone has the right to life, liberty and security", "All human"]
    tokenizer = TokenEncoder(save_byte_level_bpe(texts * 20, 300, tmp_path / "bpe"))
    model = build_model(ModelConfig(name="t", num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=300,
                                    init_std=0.3), seed=3)
    requests = [Instance("loglikelihood", doc={}, arguments=(text[:4], text[4:]), idx=0) for text in texts]
    alone = BloomtrainLM(PlainScorer(model, 300), tokenizer, 64, batch_size=1, show_progress=False)
    batched = BloomtrainLM(PlainScorer(model, 300), tokenizer, 64, batch_size=3, show_progress=False)
    want, got = alone.loglikelihood(requests), batched.loglikelihood(requests)
    assert [logprob for logprob, _ in got] == pytest.approx([logprob for logprob, _ in want], rel=1e-5)
    assert [greedy for _, greedy in got] == [greedy for _, greedy in want]
    assert len({len(tokenizer.encode([text])[0]) for text in texts}) == 3  # padded rows: three lengths
    free = alone.generate_until([Instance("generate_until", doc={}, arguments=("The", {"max_gen_toks": 12}), idx=0)])
    assert len(free[0]) > 1
    stop = free[0][1:3]
    cut = alone.generate_until([Instance("generate_until", doc={},
                                         arguments=("The", {"max_gen_toks": 12, "until": [stop]}), idx=0)])
    assert cut == [free[0].split(stop)[0]]
    with pytest.raises(ValueError, match="greedily"):
        alone.generate_until([Instance("generate_until", doc={},
                                       arguments=("The", {"do_sample": True, "temperature": 1.0}), idx=0)])


# ----------------------------------------------------------------------------------- bad input


@pytest.mark.slow
def test_bad_input_is_one_line(tmp_path, checkpointed_run, sample_cache):
    broken = tmp_path / "tasks"
    broken.mkdir()
    (broken / "mine.yaml").write_text("task: mine\ndoc_to_text: [unclosed\n")
    fake_lm_eval = tmp_path / "no_lm_eval"
    fake_lm_eval.mkdir()
    (fake_lm_eval / "lm_eval.py").write_text("raise ImportError(\"No module named 'lm_eval'\")\n")
    cases = {
        "unknown task nusax_sentimen": run_harness(checkpointed_run, "--tasks", "nusax_sentimen"),
        "mine.yaml:3": run_harness(checkpointed_run, "--tasks", "mine", "--include_path", str(broken)),
        "neither a bloomtrain run or checkpoint": run_harness(tmp_path, "--tasks", "nusax_sentiment_eng"),
        "lm-eval is not installed": run_harness(checkpointed_run, "--tasks", "nusax_sentiment_eng",
                                                env={"PYTHONPATH": f"{fake_lm_eval}:{REPO}"}),
    }
    for expected, result in cases.items():
        assert result.returncode == 2, (expected, result.stderr[-2000:])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bloomtrain.harness: ") and expected in lines[0], lines
    result = run_train(tiny_run(tmp_path / "run", sample_cache, "eval.interval=1",
                                "eval.tasks=[nusax_sentimen]"), check=False)
    assert result.returncode != 0 and "eval.tasks: unknown task nusax_sentimen" in result.stderr
    assert "Traceback" not in result.stderr
