"""Load local checkpoints for inference and generate chat completions from them.

A checkpoint is a model directory (`config.json` + weights) or a PEFT adapter directory
(`adapter_config.json`), which is applied over its base model (`base_model_name_or_path`, or the
`base_model` given). Weights load from safetensors only: nothing is unpickled.

`ModelCache` keeps the last few loaded models (LRU); each loaded copy of weights has a lock, so one model generates
one request at a time (a CPU box gains nothing from interleaving two generations of one model). The adapters of one
base are named peft adapters inside that base's one loaded copy: a request switches to its adapter under the lock.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BadRequest

if TYPE_CHECKING:  # torch is imported where a model is loaded or run: importing this module (a server) costs none
    import torch


@dataclass
class SharedBase:
    """One loaded base model and the adapters loaded into it as named peft adapters (all of one peft type)."""

    key: str  # its directory's resolved path, or its Hugging Face id
    model: Any  # the transformers model; peft injects the adapters' layers into it in place
    tokenizer: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    peft: Any = None  # the PeftModel over `model`, from its first adapter on
    users: int = 0  # cache entries (the base itself, its adapters) and loads in progress that hold it
    names: Iterator[int] = field(default_factory=itertools.count)  # never reused: a dropped name may be in flight
    dropped: list[str] = field(default_factory=list)  # evicted adapters, deleted by the next holder of the lock


@dataclass
class LoadedModel:
    path: str
    model: Any
    tokenizer: Any
    base_model: str | None  # the base of an adapter, else None
    lock: threading.Lock = field(default_factory=threading.Lock)  # a shared base's, for it and its adapters
    loaded_at: float = field(default_factory=time.time)
    shared: SharedBase | None = None  # the loaded base this model runs on, where it shares one
    adapter: str | None = None  # its peft adapter's name inside `shared`; None: the base itself
    evicted: bool = False  # out of the cache: its adapter leaves the shared base after any request in flight


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(path: str | Path) -> str:
    return json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]


def _load_model(name: str | Path) -> Any:
    """A model directory (or Hugging Face id) in eval mode, fp32, on the GPU where there is one."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(name), dtype=torch.float32, use_safetensors=True)
    if torch.cuda.is_available():  # untested here (CPU only); generation follows the model's device
        model = model.to("cuda")
    return model.eval()


def _load_tokenizer(name: str | Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _adapter_tokenizer_dir(path: Path, base: str) -> str:
    return str(path if (path / "tokenizer_config.json").exists() else base)


def _check_model_dir(path: Path) -> None:
    if not is_adapter(path) and not (path / "config.json").is_file():
        raise BadRequest(f"model: {str(path)!r} is neither a model directory (config.json) nor a PEFT adapter "
                         "(adapter_config.json)")


def load_for_inference(path: str | Path, base_model: str | None = None) -> LoadedModel:
    """A model directory or a PEFT adapter (over its own copy of its base) in eval mode (fp32), with its tokenizer."""
    path = Path(path)
    _check_model_dir(path)
    if not is_adapter(path):
        return LoadedModel(str(path), _load_model(path), _load_tokenizer(path), None)
    from peft import PeftModel

    base = base_model or adapter_base(path)
    model = PeftModel.from_pretrained(_load_model(base), str(path))
    return LoadedModel(str(path), model.eval(), _load_tokenizer(_adapter_tokenizer_dir(path, base)), base)


def _base_key(base: str) -> str:
    """The cache's name for an adapter's base: a directory's resolved path (as requests name it), else the id."""
    return str(Path(base).resolve()) if Path(base).is_dir() else base


def _attach(shared: SharedBase, path: str, name: str) -> None:
    """Load the adapter at `path` into the shared base as `name` (under the base's lock)."""
    if shared.peft is None:
        from peft import PeftModel

        shared.peft = PeftModel.from_pretrained(shared.model, path, adapter_name=name)
    else:
        shared.peft.load_adapter(path, adapter_name=name)
        shared.peft.set_adapter(name)  # none may be active (all dropped): disable_adapter needs one
    shared.peft.eval()


def _drop_evicted(shared: SharedBase) -> None:
    """Delete the evicted adapters from the shared base (under the base's lock)."""
    while shared.dropped:
        name = shared.dropped.pop()
        if shared.peft is not None and name in shared.peft.peft_config:
            others = [n for n in shared.peft.peft_config if n != name]
            if others and shared.peft.active_adapter == name:
                shared.peft.set_adapter(others[0])  # peft warns when it has to pick one itself
            shared.peft.delete_adapter(name)


@contextmanager
def _active(loaded: LoadedModel) -> Iterator[None]:
    """Hold the model's lock with its adapter switched on (for a base: its adapters off)."""
    with loaded.lock:
        shared = loaded.shared
        if shared is not None:
            _drop_evicted(shared)
        if shared is None or (loaded.adapter is None and (shared.peft is None or not shared.peft.peft_config)):
            yield
        elif loaded.adapter is None:
            with shared.peft.disable_adapter():
                yield
        else:
            if loaded.adapter not in shared.peft.peft_config:
                _attach(shared, loaded.path, loaded.adapter)  # evicted after the request got it: back for this one
            shared.peft.set_adapter(loaded.adapter)
            try:
                yield
            finally:
                if loaded.evicted:
                    shared.dropped.append(loaded.adapter)
                    _drop_evicted(shared)


class ModelCache:
    """The `capacity` most recently used models, loaded on demand (thread-safe).

    Each model served counts one against `capacity`: a base, and each of its adapters. The adapters of one base
    (LoRA and the other peft types that patch the base's layers, one peft type per base) share its one loaded copy
    as named peft adapters, so a base and two of its adapters hold the base's weights once. That copy stays while
    anything in the cache uses it (the base itself or any of its adapters); evicting an adapter removes only its
    own weights. Prefix/prompt-tuning adapters (their virtual tokens live on the PeftModel) and an adapter of a
    peft type other than the one its base already holds get their own copy of their base.
    """

    def __init__(self, capacity: int = 2):
        self.capacity = max(1, capacity)
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._bases: dict[str, SharedBase] = {}
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._loading_bases: dict[str, threading.Lock] = {}

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
                loaded = self._load(Path(key))
                with self._lock:
                    self._models[key] = loaded
                    evicted = []
                    while len(self._models) > self.capacity:
                        evicted.append(self._models.popitem(last=False)[1])
            finally:
                with self._lock:
                    self._loading.pop(key, None)
            for old in evicted:
                self._evict(old)
            return loaded

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._models)

    def _load(self, path: Path) -> LoadedModel:
        _check_model_dir(path)
        if not is_adapter(path):
            shared = self._hold_base(str(path))
            return LoadedModel(str(path), shared.model, shared.tokenizer, None, shared.lock, shared=shared)
        from peft import PeftConfig

        config = PeftConfig.from_pretrained(str(path))
        if config.is_prompt_learning:
            return load_for_inference(path)
        base = adapter_base(path)
        tok_dir = _adapter_tokenizer_dir(path, base)
        tokenizer = None if tok_dir == base else _load_tokenizer(tok_dir)
        shared = self._hold_base(_base_key(base))
        attached = False
        try:
            with shared.lock:
                _drop_evicted(shared)
                if shared.peft is None or shared.peft.peft_type == config.peft_type:  # peft: one type per model
                    name = f"adapter{next(shared.names)}"
                    _attach(shared, str(path), name)
                    attached = True
        finally:
            if not attached:
                self._release(shared)
        if not attached:
            return load_for_inference(path)
        return LoadedModel(str(path), shared.peft, tokenizer or shared.tokenizer, base, shared.lock, shared=shared,
                           adapter=name)

    def _hold_base(self, key: str) -> SharedBase:
        """The loaded base `key` (loaded now if it is not), held until `_release`."""
        with self._lock:
            loading = self._loading_bases.setdefault(key, threading.Lock())
        with loading:
            with self._lock:
                shared = self._bases.get(key)
                if shared is not None:
                    shared.users += 1
                    return shared
            try:
                shared = SharedBase(key, _load_model(key), _load_tokenizer(key), users=1)
                with self._lock:
                    self._bases[key] = shared
            finally:
                with self._lock:
                    self._loading_bases.pop(key, None)
            return shared

    def _release(self, shared: SharedBase) -> None:
        with self._lock:
            shared.users -= 1
            if shared.users == 0 and self._bases.get(shared.key) is shared:  # its memory goes with the last request
                del self._bases[shared.key]

    def _evict(self, loaded: LoadedModel) -> None:
        shared = loaded.shared
        if shared is None:
            return
        loaded.evicted = True
        if loaded.adapter is not None:
            shared.dropped.append(loaded.adapter)
            if shared.lock.acquire(blocking=False):  # else the request holding the base drops it
                try:
                    _drop_evicted(shared)
                finally:
                    shared.lock.release()
        self._release(shared)


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
    if loaded.shared is None and _is_prompt_learning(loaded.model):  # a shared base holds no prompt learning
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

    with _active(loaded):
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
    with _active(loaded), torch.inference_mode():
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
