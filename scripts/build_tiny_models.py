#!/usr/bin/env python
"""Offline builder of tiny models and toy datasets for tests and demos.

Everything is created locally (no model hub access):

* a byte-level BPE tokenizer trained in memory with a chat template,
* ``student``: a random tiny ``LlamaForCausalLM`` (fast, for tests),
* ``demo_student``: a random, wider student that learns the toy task in about
  200 steps of batch 32 (the demo's before/after comparison),
* ``teacher``: a larger ``LlamaForCausalLM`` briefly pretrained on the toy
  task so that its greedy answers are mostly right,
* ``noisy_teacher``: the teacher with seeded noise on its weight matrices, right on
  about a third of the held-out prompts: a policy GRPO can improve (its groups'
  answers differ in reward, which an always-right or never-right model cannot give),
* ``other_tokenizer_student``: the student architecture paired with a
  *different* (smaller-vocab) tokenizer, used to check that logit
  distillation rejects mismatched tokenizers,
* toy datasets (instruct / dialog / preference / held-out prompts).

Usage::

    python scripts/build_tiny_models.py --out /tmp/tiny_models [--data-out /tmp/toy_data]
    python scripts/build_tiny_models.py --out /tmp/bench_models --size 25m --size 125m   # random, for benchmarks

or from Python::

    from scripts.build_tiny_models import build_tiny_models, make_toy_datasets
    paths = build_tiny_models("/tmp/tiny_models")

Building is idempotent: if every model directory already has a
``config.json`` and the marker file matches :data:`BUILD_VERSION` and the
seed, nothing is rebuilt.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import string
import time
from pathlib import Path

# Bump whenever anything that affects the produced artifacts changes, so that
# cached builds (e.g. in test fixtures) are invalidated.
BUILD_VERSION = "tiny-models-v3"
MARKER_FILE = ".build_marker.json"
MODEL_NAMES = ("student", "teacher", "other_tokenizer_student", "demo_student", "noisy_teacher")
TEACHER_NOISE = 1.2  # relative weight noise of noisy_teacher: held-out exact match 1.0 -> about 0.33

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# The assistant turn ends with the eos token so that SFT learns to stop, and is
# wrapped in {% generation %} so TRL's ``assistant_only_loss`` can build a mask.
# No newline follows the eos, so a completion is exactly "answer</s>" and the
# templated prompt (add_generation_prompt=True) is a prefix of the full chat.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' }}"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Generic English text so the tokenizer is not *only* fit to the toy task.
GENERIC_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model can still learn a
simple task when the data is clean and the task is regular. Please answer the
question briefly and stop when you are done. The teacher knows the answer and
the student tries to imitate the teacher. Distillation transfers knowledge from
a large model to a small one. You are a helpful assistant. What is the answer?
Here is a short story: once upon a time there was a tiny language model that
lived on a laptop. It read sentences, counted letters and reversed words. Every
day it got a little better, and one day it answered every question correctly.
Numbers like one, two, three, 1, 2, 3, 10, 42 and 100 appear in text too.
Machine learning is the study of computer programs that improve with experience.
A language model assigns a probability to every possible next token in a text.
Training minimizes the cross entropy between the model and the data distribution.
The learning rate controls how large each optimization step is, and a schedule
often warms it up and then decays it. Gradient descent follows the slope downhill.
Reinforcement learning from human feedback uses a reward model and a policy.
Direct preference optimization compares a chosen response with a rejected one.
Supervised fine tuning teaches a model to follow instructions from examples.
In the morning the weather was cold and cloudy, but by noon the sun came out.
She walked to the market to buy apples, bread, cheese, milk and fresh flowers.
They played music in the park while children laughed and dogs chased a ball.
He wrote a letter to his friend describing the mountains, rivers and forests.
Good software is tested, documented, and easy to change without breaking things.
Always check the results, measure the time it takes, and report what you found.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday are the days.
January, February, March, April, May, June, July, August, September, October,
November and December are the months of the year. Red, green, blue and yellow.
"""

LETTERS = string.ascii_lowercase
TASK_PREFIX = "reverse:"


# --------------------------------------------------------------------------- #
# Toy data
# --------------------------------------------------------------------------- #
def _reverse_example(rng: random.Random) -> tuple[str, str]:
    """One 'reverse: c a t' -> 't a c' pair (letters space-separated so each
    letter is a single token and the task stays learnable for tiny models)."""
    letters = [rng.choice(LETTERS) for _ in range(rng.randint(3, 5))]
    return f"{TASK_PREFIX} {' '.join(letters)}", " ".join(reversed(letters))


def _sample_unique(rng: random.Random, n: int, exclude: set[str]) -> list[dict]:
    """Sample ``n`` rows whose queries are distinct and not in ``exclude``."""
    rows, seen = [], set(exclude)
    while len(rows) < n:
        query, answer = _reverse_example(rng)
        if query not in seen:
            seen.add(query)
            rows.append({"input_query": query, "expected_answer": answer})
    return rows


def _wrong_answer(rng: random.Random, answer: str) -> str:
    """A plausible but wrong answer: the un-reversed input or a corrupted one."""
    letters = answer.split(" ")
    if rng.random() < 0.5 and letters != letters[::-1]:
        return " ".join(reversed(letters))  # forgot to reverse
    i = rng.randrange(len(letters))
    letters[i] = rng.choice([c for c in LETTERS if c != letters[i]])
    return " ".join(letters)


def to_messages(query: str, answer: str | None = None) -> list[dict]:
    """Chat messages for one toy example (answer omitted for generation)."""
    msgs = [{"role": "user", "content": query}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def make_toy_datasets(seed: int = 0, n_train: int = 200, n_heldout: int = 30) -> dict[str, list[dict]]:
    """Build the toy datasets for the 'reverse the letters' task.

    Returns a dict with keys ``instruct`` (input_query/expected_answer),
    ``dialog`` (messages), ``preference`` (prompt/chosen/rejected) and
    ``heldout_prompts`` (input_query/expected_answer, disjoint from training).
    """
    rng = random.Random(seed)
    heldout = _sample_unique(rng, n_heldout, exclude=set())
    instruct = _sample_unique(rng, n_train, exclude={r["input_query"] for r in heldout})
    dialog = [{"messages": to_messages(r["input_query"], r["expected_answer"])} for r in instruct]
    preference = [
        {
            "prompt": r["input_query"],
            "chosen": r["expected_answer"],
            "rejected": _wrong_answer(rng, r["expected_answer"]),
        }
        for r in instruct
    ]
    return {"instruct": instruct, "dialog": dialog, "preference": preference, "heldout_prompts": heldout}


def write_toy_datasets(data_dir: str | Path, seed: int = 0) -> dict[str, str]:
    """Write the toy datasets as JSONL files and return their paths."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    data = make_toy_datasets(seed)
    files = {"instruct": "instruct.jsonl", "dialog": "dialog.jsonl",
             "preference": "preference.jsonl", "heldout_prompts": "heldout.jsonl"}
    paths = {}
    for key, name in files.items():
        path = data_dir / name
        with path.open("w") as f:
            for row in data[key]:
                f.write(json.dumps(row) + "\n")
        paths[key] = str(path)
    return paths


# --------------------------------------------------------------------------- #
# Tokenizer
# --------------------------------------------------------------------------- #
def _tokenizer_corpus(seed: int) -> list[str]:
    """Texts the BPE is trained on: templated toy chats plus generic English."""
    rng = random.Random(seed + 1)
    chats = [f"<|user|>\n{q}\n<|assistant|>\n{a}" for q, a in (_reverse_example(rng) for _ in range(500))]
    return chats + GENERIC_TEXT.splitlines()


def build_tokenizer(vocab_size: int = 768, seed: int = 0):
    """Train a byte-level BPE tokenizer and wrap it in PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = [PAD, BOS, EOS, UNK, *ROLE_TOKENS]
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=special,
        # Full byte alphabet, so any text is encodable and unk never appears.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
        model_max_length=512,
    )


# --------------------------------------------------------------------------- #
# Models
# --------------------------------------------------------------------------- #
STUDENT_ARCH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
# Hidden 64 (head dim 16) stays near 0% held-out exact match after 600 steps of batch 32; hidden 128 reaches
# 50% after 100 steps and 100% after 200 (AdamW at 3e-3, answer-only loss, fresh rows each step).
DEMO_STUDENT_ARCH = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
TEACHER_ARCH = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2)


# Benchmark sizes (random init): real vocabularies make the LM head a real share of the work, so these use
# a 32,000-row vocabulary (the tokenizer uses the first 768 rows). Parameters: about 25M, 125M and 0.5B.
SIZED_ARCH = {
    "25m": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=32000),
    "125m": dict(hidden_size=768, intermediate_size=1792, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=32000),
    "500m": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=8, vocab_size=32000),
}


def make_model(tokenizer, arch: dict, seed: int, max_positions: int = 512):
    """A randomly initialised LlamaForCausalLM sized for ``tokenizer`` (or ``arch["vocab_size"]``)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    arch = {"vocab_size": len(tokenizer), **arch}
    config = LlamaConfig(max_position_embeddings=max_positions, tie_word_embeddings=False, **arch, **ids)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Explicit generation config: greedy by default so demos are deterministic.
    model.generation_config = GenerationConfig(do_sample=False, max_new_tokens=16, **ids)
    return model


def _encode_chats(tokenizer, pairs: list[tuple[str, str]]):
    """Chat-templated, right-padded batch whose labels cover only the answer.

    The labels come from the template's ``{% generation %}`` mask (answer
    tokens plus the closing eos), i.e. the same mask TRL's assistant-only loss
    uses.
    """
    import torch

    encs = [tokenizer.apply_chat_template(to_messages(q, a), return_dict=True,
                                          return_assistant_tokens_mask=True) for q, a in pairs]
    width = max(len(e["input_ids"]) for e in encs)
    input_ids = torch.full((len(encs), width), tokenizer.pad_token_id)
    labels = torch.full((len(encs), width), -100)
    attention_mask = torch.zeros((len(encs), width), dtype=torch.long)
    for i, e in enumerate(encs):
        ids, n = torch.tensor(e["input_ids"]), len(e["input_ids"])
        input_ids[i, :n] = ids
        attention_mask[i, :n] = 1
        labels[i, :n] = ids.masked_fill(torch.tensor(e["assistant_masks"]) == 0, -100)
    return input_ids, attention_mask, labels


def pretrain_teacher(model, tokenizer, exclude: set[str], seed: int,
                     steps: int = 300, batch_size: int = 32, lr: float = 3e-3) -> None:
    """Quick next-token pretraining of ``model`` on freshly sampled toy chats.

    Examples come from the same generator as the toy data but never include
    the held-out prompts, so held-out accuracy is a fair check. The loss is
    next-token cross-entropy on the answer tokens only: the prompt letters are
    uniformly random, and with them in the loss 300 steps are not enough to
    learn the task (tried: held-out accuracy stayed at 0%).
    """
    import torch

    rng = random.Random(seed + 2)
    pool = []
    while len(pool) < steps * batch_size:
        query, answer = _reverse_example(rng)
        if query not in exclude:
            pool.append((query, answer))
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        batch = pool[step * batch_size:(step + 1) * batch_size]
        input_ids, attention_mask, labels = _encode_chats(tokenizer, batch)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"  teacher step {step:3d}  loss {loss.item():.3f}")
    model.eval()


def greedy_answers(model, tokenizer, queries: list[str], max_new_tokens: int = 16) -> list[str]:
    """Greedy chat completions for ``queries`` (batched, left padding)."""
    import torch

    prompts = [tokenizer.apply_chat_template(to_messages(q), tokenize=False, add_generation_prompt=True)
               for q in queries]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation needs left padding
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return [a.strip() for a in tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]


def answer_accuracy(model, tokenizer, rows: list[dict]) -> float:
    """Exact-match accuracy of greedy answers on ``rows`` (input_query/expected_answer)."""
    answers = greedy_answers(model, tokenizer, [r["input_query"] for r in rows])
    return sum(a == r["expected_answer"] for a, r in zip(answers, rows)) / max(len(rows), 1)


# --------------------------------------------------------------------------- #
# Build / cache / verify
# --------------------------------------------------------------------------- #
def _is_built(out_dir: Path, seed: int) -> bool:
    """True when a complete build for this version and seed is already there."""
    marker = out_dir / MARKER_FILE
    try:
        if json.loads(marker.read_text()) != {"version": BUILD_VERSION, "seed": seed}:
            return False
    except (OSError, ValueError):
        return False
    needed = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return all((out_dir / name / f).is_file() for name in MODEL_NAMES for f in needed)


class _BuildLock:
    """Exclusive file lock so parallel test workers do not build concurrently."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.file = self.path.open("w")
        try:
            import fcntl
            fcntl.flock(self.file, fcntl.LOCK_EX)
        except ImportError:  # non-POSIX: no locking, the marker still guards reuse
            pass
        return self

    def __exit__(self, *exc):
        self.file.close()  # closing releases the lock


def add_weight_noise(model, relative: float, seed: int) -> None:
    """Seeded Gaussian noise on every weight matrix, scaled by `relative` x that matrix's std (in place)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * relative * p.std())


def _build(out_dir: Path, seed: int) -> None:
    """Train tokenizers, create/pretrain models and save everything."""
    import torch

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(vocab_size=768, seed=seed)
    other_tokenizer = build_tokenizer(vocab_size=300, seed=seed)
    print(f"tokenizers: vocab {len(tokenizer)} / other {len(other_tokenizer)} ({time.perf_counter() - t0:.1f}s)")

    heldout = make_toy_datasets(seed)["heldout_prompts"]
    teacher = make_model(tokenizer, TEACHER_ARCH, seed)
    t1 = time.perf_counter()
    pretrain_teacher(teacher, tokenizer, exclude={r["input_query"] for r in heldout}, seed=seed)
    print(f"teacher pretraining: {time.perf_counter() - t1:.1f}s")

    noisy_teacher = copy.deepcopy(teacher)
    add_weight_noise(noisy_teacher, TEACHER_NOISE, seed)
    models = {
        "student": (make_model(tokenizer, STUDENT_ARCH, seed), tokenizer),
        "teacher": (teacher, tokenizer),
        "other_tokenizer_student": (make_model(other_tokenizer, STUDENT_ARCH, seed), other_tokenizer),
        "demo_student": (make_model(tokenizer, DEMO_STUDENT_ARCH, seed), tokenizer),
        "noisy_teacher": (noisy_teacher, tokenizer),
    }
    for name, (model, tok) in models.items():
        model.save_pretrained(out_dir / name)
        tok.save_pretrained(out_dir / name)


def verify_tiny_models(paths: dict[str, str], heldout: list[dict], n_eval: int = 20) -> dict[str, float]:
    """Reload every saved model with the Auto classes, generate from a chat
    prompt, and return greedy exact-match accuracy on ``heldout[:n_eval]``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    accuracy = {}
    for name, path in paths.items():
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        sample = greedy_answers(model, tok, [heldout[0]["input_query"]])[0]
        accuracy[name] = answer_accuracy(model, tok, heldout[:n_eval])
        print(f"  {name:24s} vocab {len(tok):4d}  params {model.num_parameters():>8,d}  "
              f"heldout acc {accuracy[name]:.0%}  sample {heldout[0]['input_query']!r} -> {sample!r}")
    return accuracy


@contextlib.contextmanager
def _no_progress_bars():
    """Without transformers' per-file bars ("Writing model shards", "Loading weights"): this build prints
    one line per model instead. Restores the caller's setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def build_tiny_models(out_dir: str | Path, seed: int = 0) -> dict[str, str]:
    """Build (or reuse) the tiny models under ``out_dir``.

    Returns ``{name: path}`` for each of :data:`MODEL_NAMES`.
    Reuses an existing build when its marker matches :data:`BUILD_VERSION` and
    ``seed``; otherwise builds (~15-20 s on 2 CPU cores), verifies the saved
    models by reloading them, and writes the marker last so an interrupted
    build is never mistaken for a complete one.
    """
    out_dir = Path(out_dir)
    paths = {name: str(out_dir / name) for name in MODEL_NAMES}
    if _is_built(out_dir, seed):
        return paths
    out_dir.mkdir(parents=True, exist_ok=True)
    with _BuildLock(out_dir / ".build.lock"):
        if _is_built(out_dir, seed):  # another process finished while we waited
            return paths
        (out_dir / MARKER_FILE).unlink(missing_ok=True)
        with _no_progress_bars():
            _build(out_dir, seed)
            verify_tiny_models(paths, make_toy_datasets(seed)["heldout_prompts"])
        (out_dir / MARKER_FILE).write_text(json.dumps({"version": BUILD_VERSION, "seed": seed}))
    return paths


def build_sized_model(out_dir: str | Path, size: str, seed: int = 0, dtype: str = "float32",
                      max_positions: int = 4096) -> str:
    """A random Llama of a benchmark size (``SIZED_ARCH``) with the tiny tokenizer, saved to ``out_dir/size``
    (reused when already there). Returns the model directory."""
    import torch

    path = Path(out_dir) / size
    marker = path / MARKER_FILE
    want = {"version": BUILD_VERSION, "seed": seed, "size": size, "dtype": dtype}
    try:
        if json.loads(marker.read_text()) == want:
            return str(path)
    except (OSError, ValueError):
        pass
    tokenizer = build_tokenizer(vocab_size=768, seed=seed)
    tokenizer.model_max_length = max_positions
    model = make_model(tokenizer, SIZED_ARCH[size], seed, max_positions=max_positions).to(getattr(torch, dtype))
    with _no_progress_bars():
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    marker.write_text(json.dumps(want))
    print(f"{size}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters -> {path}")
    return str(path)


def _dir_size(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="directory for the tiny models")
    parser.add_argument("--data-out", help="directory for the toy JSONL datasets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", action="append", choices=sorted(SIZED_ARCH),
                        help="also build a random Llama of this size under --out/SIZE (repeatable)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights of the --size models as saved")
    args = parser.parse_args(argv)
    # CLI only (library callers keep their settings): never touch the hub, and
    # keep the output readable without per-shard progress bars.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not args.out and not args.data_out:
        parser.error("give --out and/or --data-out")

    if args.out and args.size:
        for size in args.size:
            build_sized_model(args.out, size, seed=args.seed, dtype=args.dtype)
    elif args.out:
        start = time.perf_counter()
        paths = build_tiny_models(args.out, seed=args.seed)
        print(f"models ready in {time.perf_counter() - start:.1f}s")
        for name, path in paths.items():
            print(f"{name}: {path} ({_dir_size(path) / 1e6:.2f} MB)")
    if args.data_out:
        for name, path in write_toy_datasets(args.data_out, seed=args.seed).items():
            print(f"{name}: {path}")


if __name__ == "__main__":
    main()
