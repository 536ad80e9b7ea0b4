"""One resident model of the Tinker API: a base model with a LoRA adapter, its optimizer, and the four
primitives (forward_backward, optim_step, sample, save/load). Tensors only: no HTTP, no sessions.

Semantics follow the Tinker SDK: position i of a datum predicts its target token i; losses are sums over
tokens and datums (cross-entropy = sum of -logp * weight); gradients accumulate across forward_backward
calls until optim_step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..training.components import load_model, load_tokenizer

LORA_ALPHA = 32  # Tinker's fixed LoRA alpha
ATTN_WORDS, MLP_WORDS = ("attn", "attention"), ("mlp", "feed_forward", "ffn")


class UserInputError(ValueError):
    """A client mistake found while running a request: the future fails with category `user`."""


@dataclass
class Datum:
    tokens: np.ndarray  # int64 [N]: the model input
    inputs: dict[str, np.ndarray] = field(default_factory=dict)  # loss_fn_inputs, each flattened to [N]


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 32
    seed: int | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True


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


RL_INPUTS = ("target_tokens", "logprobs", "advantages")
# loss name -> (per-token loss(logp, inputs, config), the loss_fn_inputs it needs)
LOSSES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "cross_entropy": (_ce, ("target_tokens",)),
    "importance_sampling": (_importance_sampling, RL_INPUTS),
    "ppo": (_ppo, RL_INPUTS),
    "cispo": (_cispo, RL_INPUTS),
    "dro": (_dro, RL_INPUTS),
}


def lora_targets(model, spec: LoraSpec) -> list[str]:
    """The linear modules' names to adapt: attention, MLP and/or the unembedding, as the spec asks."""
    unembed = model.get_output_embeddings()
    targets = set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if module is unembed:
            if spec.train_unembed:
                targets.add(leaf)
        elif any(w in name for w in ATTN_WORDS):
            if spec.train_attn:
                targets.add(leaf)
        elif any(w in name for w in MLP_WORDS):
            if spec.train_mlp:
                targets.add(leaf)
    return sorted(targets)


class TinkerModel:
    """A base model (read once) with one trainable LoRA adapter; `lora=None`: the base only (sampling)."""

    def __init__(self, base_path: str, lora: LoraSpec | None):
        import peft

        self.base_path, self.lora = base_path, lora
        self.tokenizer = load_tokenizer(base_path)
        model = load_model(base_path)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.max_positions = getattr(model.config, "max_position_embeddings", None) or 1 << 20
        self.version = 0  # optimizer steps taken (or loads): what a snapshot is compared with
        self.optimizer = None
        if lora is None:
            self.model = model.eval()
            return
        targets = lora_targets(model, lora)
        if not targets:
            raise UserInputError("lora_config: train_attn, train_mlp and train_unembed are all false: nothing to train")
        if lora.seed is not None:
            torch.manual_seed(lora.seed)
        config = peft.LoraConfig(r=lora.rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=targets,
                                 task_type="CAUSAL_LM")
        self.model = peft.get_peft_model(model, config)
        self.model.eval()  # no dropout: forward logprobs are deterministic, as the sampler's

    # -- training ------------------------------------------------------------------------------------------
    def forward_backward(self, data: list[Datum], loss_fn: str, config: dict[str, float], forward_only: bool):
        """Per datum its `logprobs` and `elementwise_loss`, and the metrics; gradients add to the parameters'
        until `optim_step` (unless forward_only)."""
        loss_of, _ = LOSSES[loss_fn]
        n = max(len(d.tokens) for d in data)
        ids = torch.zeros(len(data), n, dtype=torch.long)
        mask = torch.zeros(len(data), n, dtype=torch.long)
        inputs: dict[str, torch.Tensor] = {}
        for i, d in enumerate(data):
            ids[i, :len(d.tokens)] = torch.from_numpy(d.tokens)
            mask[i, :len(d.tokens)] = 1
            for name, arr in d.inputs.items():
                t = inputs.setdefault(name, torch.zeros(len(data), n, dtype=torch.long if arr.dtype == np.int64
                                                          else torch.float32))
                t[i, :len(arr)] = torch.from_numpy(arr)
        with torch.set_grad_enabled(not forward_only and self.lora is not None):
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
            logp = -F.cross_entropy(logits.flatten(0, 1), inputs["target_tokens"].flatten(), reduction="none")
            logp = logp.view(len(data), n)
            elementwise = loss_of(logp, inputs, config) * mask
            loss = elementwise.sum()
            if not forward_only and self.lora is not None:
                loss.backward()
        outputs = [{"logprobs": logp[i, :len(d.tokens)].detach().numpy().astype(np.float32),
                    "elementwise_loss": elementwise[i, :len(d.tokens)].detach().numpy().astype(np.float32)}
                   for i, d in enumerate(data)]
        return outputs, {"loss:sum": loss.item()}

    def _trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def optim_step(self, learning_rate: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                   grad_clip_norm: float) -> dict[str, float]:
        """One AdamW step with these settings on the accumulated gradients, which it then clears."""
        params = self._trainable()
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(params, lr=learning_rate)
        for group in self.optimizer.param_groups:
            group.update(lr=learning_rate, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)
        grads = [p.grad for p in params if p.grad is not None]
        norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        if grad_clip_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, grad_clip_norm, torch.tensor(norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.version += 1
        return {"grad_norm:mean": norm}

    # -- weights -------------------------------------------------------------------------------------------
    def adapter_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model)

    def snapshot(self) -> AdapterSnapshot:
        return AdapterSnapshot(self.version, {k: v.detach().clone() for k, v in self.adapter_state().items()})

    def _set_adapter(self, tensors: dict[str, torch.Tensor]) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, tensors)
        if result.unexpected_keys:
            raise UserInputError(f"path: the checkpoint's adapter does not fit this model "
                                 f"(unexpected weights {result.unexpected_keys[:3]})")

    def save(self, directory: Path, with_optimizer: bool, meta: dict) -> None:
        """The adapter (peft's layout: it loads with PeftModel.from_pretrained), and the optimizer's state."""
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(directory))
        if with_optimizer and self.optimizer is not None:
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
        (directory / "tinker.json").write_text(json.dumps(meta))

    def load(self, directory: Path, with_optimizer: bool) -> None:
        from safetensors.torch import load_file

        self._set_adapter(load_file(str(directory / "adapter_model.safetensors")))
        self.optimizer = None
        if with_optimizer and (directory / "optimizer.pt").exists():
            self.optimizer = torch.optim.AdamW(self._trainable())
            self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
        self.version += 1

    # -- sampling ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompt: list[int], num_samples: int, max_tokens: int, temperature: float, top_k: int,
               top_p: float, seed: int | None, stop: list[str] | list[int], prompt_logprobs: bool,
               snapshot: AdapterSnapshot | None = None) -> dict:
        """`num_samples` continuations of `prompt` with each sampled token's logprob (of the model's own
        distribution, as the trainer computes it); with `snapshot`, under those adapter weights."""
        if snapshot is not None and snapshot.version != self.version:
            current = self.snapshot()
            self._set_adapter(snapshot.tensors)
            try:
                return self.sample(prompt, num_samples, max_tokens, temperature, top_k, top_p, seed, stop,
                                   prompt_logprobs)
            finally:
                self._set_adapter(current.tensors)
        gen = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(1 << 62, ())))
        stop_ids = {s for s in stop if isinstance(s, int)}
        stop_texts = [s for s in stop if isinstance(s, str)]
        if not stop:
            stop_ids = {self.tokenizer.eos_token_id} - {None}
        ids = torch.tensor([prompt] * num_samples)
        out = self.model(input_ids=ids, use_cache=True)
        result: dict = {}
        if prompt_logprobs:
            lp = torch.log_softmax(out.logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            result["prompt_logprobs"] = [math.nan, *lp.tolist()]
        past, logits = out.past_key_values, out.logits[:, -1].float()
        tokens = [[] for _ in range(num_samples)]
        logprobs = [[] for _ in range(num_samples)]
        reasons = ["length"] * num_samples
        done = [False] * num_samples
        for _ in range(max_tokens):
            logp = torch.log_softmax(logits, -1)
            nxt = self._pick(logits, temperature, top_k, top_p, gen)
            for i in range(num_samples):
                if done[i]:
                    continue
                t = int(nxt[i])
                tokens[i].append(t)
                logprobs[i].append(float(logp[i, t]))
                if t in stop_ids or (stop_texts and any(s in self.tokenizer.decode(tokens[i]) for s in stop_texts)):
                    done[i], reasons[i] = True, "stop"
            if all(done):
                break
            out = self.model(input_ids=nxt[:, None], past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1].float()
        result["sequences"] = [{"tokens": t, "logprobs": lp, "stop_reason": r}
                               for t, lp, r in zip(tokens, logprobs, reasons)]
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
