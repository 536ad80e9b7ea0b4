"""Rows as users have them -> the conversational rows TRL's trainers take.

Accepted row formats:
- instruct: `input_query` + `expected_answer`, or `chat_completion_input` (messages, list or JSON string)
  + `expected_answer`, or `prompt` + `completion` (strings or message lists, TRL's prompt-completion)
- dialog: `messages` or `dialog` (list of `{role, content}` or a JSON string of one); the last message
  is the assistant answer that is trained on
- preference: `prompt` + `chosen` + `rejected`, each a string or a list of messages; without `prompt`,
  the common leading messages of `chosen` and `rejected` are the prompt

Output rows are `{"prompt": [msgs], "completion": [assistant msg]}` for SFT and distillation and
`{"prompt": [msgs], "chosen": [msg], "rejected": [msg]}` for DPO (and `{"prompt": [msgs]}` for teacher
tasks, `{"prompt": [msgs], **other columns}` for GRPO), so the tokenizer's chat template is
applied by TRL and `train_on_input` maps onto TRL's completion-only loss.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .methods import RowKind



class DataFormatError(ValueError):
    """A row that fits none of the accepted formats; the message names the row and the field."""


def _content_text(content: Any) -> str:
    # Llama Stack content may be a string, a {"type": "text", "text": ...} item, or a list of items.
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, list):
        return "".join(_content_text(c) for c in content)
    raise TypeError(f"content of type {type(content).__name__}")


def _messages(value: Any, field: str, index: int) -> list[dict[str, str]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"row {index}: field '{field}' is a string but not JSON messages ({e})") from e
    if hasattr(value, "tolist"):  # numpy arrays from pandas-backed datasetio providers
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise DataFormatError(f"row {index}: field '{field}' must be a non-empty list of messages")
    out = []
    for m in value:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataFormatError(f"row {index}: field '{field}' has a message without 'role' and 'content'")
        out.append({"role": str(m["role"]), "content": _content_text(m["content"])})
    return out


def _turn(value: Any, field: str, index: int, role: str) -> list[dict[str, str]]:
    """A string becomes one message with `role`; a message list is taken as it is."""
    if isinstance(value, str) and not value.lstrip().startswith("["):
        return [{"role": role, "content": value}]
    return _messages(value, field, index)


def _split_dialog(msgs: list[dict[str, str]], field: str, index: int) -> dict[str, Any]:
    if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
        raise DataFormatError(
            f"row {index}: field '{field}' must end with an assistant message after at least one other message"
        )
    return {"prompt": msgs[:-1], "completion": msgs[-1:]}


def completion_row(row: dict[str, Any], index: int) -> dict[str, Any]:
    """An instruct or dialog row as `{"prompt", "completion"}` messages."""
    for field in ("messages", "dialog"):
        if field in row and row[field] is not None:
            return _split_dialog(_messages(row[field], field, index), field, index)
    if row.get("prompt") is not None and row.get("completion") is not None:  # TRL's prompt-completion rows
        return {"prompt": _turn(row["prompt"], "prompt", index, "user"),
                "completion": _turn(row["completion"], "completion", index, "assistant")}
    if "expected_answer" in row:
        answer = [{"role": "assistant", "content": _content_text(row["expected_answer"])}]
        if row.get("chat_completion_input") is not None:
            return {"prompt": _messages(row["chat_completion_input"], "chat_completion_input", index), "completion": answer}
        if "input_query" in row:
            return {"prompt": [{"role": "user", "content": _content_text(row["input_query"])}], "completion": answer}
    raise DataFormatError(
        f"row {index} has fields {sorted(row)}; an instruct or dialog row needs 'input_query' + 'expected_answer', "
        "'chat_completion_input' + 'expected_answer', 'prompt' + 'completion', 'messages' or 'dialog'"
    )


def preference_row(row: dict[str, Any], index: int) -> dict[str, Any]:
    """A preference row as `{"prompt", "chosen", "rejected"}` messages."""
    missing = [f for f in ("chosen", "rejected") if row.get(f) is None]
    if missing:
        raise DataFormatError(
            f"row {index} has fields {sorted(row)}; a preference row needs 'prompt', 'chosen' and 'rejected' "
            f"(missing: {missing})"
        )
    chosen = _turn(row["chosen"], "chosen", index, "assistant")
    rejected = _turn(row["rejected"], "rejected", index, "assistant")
    if row.get("prompt") is not None:
        prompt = _turn(row["prompt"], "prompt", index, "user")
    else:
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if not prompt:
            raise DataFormatError(f"row {index}: no 'prompt' and 'chosen'/'rejected' share no leading messages")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def prompt_row(row: dict[str, Any], index: int) -> dict[str, Any]:
    """A row's prompt only (for teacher tasks): any instruct, dialog or preference row, or `prompt`.
    A trailing assistant message is the old answer and is dropped."""
    for field in ("messages", "dialog", "chat_completion_input"):
        if row.get(field) is not None:
            msgs = _messages(row[field], field, index)
            msgs = msgs[:-1] if msgs[-1]["role"] == "assistant" and len(msgs) > 1 else msgs
            return {"prompt": msgs}
    if row.get("input_query") is not None:
        return {"prompt": [{"role": "user", "content": _content_text(row["input_query"])}]}
    if row.get("prompt") is not None:
        return {"prompt": _turn(row["prompt"], "prompt", index, "user")}
    raise DataFormatError(
        f"row {index} has fields {sorted(row)}; a prompt row needs 'input_query', 'prompt', 'messages', "
        "'dialog' or 'chat_completion_input'"
    )


PROMPT_FIELDS = ("messages", "dialog", "chat_completion_input", "input_query", "prompt")


def graded_prompt_row(row: dict[str, Any], index: int) -> dict[str, Any]:
    """A prompt (as `prompt_row` finds it) plus every other column of the row, kept as it is: GRPO's graders
    read them as `item` (e.g. `{{ item.expected_answer }}`)."""
    out = prompt_row(row, index)
    out.update({k: v for k, v in row.items() if k not in PROMPT_FIELDS})
    return out


def normalize_rows(rows: Iterable[dict[str, Any]], kind: RowKind) -> Iterator[dict[str, Any]]:
    """Yield normalized rows; raises DataFormatError naming the first bad row."""
    convert = {"preference": preference_row, "prompt": prompt_row, "completion": completion_row,
               "graded_prompt": graded_prompt_row}[kind]
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataFormatError(f"row {i} is a {type(row).__name__}, not an object")
        yield convert(row, i)


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> int:
    """Write rows as JSONL; returns how many were written."""
    n = 0
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_shards(teacher_outputs_dir: str | Path) -> list[dict]:
    """All rows of a teacher task's outputs (recipes/teacher.py writes them), in order."""
    rows: list[dict] = []
    for shard in sorted(Path(teacher_outputs_dir).glob("shard-*.jsonl")):
        rows.extend(read_jsonl(shard))
    return rows


def load_dataset(path: str | Path):
    """The normalized JSONL rows of a run as a `datasets.Dataset`."""
    from datasets import Dataset

    return Dataset.from_list(read_jsonl(path))
