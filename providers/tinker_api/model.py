"""The Tinker API's models in memory: a base model shared by the LoRA adapters of every model trained on it,
each with its optimizer, and the four primitives (forward_backward, optim_step, sample, save/load) on one
adapter. Tensors only: no HTTP, no sessions.

Semantics follow the Tinker SDK: position i of a datum predicts its target token i; losses are sums over
tokens and datums (cross-entropy = sum of -logp * weight); gradients accumulate across forward_backward
calls until optim_step.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..training.components import load_model, load_tokenizer
from .types import LOSS_INPUTS, Datum, LogprobRequest, LoraSpec, UserInputError

LORA_ALPHA = 32  # Tinker's fixed LoRA alpha
ATTN_WORDS, MLP_WORDS = ("attn", "attention"), ("mlp", "feed_forward", "ffn")


@dataclass
class AdapterSnapshot:
    """The adapter weights as of one optimizer step (what an ephemeral sampling client samples)."""
    version: int
    tensors: dict[str, torch.Tensor]


def _ratio(logp, inputs):
    return torch.exp(logp - inputs["logprobs"])


def _ce(logp, inputs, cfg):
    return -logp * inputs.get("weights", torch.ones_like(logp))


def _importance_sampling(logp, inputs, cfg):
    return -_ratio(logp, inputs) * inputs["advantages"]


def _ppo(logp, inputs, cfg):
    r, adv = _ratio(logp, inputs), inputs["advantages"]
    clipped = r.clamp(cfg.get("clip_low_threshold", 0.8), cfg.get("clip_high_threshold", 1.2))
    return -torch.minimum(r * adv, clipped * adv)


def _cispo(logp, inputs, cfg):
    r = _ratio(logp, inputs).clamp(cfg.get("clip_low_threshold", 0.0), cfg.get("clip_high_threshold", 4.0))
    return -(r.detach() * inputs["advantages"] * logp)


def _dro(logp, inputs, cfg):
    beta = cfg.get("beta", 0.05)
    return -(logp * inputs["advantages"] - 0.5 * beta * (logp - inputs["logprobs"]) ** 2)


# loss name (types.LOSS_INPUTS) -> its per-token loss(logp, inputs, config)
LOSSES: dict[str, Callable] = {
    "cross_entropy": _ce,
    "importance_sampling": _importance_sampling,
    "ppo": _ppo,
    "cispo": _cispo,
    "dro": _dro,
}
assert LOSSES.keys() == LOSS_INPUTS.keys()


def linear_groups(model) -> dict[str, set[str]]:
    """The names (leaves) of a model's linear modules by what they are: "unembed", "attn" or "mlp"."""
    unembed = model.get_output_embeddings()
    groups: dict[str, set[str]] = {"unembed": set(), "attn": set(), "mlp": set()}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if module is unembed:
            groups["unembed"].add(leaf)
        elif any(w in name for w in ATTN_WORDS):
            groups["attn"].add(leaf)
        elif any(w in name for w in MLP_WORDS):
            groups["mlp"].add(leaf)
    return groups


def lora_targets(groups: dict[str, set[str]], spec: LoraSpec) -> list[str]:
    """The linear modules to adapt: attention, MLP and/or the unembedding, as the spec asks."""
    wanted = {"unembed": spec.train_unembed, "attn": spec.train_attn, "mlp": spec.train_mlp}
    return sorted(set().union(*(leaves for group, leaves in groups.items() if wanted[group])))


@dataclass
class Adapter:
    """One model's LoRA adapter on a SharedBase: its peft name, parameters and optimizer."""
    name: str  # the peft adapter name (ModuleDict keys: no '.' or ':')
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer | None = None
    version: int = 0  # optimizer steps taken (or loads): what a snapshot is compared with


class SharedBase:
    """A base model read once, and the LoRA adapters of every model trained or sampled on it, each a named
    peft adapter with its own optimizer; sampling of the base itself with the adapters off. Sessions on the
    same base share it, as the hosted service does. Held by its base's worker process (process.py), which runs
    one request at a time: calls of different adapters run one after the other, each with its own adapter
    active."""

    def __init__(self, base_path: str):
        self.base_path = base_path
        self.tokenizer = load_tokenizer(base_path)
        self.base = load_model(base_path).eval()  # eval: no dropout, forward logprobs match the sampler's
        self.vocab_size = self.base.get_output_embeddings().weight.shape[0]
        self.max_positions = getattr(self.base.config, "max_position_embeddings", None) or 1 << 20
        self.linear_groups = linear_groups(self.base)  # before any LoRA layer wraps a module
        self.peft = None  # the PeftModel wrapping `base` once it has an adapter
        self.adapters: dict[str, Adapter] = {}

    # -- adapters ------------------------------------------------------------------------------------------
    def add(self, name: str, lora: LoraSpec | None, directory: Path | None = None,
            with_optimizer: bool = False) -> Adapter:
        """A new adapter `name`: fresh (LoRA as `lora` says, seeded by its seed), or the one saved in
        `directory` (its weights, and its optimizer's state with `with_optimizer`)."""
        import peft

        if directory is not None:
            config = peft.LoraConfig.from_pretrained(str(directory))
            config.inference_mode = False
        else:
            targets = lora_targets(self.linear_groups, lora)
            if not targets:
                raise UserInputError("lora_config: train_attn, train_mlp and train_unembed are all false: "
                                     "nothing to train")
            config = peft.LoraConfig(r=lora.rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                     target_modules=targets, task_type="CAUSAL_LM")
            if lora.seed is not None:
                torch.manual_seed(lora.seed)
        if self.peft is None:
            self.peft = peft.get_peft_model(self.base, config, adapter_name=name)
        else:
            self.peft.add_adapter(name, config)
        self.peft.set_adapter(name)
        self.peft.eval()
        marker = f".{name}."
        adapter = Adapter(name, [p for n, p in self.peft.named_parameters() if marker in n])
        self.adapters[name] = adapter
        if directory is not None:
            self.load(name, directory, with_optimizer)
        return adapter

    def has_gradients(self, name: str) -> bool:
        """Whether adapter `name` holds gradients that no optim_step has used yet."""
        return any(p.grad is not None for p in self.adapters[name].params)

    def remove(self, name: str) -> None:
        """Drop adapter `name` (its weights, gradients and optimizer); the last one unwraps the base."""
        if self.adapters.pop(name, None) is None:
            return
        if not self.adapters:
            self.base = self.peft.unload()  # the base's own modules, without any LoRA layer
            self.peft = None
        else:
            self.peft.delete_adapter(name)

    @contextlib.contextmanager
    def _active(self, name: str | None):
        """The module to call with adapter `name` active (None: the base alone, every adapter off)."""
        if name is None and self.peft is not None:
            with self.peft.disable_adapter():
                yield self.peft
        elif name is None:
            yield self.base
        else:
            self.peft.set_adapter(name)
            yield self.peft

    # -- training ------------------------------------------------------------------------------------------
    def forward_backward(self, name: str, data: list[Datum], loss_fn: str, config: dict[str, float],
                         forward_only: bool):
        """Per datum its `logprobs` and `elementwise_loss`, and the metrics; gradients add to the adapter's
        until `optim_step` (unless forward_only)."""
        loss_of = LOSSES[loss_fn]
        n = max(len(d.tokens) for d in data)
        ids = torch.zeros(len(data), n, dtype=torch.long)
        mask = torch.zeros(len(data), n, dtype=torch.long)
        inputs: dict[str, torch.Tensor] = {}
        for i, d in enumerate(data):
            ids[i, :len(d.tokens)] = torch.from_numpy(d.tokens)
            mask[i, :len(d.tokens)] = 1
            for key, arr in d.inputs.items():
                t = inputs.setdefault(key, torch.zeros(len(data), n, dtype=torch.long if arr.dtype == np.int64
                                                         else torch.float32))
                t[i, :len(arr)] = torch.from_numpy(arr)
        with torch.set_grad_enabled(not forward_only), self._active(name) as module:
            logits = module(input_ids=ids, attention_mask=mask).logits.float()
            logp = -F.cross_entropy(logits.flatten(0, 1), inputs["target_tokens"].flatten(), reduction="none")
            logp = logp.view(len(data), n)
            elementwise = loss_of(logp, inputs, config) * mask
            loss = elementwise.sum()
            if not forward_only:
                loss.backward()
        outputs = [{"logprobs": logp[i, :len(d.tokens)].detach().numpy().astype(np.float32),
                    "elementwise_loss": elementwise[i, :len(d.tokens)].detach().numpy().astype(np.float32)}
                   for i, d in enumerate(data)]
        return outputs, {"loss:sum": loss.item()}

    def optim_step(self, name: str, learning_rate: float, beta1: float, beta2: float, eps: float,
                   weight_decay: float, grad_clip_norm: float) -> dict[str, float]:
        """One AdamW step of adapter `name` with these settings on its accumulated gradients, then cleared."""
        adapter = self.adapters[name]
        params = adapter.params
        if adapter.optimizer is None:
            adapter.optimizer = torch.optim.AdamW(params, lr=learning_rate, fused=True)  # as the training core
        for group in adapter.optimizer.param_groups:
            group.update(lr=learning_rate, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
        grads = [p.grad for p in params if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        if grad_clip_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, grad_clip_norm, torch.tensor(norm))
        adapter.optimizer.step()
        adapter.optimizer.zero_grad(set_to_none=True)
        adapter.version += 1
        return {"grad_norm:mean": norm}

    # -- weights -------------------------------------------------------------------------------------------
    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.peft, adapter_name=name)

    def snapshot(self, name: str) -> AdapterSnapshot:
        return AdapterSnapshot(self.adapters[name].version,
                               {k: v.detach().clone() for k, v in self.adapter_state(name).items()})

    def _set_adapter(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.peft, tensors, adapter_name=name)
        if result.unexpected_keys:
            raise UserInputError(f"path: the checkpoint's adapter does not fit this model "
                                 f"(unexpected weights {result.unexpected_keys[:3]})")

    def save_bytes(self, name: str, with_optimizer: bool) -> int:
        """About what `save` writes for adapter `name`: its state (peft's: an adapted lm_head brings its base
        weight), and AdamW's two moments of each trained parameter."""
        adapter = self.adapters[name]
        tensors = self.adapter_state(name).values()
        state = sum(t.numel() * t.element_size() for t in tensors)
        moments = 2 * sum(p.numel() * p.element_size() for p in adapter.params) if with_optimizer \
            and adapter.optimizer is not None else 0
        return state + 128 * len(tensors) + moments + 4096  # + safetensors headers, configs, step counts

    def save(self, name: str, directory: Path, with_optimizer: bool, meta: dict) -> None:
        """Adapter `name` in peft's layout (it loads with PeftModel.from_pretrained), and its optimizer's state."""
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        self.peft.peft_config[name].save_pretrained(str(directory))
        save_file({k: v.detach().contiguous() for k, v in self.adapter_state(name).items()},
                  str(directory / "adapter_model.safetensors"))
        optimizer = self.adapters[name].optimizer
        if with_optimizer and optimizer is not None:
            torch.save(optimizer.state_dict(), directory / "optimizer.pt")
        (directory / "tinker.json").write_text(json.dumps(meta))

    def load(self, name: str, directory: Path, with_optimizer: bool) -> None:
        from safetensors.torch import load_file

        adapter = self.adapters[name]
        self._set_adapter(name, load_file(str(directory / "adapter_model.safetensors")))
        adapter.optimizer = None
        if with_optimizer and (directory / "optimizer.pt").exists():
            adapter.optimizer = torch.optim.AdamW(adapter.params, fused=True)
            adapter.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
        adapter.version += 1

    # -- sampling ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, name: str | None, prompt: list[int], num_samples: int, max_tokens: int, temperature: float,
               top_k: int, top_p: float, seed: int | None, stop: list[str] | list[int], logprobs: LogprobRequest,
               snapshot: AdapterSnapshot | None = None) -> dict:
        """`num_samples` continuations of `prompt` under adapter `name` (None: the base), with each sampled
        token's logprob (of the model's own distribution, as the trainer computes it) and what `logprobs`
        asks for more; with `snapshot`, under those weights of the adapter (swapped in for this call, no copy
        kept)."""
        if snapshot is not None and snapshot.version != self.adapters[name].version:
            current = self.snapshot(name)
            self._set_adapter(name, snapshot.tensors)
            try:
                return self.sample(name, prompt, num_samples, max_tokens, temperature, top_k, top_p, seed, stop,
                                   logprobs)
            finally:
                self._set_adapter(name, current.tensors)
        with self._active(name) as module:
            return self._generate(module, prompt, num_samples, max_tokens, temperature, top_k, top_p, seed, stop,
                                  logprobs)

    def _generate(self, module, prompt, num_samples, max_tokens, temperature, top_k, top_p, seed, stop,
                  want: LogprobRequest) -> dict:
        gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(1 << 62, ())))
        stop_ids = {s for s in stop if isinstance(s, int)}
        stop_texts = [s for s in stop if isinstance(s, str)]
        if not stop:
            stop_ids = {self.tokenizer.eos_token_id} - {None}
        ids = torch.tensor([prompt] * num_samples)
        out = module(input_ids=ids, use_cache=True)
        result: dict = {}
        if want.prompt or want.topk_prompt:
            prompt_logp = torch.log_softmax(out.logits[0, :-1].float(), -1)  # row i: the logprobs of token i+1
            if want.prompt:
                lp = prompt_logp.gather(-1, ids[0, 1:, None]).squeeze(-1)
                result["prompt_logprobs"] = [math.nan, *lp.tolist()]
            if want.topk_prompt:
                top = prompt_logp.topk(min(want.topk_prompt, self.vocab_size), -1)
                result["topk_prompt_logprobs"] = (top.indices.numpy(), top.values.numpy())  # rows: tokens 1..n-1
        past, logits = out.past_key_values, out.logits[:, -1].float()
        tokens = [[] for _ in range(num_samples)]
        logprobs = [[] for _ in range(num_samples)]
        topk = [[] for _ in range(num_samples)]
        reasons = ["length"] * num_samples
        done = [False] * num_samples
        for _ in range(max_tokens):
            logp = torch.log_softmax(logits, -1)
            nxt = self._pick(logits, temperature, top_k, top_p, gen)
            top = logp.topk(min(want.topk_sample, self.vocab_size), -1) if want.topk_sample else None
            for i in range(num_samples):
                if done[i]:
                    continue
                t = int(nxt[i])
                tokens[i].append(t)
                logprobs[i].append(float(logp[i, t]))
                if top is not None:
                    topk[i].append((top.indices[i].numpy(), top.values[i].numpy()))
                if t in stop_ids or (stop_texts and any(s in self.tokenizer.decode(tokens[i]) for s in stop_texts)):
                    done[i], reasons[i] = True, "stop"
            if all(done):
                break
            out = module(input_ids=nxt[:, None], past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1].float()
        result["sequences"] = [{"tokens": t, "logprobs": lp, "stop_reason": r} for t, lp, r in
                               zip(tokens, logprobs, reasons)]
        if want.topk_sample:
            for seq, rows in zip(result["sequences"], topk):
                seq["topk_logprobs"] = (np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]))
        return result

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen) -> torch.Tensor:
        if temperature <= 0:
            return logits.argmax(-1)
        logits = logits / temperature
        if 0 < top_k < logits.shape[-1]:
            kth = logits.topk(top_k, -1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if top_p < 1:
            sorted_logits, order = logits.sort(-1, descending=True)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), -math.inf)
        return torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(-1)
