"""What the Tinker API's requests carry into the models (model.py) and what the wire (wire.py) and the routes
check against, without torch: the service imports these at start; model.py, which imports torch, is imported
by a base's worker process (process.py) only."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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


@dataclass(frozen=True)
class LogprobRequest:
    """What a sample returns beyond each sampled token's logprob: the prompt's logprobs, and the top-k
    tokens (ids and logprobs) at each prompt position and at each sampled position (0: none)."""
    prompt: bool = False
    topk_prompt: int = 0
    topk_sample: int = 0


RL_INPUTS = ("target_tokens", "logprobs", "advantages")
# The losses forward_backward takes (model.LOSSES computes them) -> the loss_fn_inputs each needs
LOSS_INPUTS: dict[str, tuple[str, ...]] = {
    "cross_entropy": ("target_tokens",),
    "importance_sampling": RL_INPUTS,
    "ppo": RL_INPUTS,
    "cispo": RL_INPUTS,
    "dro": RL_INPUTS,
}
