"""OpenAI's fine-tuning file formats and job statuses, as plain functions (no HTTP, no service).

- `validate_jsonl(path)`: a `purpose=fine-tune` upload checked line by line; the first error names the line
  and the field (`line 3: messages[1].role: ...`). A file is either chat rows (`{"messages": [...]}`, for
  `supervised`) or preference rows (`{"input": {"messages": [...]}, "preferred_output": [...],
  "non_preferred_output": [...]}`, for `dpo`) or prompt rows (`{"messages": [...], "reference_answer": ...}`:
  no assistant message, every other field kept for the graders' `item`, for `reinforcement`), one kind a file.
- `service_row(row, kind)`: such a row as the service's normalized rows (`prompt`/`completion` or
  `prompt`/`chosen`/`rejected` message lists), which every method's data loader takes.
- `openai_status(core_status, ...)`: the job store's status as OpenAI's.
- `choose_hyperparameters(...)`: each `"auto"` resolved, with what it chose.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import BadRequest

MAX_LINE_BYTES = 4 << 20  # one example; a longer line is refused before it is parsed
ROLES = ("system", "developer", "user", "assistant", "tool", "function")
KINDS = {"chat": "supervised", "preference": "dpo", "prompt": "reinforcement"}  # a file's kind -> its method
PROMPT_ROLES = ("system", "developer", "user")  # a reinforcement prompt: the model writes the answer


class FileFormatError(BadRequest):
    """The first bad line of an uploaded file: `line`, `field` and what is wrong."""

    def __init__(self, line: int | None, field: str, reason: str):
        self.line, self.field, self.reason = line, field, reason
        where = f"line {line}: " if line is not None else ""
        super().__init__(f"{where}{field}: {reason}")


def _text(content: Any, field: str, line: int, allow_none: bool) -> str:
    """A message's content as text: a string, a list of text parts, or None (an assistant's tool call)."""
    if content is None and allow_none:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for i, part in enumerate(content):
            text = part.get("text") if isinstance(part, dict) else None
            if not isinstance(part, dict) or part.get("type", "text") != "text" or not isinstance(text, str):
                raise FileFormatError(line, f"{field}[{i}]", "a content part must be {\"type\": \"text\", \"text\": "
                                      "string} (images and audio are not trained here)")
            out.append(part["text"])
        return "".join(out)
    raise FileFormatError(line, field, f"must be a string or a list of text parts, not {type(content).__name__}")


def check_messages(value: Any, field: str, line: int, roles: tuple[str, ...] = ROLES) -> list[dict[str, str]]:
    """A non-empty list of `{role, content}` messages, as plain-text messages; errors name the message."""
    if not isinstance(value, list) or not value:
        raise FileFormatError(line, field, "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise FileFormatError(line, where, f"must be an object with 'role' and 'content', not {type(m).__name__}")
        role = m.get("role")
        if role not in roles:
            raise FileFormatError(line, f"{where}.role", f"{str(role)[:50]!r} is not one of {list(roles)}")
        if "content" not in m and not m.get("tool_calls"):
            raise FileFormatError(line, f"{where}.content", "missing")
        weight = m.get("weight", 1)
        if weight not in (0, 1):
            raise FileFormatError(line, f"{where}.weight", f"{weight!r} is not 0 or 1")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _text(m.get("content"), f"{where}.content", line, role == "assistant")})
    return out


def chat_row(row: dict[str, Any], line: int) -> dict[str, Any]:
    """A chat row as the service's `{"prompt", "completion"}`: the last assistant message is the completion
    (messages after it teach nothing and are dropped)."""
    msgs = check_messages(row.get("messages"), "messages", line)
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if last is None:
        raise FileFormatError(line, "messages", "has no assistant message to train on")
    if last == 0:
        raise FileFormatError(line, "messages[0]", "an assistant message needs at least one message before it")
    return {"prompt": msgs[:last], "completion": msgs[last:last + 1]}


def preference_row(row: dict[str, Any], line: int) -> dict[str, Any]:
    """A DPO row as the service's `{"prompt", "chosen", "rejected"}`."""
    inp = row.get("input")
    if not isinstance(inp, dict):
        raise FileFormatError(line, "input", "must be an object with 'messages'")
    prompt = check_messages(inp.get("messages"), "input.messages", line)
    out = {"prompt": prompt}
    for field, name in (("preferred_output", "chosen"), ("non_preferred_output", "rejected")):
        msgs = check_messages(row.get(field), field, line, roles=("assistant",))
        if len(msgs) != 1:
            raise FileFormatError(line, field, f"must hold exactly one assistant message, not {len(msgs)}")
        out[name] = msgs
    return out


def prompt_row(row: dict[str, Any], line: int) -> dict[str, Any]:
    """A reinforcement row as the service's graded prompt row: `messages` (no assistant message) plus the
    row's other fields, which the graders read as `item` (`{{ item.reference_answer }}`)."""
    msgs = check_messages(row.get("messages"), "messages", line, roles=PROMPT_ROLES)
    return {"messages": msgs, **{k: v for k, v in row.items() if k != "messages"}}


def row_kind(row: dict[str, Any], line: int) -> str:
    """`chat`, `preference` or `prompt`, from the row's fields: messages with no assistant message are a
    reinforcement prompt."""
    if "messages" in row:
        msgs = row["messages"]
        answered = isinstance(msgs, list) and any(isinstance(m, dict) and m.get("role") == "assistant" for m in msgs)
        return "chat" if answered else "prompt"
    if "input" in row or "preferred_output" in row or "non_preferred_output" in row:
        return "preference"
    raise FileFormatError(line, "messages", f"missing: a row has fields {sorted(row)[:10]}; a chat row needs "
                          "'messages', a DPO row 'input', 'preferred_output' and 'non_preferred_output'")


def service_row(row: dict[str, Any], kind: str, line: int) -> dict[str, Any]:
    """An OpenAI row of `kind` as the service's normalized row."""
    return {"chat": chat_row, "preference": preference_row, "prompt": prompt_row}[kind](row, line)


def iter_rows(path: Path, max_line_bytes: int = MAX_LINE_BYTES):
    """(line number, row object) of a JSONL file, read in bounded lines; errors name the line."""
    with open(path, "rb") as f:
        n = 0
        while True:
            raw = f.readline(max_line_bytes + 1)
            if not raw:
                return
            n += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                raise FileFormatError(n, "line", f"longer than {max_line_bytes} bytes (one example per line)")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = raw[e.start:e.start + 1]
                raise FileFormatError(n, "line", f"not UTF-8 text (byte {e.start}: {bad!r})") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except (ValueError, RecursionError) as e:
                raise FileFormatError(n, "line", f"not JSON ({str(e)[:200]})") from None
            if not isinstance(row, dict):
                raise FileFormatError(n, "line", f"a {type(row).__name__}, not a JSON object")
            yield n, row


def validate_jsonl(path: Path, max_line_bytes: int = MAX_LINE_BYTES) -> dict[str, Any]:
    """Check a fine-tune upload: every line one row of the same kind. Returns {"kind", "rows"}; raises
    FileFormatError (a 400) naming the first bad line and field."""
    kind, rows = None, 0
    for n, row in iter_rows(path, max_line_bytes):
        this = row_kind(row, n)
        if {this, kind} == {"chat", "prompt"}:
            this = kind  # a messages row is checked as the file's kind: its error names the message at fault
        if kind is None:
            kind = this
        elif this != kind:
            raise FileFormatError(n, "input" if kind == "preference" else "messages",
                                  f"a {this} row in a file whose first row is a {kind} row (one format per file)")
        service_row(row, kind, n)
        rows += 1
    if rows == 0:
        raise FileFormatError(None, "file", "no rows (an empty file); a fine-tune file is JSONL, one example a line")
    return {"kind": kind, "rows": rows}


# -- statuses ---------------------------------------------------------------------------------------------
CORE_TO_OPENAI = {"scheduled": "queued", "in_progress": "running", "completed": "succeeded", "failed": "failed",
                  "cancelled": "cancelled"}


def openai_status(core_status: str | None, paused: bool = False) -> str:
    """The job store's status as OpenAI's: no core job yet -> validating_files; scheduled -> queued;
    in_progress -> running; completed -> succeeded; failed; cancelled (paused, when it was paused)."""
    if core_status is None:
        return "validating_files"
    if core_status == "cancelled" and paused:
        return "paused"
    return CORE_TO_OPENAI.get(core_status, core_status)


# -- hyperparameters --------------------------------------------------------------------------------------
BASE_LEARNING_RATE = {"lora": 2e-4, "full": 2e-5}  # what learning_rate_multiplier multiplies


def choose_hyperparameters(given: dict[str, Any], method: str, rows: int, finetuning: str) -> dict[str, Any]:
    """Each hyperparameter given as a value kept, "auto" (or absent) chosen here: n_epochs 3, batch_size
    about 0.2% of the rows (1 to 32), learning_rate_multiplier 1 (of BASE_LEARNING_RATE), beta 0.1 (dpo).
    Raises BadRequest naming a bad value."""
    allowed = {"n_epochs", "batch_size", "learning_rate_multiplier"} | ({"beta"} if method == "dpo" else set())
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise BadRequest(f"method.{method}.hyperparameters: {unknown} are not {method} hyperparameters "
                         f"(accepted: {sorted(allowed)})")
    auto = {"n_epochs": 3, "batch_size": max(1, min(32, math.ceil(rows * 0.002))),
            "learning_rate_multiplier": 1.0, "beta": 0.1}
    out = {}
    for name in sorted(allowed):
        value = given.get(name, "auto")
        if value is None or value == "auto":
            value = auto[name]
        elif name in ("n_epochs", "batch_size"):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
                raise BadRequest(f"hyperparameters.{name}: {value!r} is not \"auto\" or an integer from 1 to 1000")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise BadRequest(f"hyperparameters.{name}: {value!r} is not \"auto\" or a positive number")
        out[name] = value
    out["learning_rate"] = out["learning_rate_multiplier"] * BASE_LEARNING_RATE[finetuning]
    return out
