"""Your own training loop through the official `tinker` SDK against the training service's Tinker API: a
supervised loop (the loss falls) and an RL loop with `importance_sampling` (the reward rises).

    trl-fsdp-service --api-keys-file keys.yaml --model-dir /models     # a user whose key starts with tml-
    python examples/tinker_loop.py --url http://127.0.0.1:8322 --key tml-... --model student

The RL task needs no dataset: the reward of a sample is the fraction of its tokens whose id is below
--target-below (a fifth of the tiny test model's 768-token vocabulary starts near 0.2). tests/test_tinker_api.py
runs rl_loop to hold that the reward rises.
"""

from __future__ import annotations

import argparse

import numpy as np
import tinker
from tinker import types

TEXT = "The cat sat on the mat."


def supervised_loop(training: tinker.TrainingClient, steps: int = 20, learning_rate: float = 5e-3) -> list[float]:
    """Memorise TEXT's second half given its first: the cross-entropy (a sum over the weighted tokens) per step."""
    ids = training.get_tokenizer().encode(TEXT)[:8]
    half = len(ids) // 2
    datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),  # position i predicts token i+1
                        loss_fn_inputs={"target_tokens": ids[1:],
                                        "weights": [0.0] * (half - 1) + [1.0] * (len(ids) - half)})
    losses = []
    for _ in range(steps):
        result = training.forward_backward([datum], "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=learning_rate)).result()
        losses.append(result.metrics["loss:sum"])
    return losses


def rl_loop(training: tinker.TrainingClient, steps: int = 14, groups: int = 2, group_size: int = 16,
            max_tokens: int = 4, target_below: int = 150, learning_rate: float = 2e-2) -> list[float]:
    """Sample groups from the current weights, reward each sample, centre the rewards in its group (the
    advantages), and take an `importance_sampling` step on the sampled tokens: the mean reward per step."""
    prompt = training.get_tokenizer().encode(TEXT)[:4]
    means = []
    for step in range(steps):
        sampler = training.save_weights_and_get_sampling_client().result()  # this step's weights, no file
        futures = [sampler.sample(types.ModelInput.from_ints(prompt), group_size,
                                  types.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=step * groups + g))
                   for g in range(groups)]
        data, rewards = [], []
        for future in futures:
            sequences = future.result().sequences
            reward = np.array([np.mean(np.array(s.tokens) < target_below) for s in sequences])
            rewards.extend(reward)
            for s, advantage in zip(sequences, reward - reward.mean()):
                pad = [0.0] * (len(prompt) - 1)  # the prompt's positions: no advantage, no loss
                data.append(types.Datum(
                    model_input=types.ModelInput.from_ints(prompt + s.tokens[:-1]),
                    loss_fn_inputs={"target_tokens": prompt[1:] + s.tokens,
                                    "logprobs": pad + list(s.logprobs),  # the sampler's: the importance weights' base
                                    "advantages": pad + [float(advantage)] * len(s.tokens)}))
        training.forward_backward(data, "importance_sampling").result()
        training.optim_step(types.AdamParams(learning_rate=learning_rate)).result()
        means.append(float(np.mean(rewards)))
    return means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8322", help="the training service")
    parser.add_argument("--key", required=True, help="your API key (tml-...)")
    parser.add_argument("--model", required=True, help="a base model the service knows (name under --model-dir, "
                        "an allowed path, a cached hub id)")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    service = tinker.ServiceClient(base_url=args.url, api_key=args.key)

    training = service.create_lora_training_client(base_model=args.model, rank=args.rank, seed=0).result()
    for step, loss in enumerate(supervised_loop(training)):
        print(f"supervised step {step:2d}  loss {loss:8.3f}")
    print("saved:", training.save_state("supervised").result().path)

    training = service.create_lora_training_client(base_model=args.model, rank=args.rank, seed=0).result()
    for step, reward in enumerate(rl_loop(training)):
        print(f"rl step {step:2d}  mean reward {reward:.3f}")
    print("saved:", training.save_state("rl").result().path)


if __name__ == "__main__":
    main()
