"""score_model graders: a local causal LM reads the rendered messages and answers with a number.

Models load from local directories only (`local_files_only`: grading never downloads); a few stay loaded
between calls. Generation runs under a forked RNG seeded from `sampling_params.seed`, so a sampling grader
neither changes the training's random stream nor varies from run to run.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from pathlib import Path

from .models import ScoreModelGrader

DEFAULT_NEW_TOKENS = 16
MAX_PROMPT_TOKENS = 2048
BATCH_SIZE = 16
CACHE_SIZE = 2
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")

_models: OrderedDict[tuple[str, str], tuple] = OrderedDict()
_lock = threading.Lock()


def default_device() -> str:
    """This process's accelerator when it has one (each training rank has set its own), else the CPU."""
    import torch

    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"


def check_model_dir(path: str) -> None:
    """ValueError unless `path` is a local model directory (the request layer resolved names to one)."""
    if not (Path(path) / "config.json").is_file():
        raise ValueError(f"model: {path!r} is not a local model directory (no config.json there)")


def load_model(path: str, device: str):
    """(model, tokenizer) of the local model directory `path` on `device`, from a small cache."""
    key = (path, device)
    with _lock:
        if key in _models:
            _models.move_to_end(key)
            return _models[key]
    check_model_dir(path)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = "left"  # generation continues every row from its last token
    tokenizer.truncation_side = "left"  # a long prompt keeps its end: the answer and the rubric's question
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype).to(device).eval()
    with _lock:
        _models[key] = (model, tokenizer)
        while len(_models) > CACHE_SIZE:
            _models.popitem(last=False)
    return model, tokenizer


def prompt_text(tokenizer, messages: list[dict[str, str]]) -> str:
    """The messages as the model's chat prompt (a plain `role: text` transcript when it has no template)."""
    messages = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
                for m in messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\n\nassistant:"


def parse_score(text: str, low: float, high: float) -> float:
    """The first number of `text`, clipped to [low, high]; ValueError when there is none."""
    match = _NUMBER.search(text)
    if match is None:
        raise ValueError(f"the grader model's answer holds no number: {text[:100]!r}")
    value = float(match.group())
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"the grader model's answer is not a finite number: {match.group()[:40]!r}")
    return min(max(value, low), high)


def generate(grader: ScoreModelGrader, conversations: list[list[dict[str, str]]], device: str | None = None) -> list[str]:
    """The grader model's answer to each conversation (lists of {role, content} with templates rendered)."""
    check_model_dir(grader.model)  # before importing torch: a wrong path fails fast
    import torch

    device = device or default_device()
    model, tokenizer = load_model(grader.model, device)
    params = grader.sampling_params
    temperature = (params.temperature if params else None) or 0.0
    kwargs = {"max_new_tokens": (params.max_completions_tokens if params else None) or DEFAULT_NEW_TOKENS,
              "do_sample": temperature > 0, "pad_token_id": tokenizer.pad_token_id}
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=(params.top_p or 1.0), top_k=0)
    templated = bool(getattr(tokenizer, "chat_template", None))
    answers: list[str] = []
    devices = [torch.device(device)] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        torch.manual_seed(params.seed if params and params.seed is not None else 0)
        for start in range(0, len(conversations), BATCH_SIZE):
            texts = [prompt_text(tokenizer, c) for c in conversations[start:start + BATCH_SIZE]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                              max_length=MAX_PROMPT_TOKENS, add_special_tokens=not templated).to(device)
            out = model.generate(**batch, **kwargs)
            new = out[:, batch["input_ids"].shape[1]:]
            answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    return answers
