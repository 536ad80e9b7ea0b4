#!/usr/bin/env python
"""Benchmark: the Tinker API's costs, through the official `tinker` SDK, against the same work in-process.

Starts `python -m providers.remote_fsdp.service.app` on a free 127.0.0.1 port (its own data dir, one user
with a `tml-` key) and drives it with the SDK, as a user's own loop would. Three parts:

1. Training step. `forward_backward` (cross_entropy) + `optim_step` through the API, against the same LoRA
   step in this process as a batch job takes it: the same model (fp32), the same LoRA (rank, alpha 32, every
   linear layer as Tinker's default: attention, MLP, unembedding; the same init seed), the same batch of
   `--batch` datums of `--seq-len` random tokens, the same loss (the weighted sum of token cross-entropies),
   backward, and AdamW with the SDK's `AdamParams` (fused AdamW, the training core's default). The API side
   submits `optim_step` right behind `forward_backward` and then waits for both, as the SDK's docs and the
   cookbook's loops do. Both sides run `--threads` torch threads (default 1). Blocks of
   `--steps` steps alternate (in-process, API, in-process, ...) `--repeats` times after one warm-up step
   each; the median seconds per step of each side and their ratio (the issue's target: <= 1.15x). CPU
   seconds per step are reported too (the service's, from /proc: its process and its base's worker process,
   against this process's): on a
   shared machine they are the figure other load distorts least. Both sides' losses are printed: the same
   step gives the same losses. The API's CPU seconds are the service's and the SDK's together.
2. Sampling. `sample` (the SDK's `asample`) of `--samples` sequences of exactly `--max-tokens` tokens at
   temperature 1 (no stop token) from the trained weights (`save_weights_and_get_sampling_client`), against
   transformers' `generate` on the in-process model with the same prompt, count and length: tokens/s each.
3. Per-request overhead of the futures round trip: an `optim_step` with no gradients and a `forward` of one
   4-token datum, timed end to end through the SDK (submit, long-poll `retrieve_future`, decode), against
   the same computation in-process; the difference is what a request costs beyond its compute.

Usage (from the repository root, venv active):

    python benchmarks/bench_tinker.py                  # the tiny test student (0.17M parameters), ~1-2 min
    python benchmarks/bench_tinker.py --size 25m --batch 4 --seq-len 128 --steps 3   # a 25M Llama

This is a benchmark, not a test: it asserts nothing. The service is stopped (its process group killed) at
the end, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_common as bc  # sets the offline environment, puts the repository on sys.path

KEY = "tml-bench-0123456789abcdef"
LORA_ALPHA = 32  # Tinker's fixed LoRA alpha (the service's too)


# -- the service ----------------------------------------------------------------------------------------------
def start_service(work: Path, models_root: str, threads: int) -> tuple[subprocess.Popen, str]:
    """The service on a free port, one user (KEY), its torch threads set; returns once /health answers."""
    import httpx
    import yaml

    keys = work / "keys.yaml"
    keys.write_text(yaml.safe_dump({"users": [{"name": "bench", "role": "member",
                                               "key_sha256": hashlib.sha256(KEY.encode()).hexdigest()}]}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(work / "service.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "providers.remote_fsdp.service.app", "--port", str(port),
                                 "--data-dir", str(work / "data"), "--api-keys-file", str(keys),
                                 "--allowed-model-root", models_root],
                                cwd=bc.REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the service exited ({proc.returncode}); see {work / 'service.log'}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_service(proc)
    sys.exit(f"the service did not answer /health in 180 s; see {work / 'service.log'}")


def stop_service(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def service_cpu_seconds(pid: int, data_dir: Path) -> float:
    """CPU seconds of the service (process `pid`) and of its Tinker bases' worker processes (their command lines
    name its data dir), where the training steps run."""
    total = cpu_seconds(pid)
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace") if entry.name.isdigit() else ""
            if "providers.tinker_api.process" in cmdline and str(data_dir) in cmdline:
                total += cpu_seconds(int(entry.name))
        except OSError:  # gone meanwhile
            continue
    return total


# -- the in-process side: the same LoRA step as a batch job takes it -------------------------------------------
class LocalLora:
    """The model with the same LoRA as the service builds (rank, alpha, every linear layer, init seed)."""

    def __init__(self, path: str, rank: int, seed: int, adam: dict):
        import peft
        import torch

        from providers.training.components import load_model

        model = load_model(path)
        targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear)})
        torch.manual_seed(seed)
        self.model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                                                target_modules=targets, task_type="CAUSAL_LM"))
        self.model.eval()  # no dropout, as the service's
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=adam["learning_rate"], betas=(adam["beta1"], adam["beta2"]),
                                           eps=adam["eps"], weight_decay=adam["weight_decay"], fused=True)

    def step(self, ids, targets, weights) -> float:
        import torch.nn.functional as F

        logits = self.model(input_ids=ids).logits.float()
        loss = (F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none") * weights.flatten()).sum()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def timed_block(step, n: int, service_cpu) -> tuple[list[float], float, float, list[float]]:
    """n calls of step(): their wall seconds, the CPU seconds per call of this process and of the service
    (`service_cpu()`; 0 without one), and the losses."""
    walls, losses = [], []
    c0, s0 = time.process_time(), service_cpu() if service_cpu else 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        losses.append(step())
        walls.append(time.perf_counter() - t0)
    c1, s1 = time.process_time(), service_cpu() if service_cpu else 0.0
    return walls, (c1 - c0) / n, (s1 - s0) / n, losses


def median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", default=None, help="where the model is built if missing (default: "
                        "$TRL_TEST_MODELS_DIR or /tmp/tiny-models; with --size, /tmp/bench_models)")
    parser.add_argument("--size", default=None, help="a sized random Llama (25m, 125m) instead of the tiny student")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=3, help="alternating blocks of each side")
    parser.add_argument("--samples", type=int, default=8, help="sequences per sample request")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per sampled sequence")
    parser.add_argument("--trivial", type=int, default=20, help="trivial requests timed (part 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, of the service and of this process "
                        "(1: CPU seconds per step stay meaningful on a loaded machine)")
    args = parser.parse_args()

    import numpy as np
    import tinker
    import torch
    from tinker import types

    torch.set_num_threads(args.threads)

    if args.size:
        model_path = bc.sized_model(args.size, args.models_dir or "/tmp/bench_models")
    else:
        from scripts.build_tiny_models import build_tiny_models

        model_path = build_tiny_models(args.models_dir or os.environ.get("TRL_TEST_MODELS_DIR", "/tmp/tiny-models"))[
            "student"]
    models_root = str(Path(model_path).parent)
    adam = dict(learning_rate=1e-3, beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.0)
    print(f"model {model_path}; batch {args.batch} x {args.seq_len} tokens, LoRA rank {args.rank}; "
          f"torch threads {torch.get_num_threads()}; {bc.load_average()}", flush=True)

    local = LocalLora(model_path, args.rank, seed=0, adam=adam)
    vocab = local.model.get_output_embeddings().weight.shape[0]
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, size=(args.batch, args.seq_len + 1))
    ids, targets = torch.from_numpy(tokens[:, :-1]), torch.from_numpy(tokens[:, 1:])
    weights = torch.ones(args.batch, args.seq_len)
    data = [types.Datum(model_input=types.ModelInput.from_ints(t[:-1].tolist()),
                        loss_fn_inputs={"target_tokens": t[1:].tolist(), "weights": [1.0] * args.seq_len})
                for t in tokens]

    with tempfile.TemporaryDirectory(prefix="bench_tinker_") as tmp:
        proc, url = start_service(Path(tmp), models_root, args.threads)
        try:
            client = tinker.ServiceClient(base_url=url, api_key=KEY)
            t0 = time.perf_counter()
            training = client.create_lora_training_client(base_model=model_path, rank=args.rank, seed=0).result()
            print(f"service {url}; create_lora_training_client {time.perf_counter() - t0:.2f} s", flush=True)

            def api_step() -> float:
                fb = training.forward_backward(data, "cross_entropy")
                opt = training.optim_step(types.AdamParams(**adam))
                loss = fb.result().metrics["loss:sum"]
                opt.result()
                return loss

            def local_step() -> float:
                return local.step(ids, targets, weights)

            # -- 1. training step ----------------------------------------------------------------------------
            local_loss, api_loss = [local_step()], [api_step()]  # warm-up: first-call costs, not counted
            walls = {"in-process": [], "API": []}
            cpus = {"in-process": [], "API": []}  # (this process, the service) per step, per block
            service = lambda: service_cpu_seconds(proc.pid, Path(tmp) / "data")  # noqa: E731
            for _ in range(args.repeats):
                for side, step, cpu_of in (("in-process", local_step, None), ("API", api_step, service)):
                    w, here, there, losses = timed_block(step, args.steps, cpu_of)
                    walls[side] += w
                    cpus[side].append((here, there))
                    (local_loss if cpu_of is None else api_loss).extend(losses)
            ms = {side: median_ms(w) for side, w in walls.items()}
            cpu = {side: statistics.median(a + b for a, b in c) * 1000 for side, c in cpus.items()}
            api_service = statistics.median(b for _, b in cpus["API"]) * 1000
            api_sdk = statistics.median(a for a, _ in cpus["API"]) * 1000
            bc.print_table(
                f"1. forward_backward + optim_step, batch {args.batch} x {args.seq_len}, LoRA rank {args.rank} "
                f"({len(walls['API'])} steps each, {args.repeats} alternating blocks)",
                ["side", "wall ms/step (median)", "CPU ms/step", "vs in-process (wall)", "vs in-process (CPU)"],
                [[side, round(ms[side]), round(cpu[side]), f"{ms[side] / ms['in-process']:.2f}x",
                  f"{cpu[side] / cpu['in-process']:.2f}x"] for side in ms]
                + [["API: the service only", "", round(api_service), "", f"{api_service / cpu['in-process']:.2f}x"],
                   ["API: the SDK only", "", round(api_sdk), "", ""]],
                note=f"CPU ms/step: medians over blocks; the API's is the service's (its process and its base's worker "
                     f"process) plus this process's (the SDK's). Losses (the same step gives the same loss):\n"
                     f"  in-process {[round(x, 2) for x in local_loss[:6]]} ...\n"
                     f"  API        {[round(x, 2) for x in api_loss[:6]]} ...")

            # -- 2. sampling ---------------------------------------------------------------------------------
            sampler = training.save_weights_and_get_sampling_client().result()
            prompt = tokens[0, :16].tolist()
            params = dict(max_tokens=args.max_tokens, temperature=1.0)

            def api_sample(seed: int) -> int:
                out = sampler.sample(types.ModelInput.from_ints(prompt), args.samples,
                                     types.SamplingParams(seed=seed, **params)).result()
                return sum(len(s.tokens) for s in out.sequences)

            @torch.no_grad()
            def local_sample(seed: int) -> int:
                torch.manual_seed(seed)
                out = local.model.generate(input_ids=torch.tensor([prompt] * args.samples), do_sample=True,
                                           temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.max_tokens,
                                           min_new_tokens=args.max_tokens, pad_token_id=0)
                return (out.shape[1] - len(prompt)) * args.samples

            api_sample(0), local_sample(0)  # warm-up
            rates = {"in-process (generate)": [], "API (asample)": []}
            for r in range(args.repeats):
                for side, fn in (("in-process (generate)", local_sample), ("API (asample)", api_sample)):
                    t0 = time.perf_counter()
                    n = fn(r + 1)
                    rates[side].append(n / (time.perf_counter() - t0))
            tps = {side: statistics.median(v) for side, v in rates.items()}
            bc.print_table(
                f"2. sampling: {args.samples} sequences x {args.max_tokens} tokens from a 16-token prompt, "
                f"temperature 1 ({args.repeats} requests each, alternating)",
                ["side", "tokens/s (median)", "vs in-process"],
                [[side, round(v), f"{v / tps['in-process (generate)']:.2f}x"] for side, v in tps.items()])

            # -- 3. per-request overhead ---------------------------------------------------------------------
            tiny = [types.Datum(model_input=types.ModelInput.from_ints(tokens[0, :4].tolist()),
                                loss_fn_inputs={"target_tokens": tokens[0, 1:5].tolist()})]
            tiny_ids = torch.from_numpy(tokens[:1, :4])

            @torch.no_grad()
            def local_forward() -> None:
                local.model(input_ids=tiny_ids).logits.float().log_softmax(-1)

            cases = [
                ("optim_step, no gradients", lambda: training.optim_step(types.AdamParams(**adam)).result(),
                 local.optimizer.step),
                ("forward, 1 datum x 4 tokens", lambda: training.forward(tiny, "cross_entropy").result(),
                 local_forward),
            ]
            rows = []
            for name, api_call, local_call in cases:
                api_call(), local_call()
                api_t, local_t = [], []
                for _ in range(args.trivial):
                    for fn, out in ((api_call, api_t), (local_call, local_t)):
                        t0 = time.perf_counter()
                        fn()
                        out.append(time.perf_counter() - t0)
                rows.append([name, f"{median_ms(api_t):.1f}", f"{median_ms(local_t):.2f}",
                             f"{median_ms(api_t) - median_ms(local_t):.1f}",
                             f"{sorted(api_t)[int(0.9 * (len(api_t) - 1))] * 1000:.1f}"])
            bc.print_table(f"3. per-request overhead ({args.trivial} requests each, medians)",
                           ["request", "API end to end ms", "in-process ms", "overhead ms", "API p90 ms"], rows,
                           note=bc.load_average())
        finally:
            stop_service(proc)


if __name__ == "__main__":
    main()
