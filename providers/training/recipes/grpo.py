"""Group relative policy optimization on TRL's GRPOTrainer, with the job's graders as rewards.

setup: tokenizer, policy, prompts (each row's other columns kept: the graders read them as `item`),
GRPOConfig -> train -> save_final.
Each step samples `num_generations` answers per prompt (the model's own `generate`; vLLM colocated on a GPU
when asked and installed), scores them with the graders, and pushes up the answers that beat their group's
mean. With beta > 0 the loss adds KL to the reference: under PEFT the base with adapters disabled, otherwise a
frozen copy TRL loads; with beta = 0 there is no reference at all.
TRL logs reward, reward_std, rewards/<grader>/mean and /std, kl (beta > 0), completions/mean_length,
completions/clipped_ratio and clip_ratio/*: the run reporter writes every logged key to metrics.jsonl.
"""

from __future__ import annotations

import zlib

import torch
from transformers import LogitsProcessor
from trl import GRPOConfig, GRPOTrainer

from ...graders import reward_functions
from ..components import (callbacks, eval_slice, load_model, load_tokenizer, peft_config, train_and_save,
                          trainer_args)
from ..data import load_dataset
from ..efficiency import check_vllm
from ..run_files import RunFiles
from ..spec import JobSpec


def grpo_config(spec: JobSpec, num_rows: int) -> GRPOConfig:
    g = spec.grpo
    args = trainer_args(spec, num_rows, has_eval=spec.data.validation_file is not None)
    # data.batch_size counts prompts; TRL's per-device batch counts completions (num_generations per prompt)
    args["per_device_train_batch_size"] = args["per_device_eval_batch_size"] = spec.data.batch_size * g.num_generations
    args.pop("train_sampling_strategy")  # GRPO's own sampler repeats each prompt num_generations times
    return GRPOConfig(
        **args,
        shuffle_dataset=spec.data.shuffle,
        num_generations=g.num_generations,
        max_completion_length=g.max_completion_length,
        temperature=g.temperature,
        beta=g.beta,
        loss_type=g.loss_type,
        scale_rewards=g.scale_rewards,
        epsilon=g.epsilon,
        num_iterations=g.num_iterations,
        use_vllm=g.use_vllm,
        vllm_mode="colocate",
    )


class RowKeyedSampler(LogitsProcessor):
    """Sampling as a function of (seed, step, the row's tokens so far, its place in its group) only: Gumbel-max
    with noise drawn from a generator seeded by those, so a prompt gets the same answers whatever batch or rank
    it is generated in (as vLLM's per-request seeds). Applied before TRL's temperature warper, it samples from
    softmax(scores / temperature) itself and leaves one token possible."""

    def __init__(self, seed: int, temperature: float, group: int, pad_token_id: int):
        self.seed, self.temperature, self.group, self.pad = seed, temperature, group, pad_token_id
        self.step = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        chosen = []
        for row, (ids, logits) in enumerate(zip(input_ids.tolist(), scores)):
            start = next((i for i, t in enumerate(ids) if t != self.pad), len(ids))  # left padding
            key = f"{self.seed}:{self.step}:{row % self.group}:{ids[start:]}".encode()
            gen = torch.Generator().manual_seed(zlib.crc32(key))
            u = torch.rand(logits.shape, generator=gen, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
            chosen.append(int(torch.argmax(logits.double() / self.temperature - torch.log(-torch.log(u)))))
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(chosen)), torch.tensor(chosen, device=scores.device)] = 0.0
        return out


class RowKeyedGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose sampling is RowKeyedSampler's: the same samples on 1 rank or N (tests, audits)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.row_sampler = RowKeyedSampler(self.args.seed, self.temperature, self.num_generations,
                                           self.processing_class.pad_token_id)
        policy = self.model
        policy.generate = lambda *a, _generate=policy.generate, **kw: _generate(
            *a, logits_processor=[self.row_sampler], **kw)

    def _generate_single_turn(self, *args, **kwargs):
        self.row_sampler.step = self.state.global_step
        return super()._generate_single_turn(*args, **kwargs)


def train(spec: JobSpec, files: RunFiles) -> dict:
    if spec.grpo.use_vllm:  # checked by the API too; a job placed on another node checks its own host here
        check_vllm()
    tokenizer = load_tokenizer(spec.model)
    model = load_model(spec.model, spec)
    train_ds = load_dataset(spec.data.train_file)
    # held-out prompts: graded as the training ones (eval_reward, eval_rewards/NAME/mean) every eval_steps
    val_ds = load_dataset(spec.data.validation_file) if spec.data.validation_file else None
    reporter, cbs = callbacks(spec, files, tokenizer)
    trainer_cls = RowKeyedGRPOTrainer if spec.grpo.row_keyed_sampling else GRPOTrainer
    trainer = trainer_cls(
        model=model,
        reward_funcs=reward_functions(spec.grpo.graders),
        args=grpo_config(spec, len(train_ds)),
        train_dataset=train_ds,
        eval_dataset=eval_slice(train_ds, val_ds, spec) if val_ds is not None else None,
        processing_class=tokenizer,
        peft_config=peft_config(spec.peft) if spec.peft else None,
        callbacks=cbs,
    )
    return train_and_save(trainer, spec, files, reporter)
