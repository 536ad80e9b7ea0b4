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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BadRequest

if TYPE_CHECKING:  # torch is imported where a model is loaded or run: importing this module (a server) costs none
    import torch


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


def load_for_inference(path: str | Path, base_model: str | None = None) -> LoadedModel:
    """A model directory or a PEFT adapter (over its base) in eval mode (fp32), with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32

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
class TokenLogprob:
    """One token's log-probability under the model (before temperature and top_p), with the `top` likeliest
    alternatives at its position (most likely first; empty unless asked for)."""

    token: str
    logprob: float | None  # None: a prompt's first token (nothing before it)
    top: list[tuple[str, float]] = field(default_factory=list)


class Delta(str):
    """A streamed piece of text; `logprobs`: the tokens decoded since the previous piece (when asked for)."""

    logprobs: Sequence[TokenLogprob] = ()


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when asked for
    prompt_logprobs: list[TokenLogprob] | None = None  # one per prompt token, when asked for


def prompt_ids(loaded: LoadedModel, messages: list[dict[str, str]]) -> list[int]:
    tok = loaded.tokenizer
    if tok.chat_template:
        return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return tok(text, add_special_tokens=True)["input_ids"]


def text_prompt_ids(loaded: LoadedModel, text: str) -> list[int]:
    """A raw completion prompt's tokens (the tokenizer's own special tokens, no chat template)."""
    return loaded.tokenizer(text, add_special_tokens=True)["input_ids"]


def _token_logprob(loaded: LoadedModel, logprobs: torch.Tensor, token: int, k: int) -> TokenLogprob:
    decode = loaded.tokenizer.decode
    top = []
    if k:
        values, ids = logprobs.topk(k)
        top = [(decode([int(i)]), float(v)) for v, i in zip(values, ids)]
    return TokenLogprob(decode([token]), float(logprobs[token]), top)


def _prompt_logprobs(loaded: LoadedModel, ids: list[int], logits: torch.Tensor, k: int) -> list[TokenLogprob]:
    """Each prompt token's log-probability given the tokens before it, from the prompt pass's logits
    (row by row: no second vocabulary-sized copy of the whole prompt)."""
    import torch

    return [TokenLogprob(loaded.tokenizer.decode([ids[0]]), None)] + [_token_logprob(loaded, torch.log_softmax(logits[i].float(), -1), ids[i + 1], k)
                     for i in range(len(ids) - 1)]


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
    eos = set(_eos_ids(loaded))
    for token, _ in token_steps(loaded, ids, max_tokens, temperature, top_p, seed):
        if token in eos:
            return
        yield token


def token_steps(loaded: LoadedModel, ids: list[int], max_tokens: int, temperature: float, top_p: float,
                seed: int | None, top_logprobs: int | None = None, prompt_logprobs: list | None = None
                ) -> Iterator[tuple[int, TokenLogprob | None]]:
    """(token id, its TokenLogprob when `top_logprobs` is not None) one by one (KV cache; greedy at
    temperature 0), until max_tokens or an eos token (yielded too: its log-prob is the answer's last). With a
    `prompt_logprobs` list, the prompt's own log-probs are appended to it from the prompt pass (even at max_tokens 0)."""
    import torch

    model = loaded.model
    eos = set(_eos_ids(loaded))
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    x = torch.tensor([ids], device=model.device)
    past = None
    cache_kw = _cache_keyword(model)
    with torch.inference_mode():
        for step in range(max(max_tokens, 1 if prompt_logprobs is not None else 0)):
            out = model(input_ids=x, use_cache=True, **{cache_kw: past})
            if step == 0 and prompt_logprobs is not None:
                prompt_logprobs.extend(_prompt_logprobs(loaded, ids, out.logits[0], top_logprobs or 0))
                if max_tokens == 0:
                    return
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
            logprob = None
            if top_logprobs is not None:
                logprob = _token_logprob(loaded, torch.log_softmax(logits, -1), nxt, top_logprobs)
            yield nxt, logprob
            if nxt in eos:
                return
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
                    top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None,
                    top_logprobs: int | None = None) -> Iterator[str | Completion]:
    """A chat reply: text deltas as they are decoded, then the Completion (text, token counts, finish reason)."""
    return generate_ids_stream(loaded, prompt_ids(loaded, messages), max_tokens, temperature, top_p, stop, seed,
                               top_logprobs)


def generate_ids_stream(loaded: LoadedModel, ids: list[int], max_tokens: int, temperature: float = 0.0,
                        top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None,
                        top_logprobs: int | None = None, echo_logprobs: bool = False) -> Iterator[str | Completion]:
    """The continuation of prompt tokens `ids`: text deltas as they are decoded (`Delta`s carrying their tokens'
    log-probs when `top_logprobs` is not None: that many alternatives each), then the Completion. `echo_logprobs`:
    the Completion also carries the prompt tokens' log-probs."""
    stop = stop or []
    if _is_prompt_learning(loaded.model):
        if top_logprobs is not None or echo_logprobs:
            raise BadRequest("logprobs: not available for prefix/prompt-tuning adapters (their virtual tokens are "
                             "added inside peft's generate); ask without logprobs")
        yield from _generate_whole(loaded, ids, max_tokens, temperature, top_p, stop, seed)
        return
    eos = set(_eos_ids(loaded))
    generated: list[int] = []
    logprobs: list[TokenLogprob] = []  # the generated tokens' and, at the end, the eos token's
    prompt_logprobs: list | None = [] if echo_logprobs else None
    sent_text = sent_logprobs = 0
    finish = "length"

    def delta(text: str) -> Delta:
        nonlocal sent_logprobs
        piece = Delta(text)
        if top_logprobs is not None:
            piece.logprobs, sent_logprobs = logprobs[sent_logprobs:], len(logprobs)
        return piece

    with loaded.lock:
        for token, logprob in token_steps(loaded, ids, max_tokens, temperature, top_p, seed, top_logprobs,
                                          prompt_logprobs):
            if logprob is not None:
                logprobs.append(logprob)
            if token in eos:
                finish = "stop"
                break
            generated.append(token)
            text = loaded.tokenizer.decode(generated, skip_special_tokens=True)
            text, stopped = _cut_at_stop(text, stop)
            if stopped:
                finish = "stop"
                if len(text) > sent_text:
                    yield delta(text[sent_text:])
                sent_text = len(text)
                break
            # Hold back a partial stop string and a trailing partial UTF-8 character.
            ready = len(text) - _held_back(text, stop)
            if text.endswith("\ufffd"):
                ready = min(ready, len(text) - 1)
            if ready > sent_text:
                yield delta(text[sent_text:ready])
                sent_text = ready
    final = loaded.tokenizer.decode(generated, skip_special_tokens=True)
    final, stopped = _cut_at_stop(final, stop)
    if len(final) > sent_text or sent_logprobs < len(logprobs):
        yield delta(final[sent_text:])
    yield Completion(final, len(ids), len(generated), "stop" if stopped else finish,
                     logprobs if top_logprobs is not None else None, prompt_logprobs)


def _is_prompt_learning(model) -> bool:
    config = getattr(model, "active_peft_config", None)
    return bool(config is not None and config.is_prompt_learning)


def _generate_whole(loaded: LoadedModel, ids: list[int], max_tokens: int, temperature: float, top_p: float,
                    stop: list[str], seed: int | None) -> Iterator[str | Completion]:
    # Prefix/prompt tuning inject virtual tokens inside peft's generate: no token-by-token loop here.
    import torch

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
             top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None,
             top_logprobs: int | None = None) -> Completion:
    """One chat completion (see generate_stream)."""
    return generate_ids(loaded, prompt_ids(loaded, messages), max_tokens, temperature, top_p, stop, seed, top_logprobs)


def generate_ids(loaded: LoadedModel, ids: list[int], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 stop: list[str] | None = None, seed: int | None = None, top_logprobs: int | None = None,
                 echo_logprobs: bool = False) -> Completion:
    """One continuation of prompt tokens (see generate_ids_stream)."""
    result = None
    for item in generate_ids_stream(loaded, ids, max_tokens, temperature, top_p, stop, seed, top_logprobs,
                                    echo_logprobs):
        result = item
    assert isinstance(result, Completion)
    return result
