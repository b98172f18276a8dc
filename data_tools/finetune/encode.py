"""Examples to tokens and a loss mask (1 on target tokens and the EOS after each turn, 0 on prompts).

Each turn is encoded whole, as the model will read it, and the prompt/target boundary is checked
against that: the prompt's own tokens must be the first tokens of the whole turn's. A tokenizer can merge
across the boundary (a prompt ending in a space before a target starting with a word, say); then the
target's first tokens would not be the target's, and a mask computed from the prompt's length would
silently be off. Such an example is reported (``boundary_shift``), never mis-masked.
"""

from __future__ import annotations

from data_tools.finetune.records import BadRecord, Turn


def encode_example(encoder, turns: list[Turn], seq_length: int) -> tuple[list[int], list[int]] | BadRecord:
    """``(tokens, loss_mask)`` of an example (every turn followed by the EOS token), or why not."""
    tokens: list[int] = []
    mask: list[int] = []
    for turn in turns:
        texts = [text for text, _ in turn]
        prefixes = ["".join(texts[: index + 1]) for index in range(len(texts))]
        encoded = encoder.encode(prefixes)
        whole = encoded[-1]
        start = 0
        for (_, is_target), prefix, prefix_tokens in zip(turn, prefixes, encoded, strict=True):
            if whole[: len(prefix_tokens)] != prefix_tokens:
                return BadRecord("boundary_shift", f"{prefix[-40:]!r}: tokenized whole, its last tokens merge "
                                                   "with what follows")
            mask += [int(is_target)] * (len(prefix_tokens) - start)
            start = len(prefix_tokens)
        tokens += whole + [encoder.eos_id]
        mask.append(1)  # the EOS ends the answer: the model learns to stop
    if len(tokens) > seq_length:
        return BadRecord("too_long", f"{len(tokens)} tokens, more than seq_length={seq_length}")
    if not any(mask[:-1]):
        return BadRecord("empty_target", "the target has no tokens")
    return tokens, mask
