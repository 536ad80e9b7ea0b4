"""Shared parts of the speed and memory benchmarks: models, long-tailed data, the measured matmul peak,
token and FLOP accounting, and a table printer. Not a benchmark itself."""

from __future__ import annotations

import json
import math
import os
import random
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `scripts.build_tiny_models` and, if not installed, `providers`

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "a", "small", "model", "can", "still", "learn", "simple", "task", "when", "data", "is", "clean", "teacher", "knows", "answer", "student", "tries", "imitate", "distillation", "transfers", "knowledge", "from", "large", "one", "please", "question", "briefly", "stop", "done", "reverse", "letters", "count", "numbers", "one", "two", "three", "ten", "forty", "two", "hundred"]


def load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} CPUs"


def sized_model(size: str, models_dir: str, dtype: str = "float32") -> str:
    from scripts.build_tiny_models import build_sized_model

    return build_sized_model(models_dir, size, dtype=dtype)


def long_tailed_lengths(n: int, max_tokens: int, seed: int, median: float = 40.0, sigma: float = 1.0) -> list[int]:
    """Token lengths from a log-normal: many short, a tail up to max_tokens (clipped)."""
    rng = random.Random(seed)
    return [max(2, min(max_tokens, int(rng.lognormvariate(math.log(median), sigma)))) for _ in range(n)]


def text_of(n_words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def longtail_rows(n: int, max_seq_len: int, kind: str = "completion", seed: int = 0) -> list[dict]:
    """Normalized rows (prompt/completion or prompt/chosen/rejected messages) whose prompt and answer
    lengths are long-tailed: median prompt ~40 tokens, answer ~60, some near max_seq_len. A word of this
    vocabulary is about 1.3 tokens of the tiny BPE tokenizer."""
    rng = random.Random(seed)
    prompts = long_tailed_lengths(n, max_seq_len // 2, seed, median=30)
    answers = long_tailed_lengths(n, max_seq_len // 2, seed + 1, median=45)
    rows = []
    for p, a in zip(prompts, answers):
        prompt = [{"role": "user", "content": text_of(p, rng)}]
        if kind == "preference":
            rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": text_of(a, rng)}],
                         "rejected": [{"role": "assistant", "content": text_of(a, rng)}]})
        else:
            rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": text_of(a, rng)}]})
    return rows


def matmul_peak_gflops(threads: int, n: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """The best fp32 GFLOP/s of an n x n matmul with `threads` torch threads (the MFU denominator), per
    wall-clock second and per CPU second of this process (on a shared machine the CPU-time figure is the
    one other load cannot distort; with 1 thread it is the single core's peak)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    wall = cpu = 0.0
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        wall = max(wall, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
        cpu = max(cpu, 2 * n**3 / max(1e-9, time.process_time() - c0) / 1e9 * threads)
    return wall, cpu


def matmul_params(model) -> int:
    """Parameters that take part in matmuls: all but the input embedding (a lookup). 6 x this x tokens is
    the FLOPs of a training step (forward 2, backward 4), the usual MFU numerator (attention excluded)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = base.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in base.parameters()) - emb


class TokenCounter:
    """Counts the tokens every decoder forward processes, split into forwards with and without gradient
    (DPO's reference pass has none), by wrapping LlamaModel.forward. Padding-free batches have no attention
    mask: every position is a token."""

    def __init__(self):
        from transformers.models.llama import modeling_llama

        self.cls = modeling_llama.LlamaModel
        self.original = self.cls.forward
        self.grad_tokens = 0
        self.nograd_tokens = 0
        self.padded_positions = 0
        counter = self

        def forward(module, input_ids=None, attention_mask=None, *args, **kw):
            import torch

            if input_ids is not None:
                real = int(attention_mask.sum()) if attention_mask is not None and attention_mask.dim() == 2 \
                    else input_ids.numel()
                counter.padded_positions += input_ids.numel()
                if torch.is_grad_enabled():
                    counter.grad_tokens += real
                else:
                    counter.nograd_tokens += real
            return counter.original(module, input_ids, attention_mask, *args, **kw)

        self.cls.forward = forward

    def reset(self) -> None:
        self.grad_tokens = self.nograd_tokens = self.padded_positions = 0

    def close(self) -> None:
        self.cls.forward = self.original


def step_timer():
    """A TrainerCallback recording time at every step end (the first step, with its warm-up, is left out
    of rates), and the token counts at those times."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[float, int, int]] = []
            self.counter: TokenCounter | None = None

        def on_step_end(self, args, state, control, **kw):
            c = self.counter
            self.marks.append((time.perf_counter(), time.process_time(), c.grad_tokens if c else 0,
                               c.nograd_tokens if c else 0))

        def rate(self, clock: str = "cpu") -> tuple[float, float, float, int]:
            """(seconds per step, grad tokens/s, no-grad tokens/s, steps) after the first step, by the
            process's CPU time (divided by the thread count: seconds of the whole core set) or wall time."""
            if len(self.marks) < 2:
                return float("nan"), float("nan"), float("nan"), 0
            (w0, c0, g0, n0), (w1, c1, g1, n1) = self.marks[0], self.marks[-1]
            import torch

            span = (c1 - c0) / torch.get_num_threads() if clock == "cpu" else w1 - w0
            steps = len(self.marks) - 1
            return span / steps, (g1 - g0) / span, (n1 - n0) / span, steps

    return StepTimer()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(xs):
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.median(xs) if xs else float("nan")


def print_table(title: str, header: list[str], rows: list[list], note: str = "") -> None:
    cells = [[str(c) for c in header]] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(cells[0], widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    if note:
        print(note)
    sys.stdout.flush()


def emit_json(obj) -> None:
    """One result line for a parent process (`RESULT {...}`)."""
    print("RESULT " + json.dumps(obj), flush=True)
