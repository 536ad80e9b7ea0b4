"""Load local checkpoints for inference and generate chat completions from them.

A checkpoint is a model directory (`config.json` + weights) or a PEFT adapter directory
(`adapter_config.json`), which is applied over its base model (`base_model_name_or_path`, or the
`base_model` given). Weights load from safetensors only: nothing is unpickled.

`ModelCache` keeps the last few loaded models (LRU); each has a lock, so one model generates one request
at a time (a CPU box gains nothing from interleaving two generations of one model).
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from ..errors import BadRequest


@dataclass
class LoadedModel:
    path: str
    model: Any
    tokenizer: Any
    base_model: str | None  # the base of an adapter, else None
    lock: threading.Lock = field(default_factory=threading.Lock)
    loaded_at: float = field(default_factory=time.time)


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(path: str | Path) -> str:
    return json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]


def load_for_inference(path: str | Path, base_model: str | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A model directory or a PEFT adapter (over its base) in eval mode, with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if is_adapter(path):
        from peft import PeftModel

        base = base_model or adapter_base(path)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, use_safetensors=True)
        model = PeftModel.from_pretrained(model, str(path))
        tok_dir = path if (path / "tokenizer_config.json").exists() else Path(base)
    elif (path / "config.json").is_file():
        base = None
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
        tok_dir = path
    else:
        raise BadRequest(f"model: {str(path)!r} is neither a model directory (config.json) nor a PEFT adapter "
                         "(adapter_config.json)")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if torch.cuda.is_available():  # untested here (CPU only); generation follows the model's device
        model = model.to("cuda")
    return LoadedModel(str(path), model.eval(), tokenizer, base)


class ModelCache:
    """The `capacity` most recently used models, loaded on demand (thread-safe)."""

    def __init__(self, capacity: int = 2):
        self.capacity = max(1, capacity)
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, path: str) -> LoadedModel:
        key = str(Path(path).resolve())
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # two requests for one new model load it once
            with self._lock:
                if key in self._models:
                    return self._models[key]
            try:
                loaded = load_for_inference(key)
            finally:
                with self._lock:
                    self._loading.pop(key, None)
            with self._lock:
                self._models[key] = loaded
                while len(self._models) > self.capacity:
                    self._models.popitem(last=False)
            return loaded

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._models)


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (eos or a stop string) or "length"


def prompt_ids(loaded: LoadedModel, messages: list[dict[str, str]]) -> list[int]:
    tok = loaded.tokenizer
    if tok.chat_template:
        return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return tok(text, add_special_tokens=True)["input_ids"]


def _cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stop if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _held_back(text: str, stop: list[str]) -> int:
    """How many trailing characters could still become a stop string (not streamed yet)."""
    n = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n


def stream_tokens(loaded: LoadedModel, ids: list[int], max_tokens: int, temperature: float, top_p: float,
                  seed: int | None) -> Iterator[int]:
    """Token ids one by one (KV cache; greedy at temperature 0), until eos or max_tokens."""
    model = loaded.model
    eos = set(_eos_ids(loaded))
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    x = torch.tensor([ids], device=model.device)
    past = None
    cache_kw = _cache_keyword(model)
    with torch.inference_mode():
        for _ in range(max_tokens):
            out = model(input_ids=x, use_cache=True, **{cache_kw: past})
            past = getattr(out, cache_kw)
            logits = out.logits[0, -1].float().cpu()
            if temperature <= 0:
                nxt = int(logits.argmax())
            else:
                probs = torch.softmax(logits / temperature, -1)
                if top_p < 1.0:
                    sorted_p, order = probs.sort(descending=True)
                    keep = sorted_p.cumsum(0) - sorted_p < top_p
                    probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
                nxt = int(torch.multinomial(probs / probs.sum(), 1, generator=gen))
            if nxt in eos:
                return
            yield nxt
            x = torch.tensor([[nxt]], device=model.device)


def _cache_keyword(model) -> str:
    """transformers 5.2x names the KV cache `cache`; earlier releases `past_key_values`."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _eos_ids(loaded: LoadedModel) -> list[int]:
    ids = loaded.model.generation_config.eos_token_id if loaded.model.generation_config else None
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    return [i for i in {*ids, loaded.tokenizer.eos_token_id} if i is not None]


def generate_stream(loaded: LoadedModel, messages: list[dict[str, str]], max_tokens: int, temperature: float = 0.0,
                    top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None
                    ) -> Iterator[str | Completion]:
    """Text deltas as they are decoded, then the Completion (text, token counts, finish reason)."""
    stop = stop or []
    ids = prompt_ids(loaded, messages)
    if _is_prompt_learning(loaded.model):
        yield from _generate_whole(loaded, ids, max_tokens, temperature, top_p, stop, seed)
        return
    generated: list[int] = []
    sent = 0
    finish = "length"
    with loaded.lock:
        for token in stream_tokens(loaded, ids, max_tokens, temperature, top_p, seed):
            generated.append(token)
            text = loaded.tokenizer.decode(generated, skip_special_tokens=True)
            text, stopped = _cut_at_stop(text, stop)
            if stopped:
                finish = "stop"
                if len(text) > sent:
                    yield text[sent:]
                sent = len(text)
                break
            # Hold back a partial stop string and a trailing partial UTF-8 character.
            ready = len(text) - _held_back(text, stop)
            if text.endswith("\ufffd"):
                ready = min(ready, len(text) - 1)
            if ready > sent:
                yield text[sent:ready]
                sent = ready
        else:
            if len(generated) < max_tokens:
                finish = "stop"
    final = loaded.tokenizer.decode(generated, skip_special_tokens=True)
    final, stopped = _cut_at_stop(final, stop)
    if len(final) > sent:
        yield final[sent:]
    yield Completion(final, len(ids), len(generated), "stop" if stopped else finish)


def _is_prompt_learning(model) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(config is not None and config.is_prompt_learning)


def _generate_whole(loaded: LoadedModel, ids: list[int], max_tokens: int, temperature: float, top_p: float,
                    stop: list[str], seed: int | None) -> Iterator[str | Completion]:
    # Prefix/prompt tuning inject virtual tokens inside peft's generate: no token-by-token loop here.
    if seed is not None:
        torch.manual_seed(seed)
    kw = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    with loaded.lock, torch.inference_mode():
        device = loaded.model.device
        out = loaded.model.generate(input_ids=torch.tensor([ids], device=device),
                                    attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                                    max_new_tokens=max_tokens, pad_token_id=loaded.tokenizer.pad_token_id, **kw)
    new = out[0, len(ids):].tolist() if out.shape[1] > len(ids) else out[0].tolist()
    eos = set(_eos_ids(loaded))
    cut = next((i for i, t in enumerate(new) if t in eos), None)
    tokens = new if cut is None else new[:cut]
    text, stopped = _cut_at_stop(loaded.tokenizer.decode(tokens, skip_special_tokens=True), stop)
    if text:
        yield text
    yield Completion(text, len(ids), len(tokens), "stop" if stopped or cut is not None else "length")


def generate(loaded: LoadedModel, messages: list[dict[str, str]], max_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None) -> Completion:
    """One chat completion (see generate_stream)."""
    result = None
    for item in generate_stream(loaded, messages, max_tokens, temperature, top_p, stop, seed):
        result = item
    assert isinstance(result, Completion)
    return result
