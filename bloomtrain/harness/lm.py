"""bloomtrain's model for EleutherAI's lm-evaluation-harness (lm-eval 0.4): the three request types over a
:mod:`~bloomtrain.harness.scoring` scorer.

It follows lm-eval's own ``hf`` model wherever a choice changes a number, so the two agree on the same
weights: a context and its continuation are encoded together and split (lm-eval's ``_encode_pair``), the
scored window is the last ``max_length + 1`` tokens, rolling log-likelihoods use lm-eval's disjoint
windows, and a generation's context is cut from the left to leave room for ``max_gen_toks``; outputs
are cut at the first stop string. Two choices are BLOOM's: an empty context starts from the
end-of-document token (what precedes every document in BLOOM's training data; BLOOM never saw a
beginning-of-sequence token) and generation is greedy (a request asking to sample is refused).

Several processes split the requests: lm-eval gives each data-parallel rank its share of every task's
documents and gathers the per-document metrics on rank 0 through :meth:`all_gather` and
:meth:`gather_object`, which run over the data-parallel ``group`` here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from bloomtrain.data.tokenizer import TokenEncoder


class BloomtrainLM(TemplateLM):
    def __init__(self, scorer, tokenizer: TokenEncoder, max_length: int, batch_size: int = 8,
                 rank: int = 0, world_size: int = 1, group: dist.ProcessGroup | None = None,
                 max_gen_toks: int = 256, show_progress: bool = True) -> None:
        super().__init__()
        self.scorer, self.tokenizer = scorer, tokenizer
        self._max_length, self.batch_size, self.max_gen_toks = max_length, batch_size, max_gen_toks
        self._rank, self._world_size, self.group = rank, world_size, group
        self._device = scorer.device
        self.show_progress = show_progress and rank == 0

    # ---------------------------------------------------------------------------------- tokenizer

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode([string])[0]

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode([token for token in tokens if token != self.eot_token_id])

    # ---------------------------------------------------------------------------------- requests

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """``(sum of the continuation's log-probabilities, whether greedy decoding gives the continuation)``
        per ``((context, continuation), context tokens, continuation tokens)``, longest first in batches.

        Requests whose continuation is one token after the same context (a multiple choice's label words)
        share one row, as in lm-eval's ``hf`` model: the prompt runs once for all of them."""
        rows: dict[tuple[int, ...], list[int]] = {}  # the inputs of a row -> the requests it answers
        windows = []
        for index, (_, context_enc, continuation_enc) in enumerate(requests):
            window = (context_enc + continuation_enc)[-(self.max_length + 1):]
            scored = min(len(continuation_enc), len(window) - 1)
            windows.append((window, scored))
            key = tuple(window[:-1]) if scored == 1 else (index, *window[:-1])  # only one-token answers share
            rows.setdefault(key, []).append(index)
        order = sorted(rows.values(), key=lambda members: -len(windows[members[0]][0]))
        batches = [order[start:start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        count = self.scorer.agree(len(batches))
        for batch_index in tqdm(range(count), "log-likelihood batches", disable=not self.show_progress or disable_tqdm):
            batch = batches[batch_index] if batch_index < len(batches) else []
            width = max([len(windows[members[0]][0]) - 1 for members in batch] or [1])
            tokens = torch.full((max(len(batch), 1), width), self.eot_token_id, dtype=torch.long)
            targets = tokens.clone()
            extra = []
            for row, members in enumerate(batch):
                window = windows[members[0]][0]
                tokens[row, : len(window) - 1] = torch.tensor(window[:-1])
                targets[row, : len(window) - 1] = torch.tensor(window[1:])
                extra += [(row, len(window) - 2, windows[index][0][-1]) for index in members[1:]]
            scores = self.scorer.score(tokens, targets, extra)
            shared = iter(range(len(extra)))
            for row, members in enumerate(batch):
                window, scored = windows[members[0]]
                span = slice(len(window) - 1 - scored, len(window) - 1)
                greedy = bool((scores.greedy[row, span] == targets[row, span]).all())
                results[members[0]] = (float(scores.logprobs[row, span].sum()), greedy)
                for index in members[1:]:
                    results[index] = (float(scores.extra[next(shared)]),
                                      int(scores.greedy[row, span.stop - 1]) == windows[index][0][-1])
                for index in members:
                    if requests[index][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[index][0], results[index])
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole string: disjoint windows of ``max_length`` tokens, the first
        preceded by the end-of-document token, each later one conditioned on the token before it."""
        windows, owners = [], []
        for owner, request in enumerate(requests):
            (string,) = request.args
            for window in get_rolling_token_windows(token_list=self.tok_encode(string),
                                                    prefix_token=self.prefix_token_id,
                                                    max_seq_len=self.max_length, context_len=1):
                windows.append((None, *make_disjoint_window(window)))
                owners.append(owner)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[owner] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy text after each context, cut at the first of its stop strings."""
        eos_text = self.tokenizer.decode([self.eot_token_id])
        prompts, budgets, stops = [], [], []
        for request in requests:
            context, gen_kwargs = request.args
            options = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            if options.get("do_sample") or options.get("temperature", 0.0) > 0:
                raise ValueError(f"bloomtrain's harness model generates greedily; the task asks to sample "
                                 f"({gen_kwargs}): set do_sample: false in its generation_kwargs")
            max_gen_toks = int(options["max_gen_toks"])
            if max_gen_toks >= self.max_length:
                raise ValueError(f"the task asks for {max_gen_toks} new tokens, more than the model's "
                                 f"max_length {self.max_length}; lower max_gen_toks or raise --max_length")
            prompts.append(self.tok_encode(context)[-(self.max_length - max_gen_toks):])
            budgets.append(max_gen_toks)
            stops.append([stop for stop in handle_stop_sequences(options.get("until"), eos=eos_text or None) if stop])

        def finished(index: int, produced: list[int]) -> bool:
            return produced[-1] == self.eot_token_id or any(stop in self.tok_decode(produced) for stop in stops[index])

        generated = self.scorer.generate(prompts, budgets, finished, self.batch_size)
        texts = []
        for request, tokens, until in zip(requests, generated, stops, strict=True):
            text = postprocess_generated_text(self.tok_decode(tokens), until, None)
            texts.append(text)
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts

    # ---------------------------------------------------------------------------------- processes

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor.reshape(1, *tensor.shape)
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.stack(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if self.world_size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self.group)
        return gathered if self.rank == dst else None

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)
