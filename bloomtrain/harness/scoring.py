"""Scoring token rows with a BLOOM: the log-probability of given next tokens, and the greedy next token.

Two scorers answer the same two questions, so the lm-evaluation-harness model (``lm.py``) is written once:

- :class:`PlainScorer`: a plain :class:`~bloomtrain.model.Bloom` on one device (a checkpoint of any
  layout or a Hugging Face folder, loaded whole); generation uses the KV cache.
- :class:`EngineScorer`: the model a training run holds, under its layout, without an export: tensor
  parallel logits stay vocab-parallel (megatron-core's cross entropy gives the log-probabilities; the
  greedy token is agreed over the tensor group), pipeline parallel runs DeepSpeed's inference schedule
  and the last stage broadcasts its scores to the other stages. Every rank of the world must make the
  same number of forward calls (DeepSpeed's pipeline barriers on the world group, ZeRO 3 gathers over
  the data-parallel group), so callers agree on their counts with :meth:`agree`.

Both score over the model's vocabulary (``model.vocab_size``) only: the rows that pad the embedding to a
multiple of 128 never take probability mass and never win, as in a Hugging Face export (which drops
them). Scores
are fp32 whatever the model computes in. Rows are right-padded: a causal model's scores at a position
do not depend on what follows it, so padding changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from bloomtrain.model import Bloom, KVCache


@dataclass
class Scores:
    logprobs: torch.Tensor  # [rows, width] fp32: log p(targets[r, i] | tokens[r, : i + 1])
    greedy: torch.Tensor  # [rows, width] int64: the most likely next token after tokens[r, : i + 1]
    extra: torch.Tensor | None = None  # [n] fp32: log p(token | tokens[r, : i + 1]) for each (r, i, token) asked


Extra = list[tuple[int, int, int]]
"""(row, position, token): further next tokens scored at a position (the other one-token answers to the
same prompt, which share its row)."""


class PlainScorer:
    """A whole model on one device; each process scores its own rows (no collective)."""

    collective = False

    def __init__(self, model: Bloom, vocab_size: int, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.vocab_size = vocab_size

    def agree(self, count: int) -> int:
        return count

    @torch.no_grad()
    def score(self, tokens: torch.Tensor, targets: torch.Tensor, extra: Extra = (),
              segments: torch.Tensor | None = None) -> Scores:
        """``segments``: packed examples' ids per position (each example sees only itself)."""
        segments = None if segments is None else segments.to(self.device)
        logits = self.model(tokens.to(self.device), segments=segments)[..., : self.vocab_size].float()
        logprobs = logits.log_softmax(-1)
        chosen = logprobs.gather(-1, targets.to(self.device).unsqueeze(-1)).squeeze(-1)
        extra_logprobs = torch.stack([logprobs[row, position, token] for row, position, token in extra]).cpu() \
            if extra else None
        return Scores(chosen.cpu(), logits.argmax(-1).cpu(), extra_logprobs)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: list[int], finished,
                 batch_size: int = 8) -> list[list[int]]:
        """Greedy continuations of ``batch_size`` prompts at a time (similar lengths together, left-padded)
        with a KV cache. ``finished(index, new_tokens)`` says when a continuation is done (a stop string,
        the end-of-document token)."""
        results: list[list[int]] = [[] for _ in prompts]
        order = sorted(range(len(prompts)), key=lambda index: -len(prompts[index]))
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            width = max(len(prompts[index]) for index in batch)
            tokens = torch.zeros(len(batch), width, dtype=torch.long)
            padding = torch.ones(len(batch), width, dtype=torch.bool)
            for row, index in enumerate(batch):
                tokens[row, width - len(prompts[index]):] = torch.tensor(prompts[index])
                padding[row, width - len(prompts[index]):] = False
            tokens, padding, cache = tokens.to(self.device), padding.to(self.device), KVCache()
            running = {row for row, index in enumerate(batch) if max_new_tokens[index] > 0}
            while running:
                chosen = self.model(tokens, cache, padding)[:, -1, : self.vocab_size].argmax(-1)
                for row in list(running):
                    index = batch[row]
                    results[index].append(int(chosen[row]))
                    if finished(index, results[index]) or len(results[index]) >= max_new_tokens[index]:
                        running.discard(row)
                tokens = chosen.unsqueeze(1)
                padding = torch.cat([padding, padding.new_zeros(len(batch), 1)], dim=1)
        return results


class EngineScorer:
    """The running model of a :class:`~bloomtrain.parallel.engine.TrainingEngine`, under any layout.

    Collective over the world: every rank calls :meth:`score` (or :meth:`generate`) the same number of
    times; the ranks of a model-parallel group with the same rows."""

    collective = True

    def __init__(self, engine, vocab_size: int, sequence_parallel: bool = False) -> None:
        from megatron.core import parallel_state

        self.engine = engine.engine
        self.device = self.engine.device
        self.vocab_size = vocab_size
        self.pipelined = engine.layout.pipeline > 1
        self.tensor = parallel_state.get_tensor_model_parallel_world_size()
        self.tensor_rank = parallel_state.get_tensor_model_parallel_rank()
        self.tensor_group = parallel_state.get_tensor_model_parallel_group()
        # Under sequence parallelism the sequence is split over the tensor ranks: widths must divide.
        self.width_multiple = self.tensor if sequence_parallel else 1
        if self.pipelined:
            self.pipeline_group = parallel_state.get_pipeline_model_parallel_group()
            self.last_stage_rank = parallel_state.get_pipeline_model_parallel_last_rank()
            self.is_last_stage = parallel_state.is_pipeline_last_stage()

    def agree(self, count: int) -> int:
        """Collective over the world: the largest ``count`` of any rank."""
        value = torch.tensor(count, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value)

    @torch.no_grad()
    def score(self, tokens: torch.Tensor, targets: torch.Tensor, extra: Extra = (),
              segments: torch.Tensor | None = None) -> Scores:
        """``segments``: packed examples' ids per position (each example sees only itself)."""
        width = tokens.shape[1]
        padded = -(-width // self.width_multiple) * self.width_multiple
        if padded != width:  # padding of its own segment (-1), seen by nothing else
            tokens = torch.nn.functional.pad(tokens, (0, padded - width))
            targets = torch.nn.functional.pad(targets, (0, padded - width))
            segments = None if segments is None else torch.nn.functional.pad(segments, (0, padded - width), value=-1)
        self.engine.eval()
        tokens, targets = tokens.to(self.device), targets.to(self.device)
        segments = None if segments is None else segments.to(self.device)
        if not self.pipelined:
            scores = self._from_vocab_parallel(self.engine(tokens, segments=segments), targets, extra)
        else:
            scores = self._pipelined(tokens if segments is None else (tokens, segments), targets, extra)
        return Scores(scores.logprobs[:, :width].cpu(), scores.greedy[:, :width].cpu(),
                      scores.extra.cpu() if extra else None)

    def _pipelined(self, inputs, targets: torch.Tensor, extra: Extra) -> Scores:
        # Shapes change from call to call: every stage sends (and expects) the activation's shape afresh.
        # The engine sums every forward's output into total_loss (reset only by train_batch): logits do not
        # add to a loss, so it starts empty and is left empty.
        self.engine.reset_activation_shape()
        self.engine.total_loss = None
        outputs = self.engine.eval_batch(iter([(inputs, targets)]), compute_loss=False, reduce_output=None,
                                         bcast_loss=False, num_micro_batches=1)
        self.engine.total_loss = None
        self.engine.reset_activation_shape()  # and training's shapes after it
        if self.is_last_stage:
            scores = self._from_vocab_parallel(outputs[0], targets, extra)
        else:
            scores = Scores(torch.empty(targets.shape, dtype=torch.float32, device=self.device),
                            torch.empty(targets.shape, dtype=torch.int64, device=self.device),
                            torch.empty(len(extra), dtype=torch.float32, device=self.device))
        for tensor in (scores.logprobs, scores.greedy, scores.extra):
            dist.broadcast(tensor, src=self.last_stage_rank, group=self.pipeline_group)
        return scores

    def _from_vocab_parallel(self, logits: torch.Tensor, targets: torch.Tensor, extra: Extra = ()) -> Scores:
        from megatron.core import tensor_parallel

        local = logits.shape[-1]
        first = self.tensor_rank * local
        padding_columns = torch.arange(first, first + local, device=logits.device) >= self.vocab_size
        logits = logits.float().masked_fill(padding_columns, float("-inf"))
        best, best_index = logits.max(-1)
        greedy = best_index + first
        if self.tensor > 1:  # the largest over the shards; on a tie the lowest token id, as argmax
            bests = [torch.empty_like(best) for _ in range(self.tensor)]
            indices = [torch.empty_like(greedy) for _ in range(self.tensor)]
            dist.all_gather(bests, best, group=self.tensor_group)
            dist.all_gather(indices, greedy, group=self.tensor_group)
            winner = torch.stack(bests).argmax(0, keepdim=True)
            greedy = torch.stack(indices).gather(0, winner).squeeze(0)
        if extra:  # the positions' logits as rows of their own, each with its token as the target
            rows, positions, tokens = (torch.tensor(column, device=logits.device)
                                       for column in zip(*extra, strict=True))
            extra_loss = tensor_parallel.vocab_parallel_cross_entropy(logits[rows, positions].unsqueeze(0).clone(),
                                                                      tokens.unsqueeze(0))[0]
        else:
            extra_loss = torch.empty(0, device=logits.device)
        # megatron-core's loss works sequence-first and may change its input in place: give it a copy.
        loss = tensor_parallel.vocab_parallel_cross_entropy(logits.transpose(0, 1).contiguous(),
                                                            targets.t().contiguous())
        # Contiguous: a broadcast sends the storage as it lies, and these are transposed views.
        return Scores(-loss.t().float().contiguous(), greedy.contiguous(), -extra_loss.float())

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: list[int], finished,
                 batch_size: int = 8) -> list[list[int]]:
        """Greedy continuations of ``batch_size`` prompts at a time, each step a full forward (no KV cache
        under a parallel layout); the ranks agree on the number of batches and of steps."""
        results: list[list[int]] = [[] for _ in prompts]
        batches = [list(range(start, min(start + batch_size, len(prompts))))
                   for start in range(0, len(prompts), batch_size)]
        for batch_index in range(self.agree(len(batches))):
            batch = batches[batch_index] if batch_index < len(batches) else []
            running = {index for index in batch if max_new_tokens[index] > 0}
            while self.agree(len(running)):
                rows = [prompts[index] + results[index] for index in batch] or [[0]]
                width = max(len(row) for row in rows)
                tokens = torch.zeros(len(rows), width, dtype=torch.long)
                for row_index, row in enumerate(rows):
                    tokens[row_index, : len(row)] = torch.tensor(row)
                greedy = self.score(tokens, tokens).greedy
                for row_index, index in enumerate(batch):
                    if index in running:
                        results[index].append(int(greedy[row_index, len(rows[row_index]) - 1]))
                        if finished(index, results[index]) or len(results[index]) >= max_new_tokens[index]:
                            running.discard(index)
        return results
