"""Records to examples: each example is a list of segments ``(text, is_target)``, cut into turns that each
end with a target (the EOS follows every turn's target). A record that cannot become one is a
:class:`BadRecord` with its reason, counted in the report; nothing is dropped silently.

- ``{"inputs", "targets"}`` (xP3, BLOOMZ's data) and ``{"prompt", "response"}``: one turn;
- ``{"messages": [{"role", "content"}, ...]}``: a turn per assistant message, the loss on what the
  assistant says (``User: ...\\nAssistant: `` is the prompt, as plain text: BLOOM has no chat template);
- any record (a CSV row, a labelled or parallel JSON Lines record) through the source's ``prompt`` and
  ``target`` templates, e.g. ``Text: {text}\\nSentiment:`` -> `` {label}``.
"""

from __future__ import annotations

import csv
import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}

Turn = list[tuple[str, bool]]


@dataclass
class BadRecord:
    reason: str  # missing_field | empty_target | unreadable | too_long | boundary_shift
    detail: str


class InputError(ValueError):
    """An input file that is missing or unreadable as a whole (one line, naming it)."""


def input_files(patterns: list[str]) -> list[Path]:
    """The files of ``patterns``: relative ones from the working directory, else from the repository (where
    the presets' shipped data lives)."""
    files = []
    for pattern in patterns:
        for base in (Path.cwd(), REPO):
            found = sorted(glob.glob(str(base / pattern)))
            if found:
                files += [Path(name) for name in found]
                break
        else:
            bases = " or ".join(dict.fromkeys(str(base) for base in (Path.cwd(), REPO)))
            raise InputError(f"no file matches {pattern} (looked from {bases})")
    return files


def read_records(path: Path) -> Iterator[dict | BadRecord]:
    """Records of a ``.jsonl`` or ``.csv`` file; a line that is not a JSON object is a bad record."""
    if path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as handle:
            yield from csv.DictReader(handle)
        return
    if path.suffix != ".jsonl":
        raise InputError(f"{path}: not .jsonl or .csv")
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                yield BadRecord("unreadable", f"{path}:{number}: {error.msg}")
                continue
            yield record if isinstance(record, dict) else BadRecord("unreadable", f"{path}:{number}: not an object")


FORMAT_KEYS = {"inputs_targets": ("inputs", "targets"), "prompt_response": ("prompt", "response"),
               "messages": ("messages",)}


def to_turns(record: dict, prompt: str | None, target: str | None, format: str = "auto") -> list[Turn] | BadRecord:
    """The record as turns of ``(text, is_target)`` segments, each turn ending in a non-empty target;
    ``format`` other than auto (or template) names the fields the record must have."""
    missing = [key for key in FORMAT_KEYS.get(format, ()) if key not in record]
    if missing:
        return BadRecord("missing_field", f"format={format} needs {', '.join(missing)}")
    if prompt is not None:
        fields = {key: value.strip() if isinstance(value, str) else value for key, value in record.items()}
        try:
            turn = [(prompt.format(**fields), False), (target.format(**fields), True)]
        except (KeyError, IndexError) as error:
            return BadRecord("missing_field", f"the template names {error}, which the record lacks")
        return [turn] if turn[1][0].strip() else BadRecord("empty_target", "the target template gives nothing")
    if "messages" in record:
        return _chat(record["messages"])
    for prompt_key, target_key in (("inputs", "targets"), ("prompt", "response")):
        if prompt_key in record or target_key in record:
            if not isinstance(record.get(prompt_key), str) or not isinstance(record.get(target_key), str):
                return BadRecord("missing_field", f"needs both {prompt_key} and {target_key} as text")
            if not record[target_key].strip():
                return BadRecord("empty_target", f"{target_key} is empty")
            return [[(record[prompt_key], False), (record[target_key], True)]]
    return BadRecord("missing_field", "neither inputs/targets, prompt/response nor messages (or give the "
                                      "source prompt and target templates)")


def _chat(messages) -> list[Turn] | BadRecord:
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages):
        return BadRecord("missing_field", "messages must be [{role: system|user|assistant, content: text}, ...]")
    turns, pending = [], ""
    for message in messages:
        if message["role"] != "assistant":
            pending += f"{ROLES[message['role']]}: {message['content']}\n"
            continue
        if not message["content"].strip():
            return BadRecord("empty_target", "an assistant message is empty")
        turns.append([(pending + "Assistant: ", False), (message["content"], True)])
        pending = ""
    return turns or BadRecord("empty_target", "no assistant message")
