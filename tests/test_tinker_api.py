"""The Tinker API (/api/v1) driven by the official `tinker` SDK, as a research team's own loop would: one
service with two users whose keys carry the SDK's `tml-` prefix; the tiny student model on CPU.

A training client's logprobs before any step are the base model's (a plain transformers forward);
supervised loss falls through forward_backward + optim_step; what the model memorised comes back from a
sampling client at temperature 0; save_state -> create_training_client_from_state gives the same logprobs;
bad input fails through the SDK's own exception (never a stuck future); another user's sessions, models and
tinker:// paths answer as missing ones; max_sessions caps a user's open sessions; an RL loop with
importance_sampling (examples/tinker_loop.py's) raises its reward; the REST client lists a user's own
training runs and checkpoints only; /metrics counts sessions and resident models."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

tinker = pytest.importorskip("tinker")
from helpers import (free_port, processes_mentioning, stop_process_group, token_service,  # noqa: E402
                     users_service, wait_for_health, wait_until)
from tinker import types  # noqa: E402

_spec = importlib.util.spec_from_file_location("tinker_loop", Path(__file__).resolve().parent.parent / "examples"
                                               / "tinker_loop.py")
tinker_loop = importlib.util.module_from_spec(_spec)  # the example script's loops: tested here, not copied
_spec.loader.exec_module(tinker_loop)

ALICE, BOB, CAROL = "tml-alice-0123456789abcdef", "tml-bob-0123456789abcdef", "tml-carol-0123456789abcdef"
DAVE, OPS = "tml-dave-0123456789abcdef", "ops-key-0123456789abcdef"
DAVE_QUOTA = 500_000  # bytes: two of a rank-1 adapter's sampler saves on the tiny student (about 213 kB each)
USERS = {"alice": ("member", ALICE, {}), "bob": ("member", BOB, {"max_sessions": 1}), "carol": ("member", CAROL, {}),
         "dave": ("member", DAVE, {"max_data_gb": DAVE_QUOTA / 2**30}), "ops": ("admin", OPS, {})}
TEXT = "The cat sat on the mat."

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_models):
    import yaml

    models_root = str(Path(tiny_models["student"]).parent)
    root = tmp_path_factory.mktemp("tinker")
    (root / "tinker.yaml").write_text(yaml.safe_dump({"tinker": {"min_checkpoint_ttl_s": 1}}))  # expiry in seconds
    with users_service(root, USERS, models_root, "--tinker-config", str(root / "tinker.yaml"),
                       "--model-dir", models_root) as (url, data, log):
        yield url, data, log


@pytest.fixture(scope="module")
def alice(service):
    return tinker.ServiceClient(base_url=service[0], api_key=ALICE)


@pytest.fixture(scope="module")
def trained(alice, tiny_models):
    """Alice's training client, its tokenizer's ids of TEXT, one datum (a 4-token prompt and its 4-token
    completion, weighted on the completion), its logprobs before any step and the losses of 20 steps."""
    tc = alice.create_lora_training_client(base_model=tiny_models["student"], rank=16, seed=0).result()
    ids = tc.get_tokenizer().encode(TEXT)[:8]  # from get_info's tokenizer_id: a local path, no hub
    datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                        loss_fn_inputs={"target_tokens": ids[1:], "weights": [0.0] * 3 + [1.0] * 4})
    before = tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    losses = []
    for _ in range(20):
        fb = tc.forward_backward([datum], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=5e-3)).result()
        losses.append(fb.metrics["loss:sum"])
    return tc, ids, datum, before, losses


def test_first_logprobs_are_the_base_models(trained, tiny_models):
    import torch
    from transformers import AutoModelForCausalLM

    _, ids, _, before, _ = trained
    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0]
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1).numpy()
    np.testing.assert_allclose(before, expected, atol=1e-4)


def test_supervised_loss_falls(trained):
    _, ids, _, before, losses = trained
    assert losses[0] == pytest.approx(-before[3:].sum(), rel=1e-4)  # cross-entropy: the weighted SUM
    assert losses[-1] < 0.1 * losses[0], losses


def test_memorised_text_comes_back_from_the_sampler(trained):
    tc, ids, datum, _, _ = trained
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt, rest = ids[:4], ids[4:]
    out = sampler.sample(types.ModelInput.from_ints(prompt), 2,
                         types.SamplingParams(max_tokens=len(rest), temperature=0, seed=1)).result()
    assert [s.tokens for s in out.sequences] == [rest, rest]
    assert out.sequences[0].stop_reason == "length"
    # the sampler's logprobs of its tokens are the trainer's for the same tokens
    trainer = tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    np.testing.assert_allclose(out.sequences[0].logprobs, trainer[3:], atol=1e-4)


def test_save_state_then_from_state_gives_the_same_logprobs(alice, trained):
    tc, _, datum, _, _ = trained
    path = tc.save_state("after-12").result().path
    assert path.startswith("tinker://") and path.endswith("/weights/after-12")
    here = tc.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
    for restored in (alice.create_training_client_from_state(path).result(),
                     alice.create_training_client_from_state_with_optimizer(path).result()):
        there = restored.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()
        np.testing.assert_allclose(there, here, atol=1e-5)


def test_bad_input_is_a_clear_error_through_the_sdk(trained):
    tc, ids, _, _, _ = trained

    def datum(tokens, **inputs):
        return types.Datum(model_input=types.ModelInput.from_ints(tokens), loss_fn_inputs=inputs)

    cases = [
        (lambda: tc.forward_backward([datum(ids[:3], target_tokens=ids[1:4])], "nope"), "loss_fn: 'nope'"),
        (lambda: tc.forward_backward([datum(ids[:3], target_tokens=ids[1:4], weights=[1.0, 1.0])],
                                     "cross_entropy"), "loss_fn_inputs.weights: 2 values for 3"),
        (lambda: tc.forward_backward([datum([1, 2, 10**6], target_tokens=[2, 3, 4])], "cross_entropy"),
         "token id 1000000 is outside the vocabulary"),
        (lambda: tc.forward_backward([datum(ids[:3], target_tokens=ids[1:4])], "importance_sampling"),
         "loss_fn_inputs.logprobs: required"),
    ]
    sampler = tc.save_weights_and_get_sampling_client().result()
    prompt = types.ModelInput.from_ints(ids[:3])
    cases += [
        (lambda: sampler.sample(prompt, 10_000, types.SamplingParams(max_tokens=4)), "num_samples: 10000"),
        (lambda: sampler.sample(prompt, 1, types.SamplingParams(max_tokens=10**7)), "max_tokens: 10000000"),
    ]
    for call, message in cases:
        with pytest.raises(tinker.BadRequestError, match=message):
            call().result(timeout=60)


def test_another_users_ids_and_paths_are_missing(service, alice, trained, tiny_models):
    tc, _, datum, _, _ = trained
    path = tc.save_state("alices").result().path
    bob = tinker.ServiceClient(base_url=service[0], api_key=BOB)
    with pytest.raises(tinker.NotFoundError, match="no checkpoint"):
        bob.create_training_client_from_state(path).result(timeout=60)
    with pytest.raises(tinker.NotFoundError, match="no checkpoint"):
        bob.create_sampling_client(model_path=path).sample(
            types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=2)).result(timeout=60)
    http = httpx.Client(base_url=service[0] + "/api/v1", headers={"X-API-Key": BOB}, timeout=30)
    answer = http.post("/get_info", json={"model_id": tc.model_id})
    assert answer.status_code == 404 and "unknown model" in answer.text, answer.text
    # bob's own session works; a second one is over his max_sessions
    assert bob.create_lora_training_client(base_model=tiny_models["student"], rank=4).result().get_info()
    again = tinker.ServiceClient(base_url=service[0], api_key=BOB)  # the SDK opens its session on first use
    with pytest.raises(tinker.PermissionDeniedError, match="max_sessions"):
        again.create_lora_training_client(base_model=tiny_models["student"], rank=4).result(timeout=60)
    with pytest.raises(tinker.AuthenticationError, match="wrong API key"):
        tinker.ServiceClient(base_url=service[0], api_key="tml-not-a-key-of-this-service").create_lora_training_client(
            base_model=tiny_models["student"], rank=4).result(timeout=60)


def test_rl_loop_with_importance_sampling_raises_the_reward(alice, tiny_models):
    """Groups sampled from each step's weights (temperature 1), group-centred rewards as advantages, the
    sampler's logprobs as the importance weights' base: the reward (the fraction of sampled ids below 150,
    about 0.2 for the untrained model) rises past 0.7 in 14 steps of 2 groups of 16 (LoRA
    seeds 0, 1, 2: the last three steps' mean 0.98, 1.0, 1.0)."""
    tc = alice.create_lora_training_client(base_model=tiny_models["student"], rank=16, seed=0).result()
    rewards = tinker_loop.rl_loop(tc)
    assert rewards[0] < 0.3 and np.mean(rewards[-3:]) > 0.7, rewards


def test_rest_client_lists_own_training_runs_and_checkpoints(service, trained):
    tc, _, _, _, _ = trained
    state = tc.save_state("listed").result().path
    sampler_path = tc.save_weights_for_sampler("listed-sampler").result().path
    rest = tinker.RestClient(base_url=service[0], api_key=ALICE)
    runs = rest.list_training_runs(limit=100).result()
    assert tc.model_id in [r.training_run_id for r in runs.training_runs]
    assert runs.cursor.total_count >= len(runs.training_runs) >= 1
    run = rest.get_training_run(tc.model_id).result()
    assert (run.model_owner, run.lora_rank, run.is_lora) == ("alice", 16, True)
    assert run.last_sampler_checkpoint.tinker_path == sampler_path
    listed = {c.tinker_path: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    assert {state, sampler_path} <= set(listed)
    assert listed[state].checkpoint_type == "training" and listed[state].checkpoint_id == "weights/listed"
    assert listed[sampler_path].checkpoint_type == "sampler" and listed[state].size_bytes > 0
    assert run.user_metadata is None
    # user_metadata given at create_model comes back with the run; too much is a 400 naming the field
    labelled = tinker.ServiceClient(base_url=service[0], api_key=ALICE).create_lora_training_client(
        base_model=tc.get_info().model_data.model_name, rank=1, user_metadata={"experiment": "ttl-7"}).result()
    assert rest.get_training_run(labelled.model_id).result().user_metadata == {"experiment": "ttl-7"}
    by_id = {r.training_run_id: r for r in rest.list_training_runs(limit=100).result().training_runs}
    assert by_id[labelled.model_id].user_metadata == {"experiment": "ttl-7"}
    with pytest.raises(tinker.BadRequestError, match="user_metadata: .* over this service's limit"):
        tinker.ServiceClient(base_url=service[0], api_key=ALICE).create_lora_training_client(
            base_model=tc.get_info().model_data.model_name, rank=1, user_metadata={"k": "x" * 5000}).result(timeout=60)
    # the base models under --model-dir, as the SDK's get_server_capabilities reads them
    supported = [m.model_name for m in rest.get_server_capabilities().result().supported_models]
    assert tc.get_info().model_data.model_name in supported, supported
    # another user sees none of it
    carol = tinker.RestClient(base_url=service[0], api_key=CAROL)
    assert tc.model_id not in [r.training_run_id for r in carol.list_training_runs(limit=100).result().training_runs]
    for call in (carol.get_training_run, carol.list_checkpoints):
        with pytest.raises(tinker.NotFoundError, match="unknown training run"):
            call(tc.model_id).result(timeout=60)


def test_checkpoints_expire_after_their_ttl_and_the_owner_deletes_them(service, alice, trained):
    """save_state / save_weights_for_sampler with ttl_seconds: listed with expires_at, then gone (a load is
    the SDK's NotFoundError, and the files are deleted); the REST client's delete_checkpoint deletes the
    owner's checkpoint, and another user's delete finds nothing (the checkpoint stays)."""
    tc = trained[0]
    rest = tinker.RestClient(base_url=service[0], api_key=ALICE)
    state = tc.save_state("short-lived", ttl_seconds=2).result().path
    sampler_path = tc.save_weights_for_sampler("short-lived-sampler", ttl_seconds=2).result().path
    kept = tc.save_state("kept").result().path
    listed = {c.tinker_path: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}
    for path in (state, sampler_path):
        assert 1.9 < (listed[path].expires_at - listed[path].time).total_seconds() < 2.1, listed[path]
    assert listed[kept].expires_at is None
    with pytest.raises(tinker.BadRequestError, match="ttl_seconds: 0 is outside"):
        tc.save_state("never", ttl_seconds=0).result(timeout=60)
    # a ttl set after the save (set_checkpoint_ttl_from_tinker_path): same bounds, owner only, then honoured
    renewed = tc.save_state("renewed").result().path
    with pytest.raises(tinker.BadRequestError, match="ttl_seconds: 0 is outside"):
        rest.set_checkpoint_ttl_from_tinker_path(renewed, 0).result(timeout=60)
    with pytest.raises(tinker.NotFoundError, match="no checkpoint"):
        tinker.RestClient(base_url=service[0], api_key=CAROL).set_checkpoint_ttl_from_tinker_path(
            renewed, 2).result(timeout=60)
    rest.set_checkpoint_ttl_from_tinker_path(renewed, 2).result(timeout=60)
    renewed_at = {c.tinker_path: c for c in rest.list_checkpoints(tc.model_id).result().checkpoints}[renewed]
    assert 0 < renewed_at.expires_at.timestamp() - time.time() < 2.1, renewed_at

    run_dir = service[1] / "tinker" / "runs" / tc.model_id.replace(":", "-")
    wait_until(lambda: max(listed[state].expires_at, renewed_at.expires_at).timestamp() < time.time(), 10,
               message="the ttl passed")
    with pytest.raises(tinker.NotFoundError, match="no checkpoint"):  # loaded before any listing
        alice.create_training_client_from_state(state).result(timeout=60)
    with pytest.raises(tinker.NotFoundError, match="no checkpoint"):
        alice.create_sampling_client(model_path=sampler_path).result().sample(
            types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=2)).result(timeout=60)
    assert not (run_dir / "weights" / "short-lived").exists()
    assert not (run_dir / "sampler_weights" / "short-lived-sampler").exists()
    listed = [c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints]
    assert kept in listed and state not in listed and sampler_path not in listed and renewed not in listed
    assert not (run_dir / "weights" / "renewed").exists()

    carol = tinker.RestClient(base_url=service[0], api_key=CAROL)
    with pytest.raises(tinker.NotFoundError, match="no checkpoint"):
        carol.delete_checkpoint_from_tinker_path(kept).result(timeout=60)
    assert (run_dir / "weights" / "kept" / "adapter_model.safetensors").exists()
    rest.delete_checkpoint(tc.model_id, "weights/kept").result(timeout=60)
    assert not (run_dir / "weights" / "kept").exists()
    assert kept not in [c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints]
    with pytest.raises(tinker.NotFoundError, match="no checkpoint"):
        alice.create_training_client_from_state(kept).result(timeout=60)


def test_topk_logprobs_are_the_models_most_likely_tokens(service, tiny_models):
    """asample's topk_prompt_logprobs: at each prompt position the top-1 is the argmax of a plain transformers
    forward (with its logprob); topk_sample_logprobs at temperature 0: each sampled token is its position's
    top-1, with the same logprob; a k over the service's limit is a BadRequestError naming the field."""
    import torch
    from transformers import AutoModelForCausalLM

    from providers.tinker_api.limits import TinkerLimits

    sampler = tinker.ServiceClient(base_url=service[0], api_key=ALICE).create_sampling_client(
        base_model=tiny_models["student"]).result()
    ids = sampler.get_tokenizer().encode(TEXT)[:6]
    out = sampler.sample(types.ModelInput.from_ints(ids), 1, types.SamplingParams(max_tokens=5, temperature=0),
                         include_prompt_logprobs=True, topk_prompt_logprobs=3, topk_sample_logprobs=2).result()
    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
    prompt_topk = out.topk_prompt_logprobs
    assert prompt_topk[0] is None and len(prompt_topk) == len(ids)  # the first token has no logprobs
    assert out.prompt_logprobs[0] is None
    expected = logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1).numpy()
    np.testing.assert_allclose(out.prompt_logprobs[1:], expected, atol=1e-4)
    for position, top in enumerate(prompt_topk[1:], start=1):
        assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]
        assert top[0][0] == int(logp[position - 1].argmax())
        assert top[0][1] == pytest.approx(float(logp[position - 1].max()), abs=1e-4)
    seq = out.sequences[0]
    assert len(seq.topk_logprobs) == len(seq.tokens) == 5
    for token, logprob, top in zip(seq.tokens, seq.logprobs, seq.topk_logprobs):
        assert len(top) == 2 and top[0][0] == token and top[0][1] == pytest.approx(logprob, abs=1e-6)
    over = TinkerLimits().max_topk_logprobs + 1
    with pytest.raises(tinker.BadRequestError, match=f"topk_sample_logprobs: {over} is over"):
        sampler.sample(types.ModelInput.from_ints(ids), 1, types.SamplingParams(max_tokens=2),
                       topk_sample_logprobs=over).result(timeout=60)
    # the hosted service's other prompt-scoring options are refused by name, never ignored
    targets = types.TensorData.from_numpy(np.ones((len(ids) - 1, 1), np.int64))
    for option, value in (("prompt_logprobs_last_n", 2), ("prompt_alt_tokens_k", 2),
                          ("target_prompt_logprobs", targets)):
        with pytest.raises(tinker.BadRequestError, match=f"{option}: not supported"):
            sampler.sample(types.ModelInput.from_ints(ids), 1, types.SamplingParams(max_tokens=2),
                           include_prompt_logprobs=True, **{option: value}).result(timeout=60)


def test_saves_past_the_users_disk_quota_are_refused_before_writing(service, tiny_models):
    """Dave's max_data_gb holds two sampler saves of his rank-1 model: the next one fails through the SDK
    naming the quota, writes nothing, and the admin's usage counts exactly the files his saves wrote."""
    tc = tinker.ServiceClient(base_url=service[0], api_key=DAVE).create_lora_training_client(
        base_model=tiny_models["student"], rank=1).result()
    saved, refused = [], None
    for i in range(6):
        try:
            saved.append(tc.save_weights_for_sampler(f"s{i}").result(timeout=60).path)
        except tinker.RequestFailedError as e:
            refused = (f"s{i}", str(e))
            break
    assert saved and refused is not None and "max_data_gb" in refused[1], (saved, refused)
    run_dir = service[1] / "tinker" / "runs" / tc.model_id.replace(":", "-")
    assert not (run_dir / "sampler_weights" / refused[0]).exists()
    usage = httpx.get(service[0] + "/v1/admin/usage", headers={"Authorization": f"Bearer {OPS}"}, timeout=30).json()
    held = next(u["bytes"] for u in usage["users"] if u["user"] == "dave")
    on_disk = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file())
    assert held == on_disk and held + on_disk / len(saved) > DAVE_QUOTA, (held, on_disk)


def test_saves_past_the_data_dirs_max_data_gb_are_refused_before_writing(tmp_path, tiny_models):
    """--max-data-gb counts what Tinker wrote under DATA_DIR/tinker: with room for one sampler save of a
    rank-1 model (about 213 kB), the second fails through the SDK naming the flag and writes nothing."""
    limit = 300_000  # bytes
    with token_service(tmp_path, ALICE, str(Path(tiny_models["student"]).parent),
                       "--max-data-gb", str(limit / 2**30)) as (url, data, _):
        tc = tinker.ServiceClient(base_url=url, api_key=ALICE).create_lora_training_client(
            base_model=tiny_models["student"], rank=1).result()
        first = tc.save_weights_for_sampler("first").result(timeout=60).path
        with pytest.raises(tinker.RequestFailedError, match="--max-data-gb"):
            tc.save_weights_for_sampler("second").result(timeout=60)
        run_dir = data / "tinker" / "runs" / tc.model_id.replace(":", "-")
        assert first.endswith("/first") and (run_dir / "sampler_weights" / "first" / "tinker.json").exists()
        assert not (run_dir / "sampler_weights" / "second").exists()


def test_metrics_count_sessions_and_resident_models(service, trained):
    text = httpx.get(service[0] + "/metrics", headers={"Authorization": f"Bearer {OPS}"}, timeout=30).text
    gauges = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("trl_tinker_")}
    assert gauges["trl_tinker_sessions"] >= 1 and gauges["trl_tinker_models_resident"] >= 1, gauges
    assert gauges["trl_tinker_requests_queued"] == 0 and gauges["trl_tinker_futures_pending"] == 0, gauges


# -- the execution model: shared bases, eviction and restore, restarts -------------------------------------
@contextlib.contextmanager
def tinker_service(root: Path, port: int, models_root: str):
    """A service on `port` over `root/data` with Alice's and the admin's keys, whose idle models leave memory
    after 8 s; the process, for a test to stop as it likes."""
    import hashlib

    import yaml

    keys = [{"name": n, "role": role, "key_sha256": hashlib.sha256(k.encode()).hexdigest()}
            for n, (role, k, _) in USERS.items() if n in ("alice", "ops")]
    (root / "keys.yaml").write_text(yaml.safe_dump({"users": keys}))
    (root / "tinker.yaml").write_text(yaml.safe_dump({"tinker": {"evict_after_s": 8}}))
    with open(root / "service.log", "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "providers.remote_fsdp.service.app", "--port", str(port), "--data-dir",
             str(root / "data"), "--api-keys-file", str(root / "keys.yaml"), "--allowed-model-root", models_root,
             "--tinker-config", str(root / "tinker.yaml")],
            cwd=Path(__file__).resolve().parent.parent, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_health(f"http://127.0.0.1:{port}", timeout=120, proc=proc, path="/health",
                        log_file=root / "service.log")
        yield proc
    finally:
        stop_process_group(proc)


def test_models_share_a_base_leave_memory_when_idle_and_survive_restarts(tmp_path, tiny_models):
    """Two sessions on one base hold it once; an idle model is saved and leaves memory, and its next call
    restores it exactly; a service stopped with SIGTERM restores every model for the same SDK clients; one
    killed after an unsaved step says the model lost its weights (and its checkpoint still loads); a future
    of the service's earlier run is a 410, which the SDK answers by sending the request again."""
    port, models_root = free_port(), str(Path(tiny_models["student"]).parent)
    url = f"http://127.0.0.1:{port}"
    admin = {"Authorization": f"Bearer {OPS}"}

    def overview() -> list[dict]:
        sessions = httpx.get(url + "/api/v1/session_overview", headers=admin, timeout=30).json()["sessions"]
        return [m for s in sessions for m in s["models"]]

    def gauge(name: str) -> float:
        text = httpx.get(url + "/metrics", headers=admin, timeout=30).text
        return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))

    with tinker_service(tmp_path, port, models_root) as proc:
        first = tinker.ServiceClient(base_url=url, api_key=ALICE)
        tc = first.create_lora_training_client(base_model=tiny_models["student"], rank=8, seed=0).result()
        other = tinker.ServiceClient(base_url=url, api_key=ALICE).create_lora_training_client(
            base_model=tiny_models["student"], rank=4, seed=1).result()
        ids = tc.get_tokenizer().encode(TEXT)[:8]
        datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs={"target_tokens": ids[1:]})
        for _ in range(3):
            tc.forward_backward([datum], "cross_entropy").result()
            tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
        other.forward([datum], "cross_entropy").result()
        assert (gauge("trl_tinker_bases_loaded"), gauge("trl_tinker_models_resident")) == (1, 2)

        def logprobs(client):
            return client.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()

        trained = logprobs(tc)
        assert not np.allclose(trained, logprobs(other), atol=1e-3)  # two adapters, each its own weights
        wait_until(lambda: not any(m["resident"] for m in overview()) and gauge("trl_tinker_bases_loaded") == 0,
                   60, message="idle models saved and evicted, the base dropped")
        workers = [cmd for _, cmd in processes_mentioning(str(tmp_path / "data"))
                   if "providers.tinker_api.process" in cmd]
        assert not workers, workers  # the base's process ended: its memory went back to the system
        usage = httpx.get(url + "/v1/admin/usage", headers=admin, timeout=30).json()["users"]
        resident = sum(f.stat().st_size for f in (tmp_path / "data" / "tinker" / "resident").rglob("*") if f.is_file())
        assert [u["bytes"] for u in usage if u["user"] == "alice"] == [resident] and resident > 0  # its quota's
        np.testing.assert_allclose(logprobs(tc), trained, atol=1e-5)  # restored as it was
        assert [m["steps"] for m in overview() if m["model_id"] == tc.model_id] == [3]

        # 410 for a future of an earlier run (the SDK resubmits), 404 for one that never was
        stale = httpx.post(url + "/api/v1/retrieve_future", json={"request_id": "req-000000000000-0"},
                           headers={"X-API-Key": ALICE}, timeout=30)
        assert stale.status_code == 410 and "restarted" in stale.text
        assert httpx.post(url + "/api/v1/retrieve_future", json={"request_id": "nope"}, headers={"X-API-Key": ALICE},
                          timeout=30).status_code == 404
        saved = tc.save_state("before-kill").result().path
        stop_process_group(proc)  # SIGTERM: every model in memory is saved

    with tinker_service(tmp_path, port, models_root) as proc:
        np.testing.assert_allclose(logprobs(tc), trained, atol=1e-5)  # the same client, after the restart
        tc.forward_backward([datum], "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()  # a step no save holds
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)

    with tinker_service(tmp_path, port, models_root):
        with pytest.raises(tinker.RequestFailedError, match="lost its weights"):
            tc.forward([datum], "cross_entropy").result()
        restored = tinker.ServiceClient(base_url=url, api_key=ALICE).create_training_client_from_state(saved)
        np.testing.assert_allclose(logprobs(restored), trained, atol=1e-5)


def test_sessions_in_the_cli_and_the_dashboard(service, trained, tmp_path):
    """`trl-post-training sessions list` shows a user's own sessions (an admin's: everyone's) with the
    model's steps and loss; `sessions end` ends one; the dashboard's Sessions page lists the model and
    draws its loss curve in a real browser."""
    from operator_fixtures import chromium_path, cli

    url, tc = service[0], trained[0]
    env = {**os.environ, "TRL_POST_TRAINING_URL": url, "COLUMNS": "200"}
    listed = json.loads(cli({**env, "TRL_POST_TRAINING_TOKEN": ALICE}, "sessions", "list", "--json").stdout)
    mine = [m for s in listed for m in s["models"] if m["model_id"] == tc.model_id]
    assert mine and mine[0]["steps"] >= 20 and mine[0]["last_loss"] is not None, listed
    assert "alice" in cli({**env, "TRL_POST_TRAINING_TOKEN": OPS}, "sessions", "list").stdout  # the table
    carol_env = {**env, "TRL_POST_TRAINING_TOKEN": CAROL}
    assert tc.model_id not in cli(carol_env, "sessions", "list", "--json").stdout
    alice_session = tc.model_id.split(":")[0]
    cli(carol_env, "sessions", "end", alice_session, check=4)  # another user's session: not found
    # the SDK's session routes: another user's session is a missing one
    for key, seen in ((ALICE, True), (CAROL, False)):
        listed_ids = httpx.get(url + "/api/v1/sessions", headers={"X-API-Key": key}, timeout=30).json()["sessions"]
        assert (alice_session in listed_ids) == seen
        got = httpx.get(url + f"/api/v1/sessions/{alice_session}", headers={"X-API-Key": key}, timeout=30)
        assert got.status_code == (200 if seen else 404) and (tc.model_id in got.text) == seen, got.text
    # one sampler per RL step: a model keeps its newest 8, so a long loop holds no growing pile of snapshots
    for _ in range(10):
        tc.save_weights_and_get_sampling_client().result()
    overview = httpx.get(url + "/api/v1/session_overview", headers={"X-API-Key": ALICE}, timeout=30).json()
    own = [r for s in overview["sessions"] for r in s["samplers"] if r["model_id"] == tc.model_id]
    assert len(own) == 8, own
    carol_session = tinker.ServiceClient(base_url=url, api_key=CAROL).holder.get_session_id()
    assert carol_session in cli(carol_env, "sessions", "list", "--json").stdout
    assert "ended" in cli(carol_env, "sessions", "end", carol_session).stdout
    assert carol_session not in cli(carol_env, "sessions", "list", "--json").stdout

    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/dashboard/")
        page.evaluate(f"localStorage.setItem('trl-dashboard-token', {ALICE!r})")
        page.goto(url + "/dashboard/#/sessions")
        page.reload()
        page.wait_for_selector(f"#sessions td:has-text('{tc.model_id.split(':', 1)[1]}')", timeout=30000)
        page.wait_for_selector("#session-charts canvas", timeout=30000)
        row = page.inner_text("#sessions tbody")
        assert "alice" in row and "resident" in row, row
        browser.close()
    assert not errors, errors


def test_chunks_give_the_whole_batchs_gradient_and_the_sampler_the_trainers_logprobs(alice, trained, tiny_models):
    """Two models from the same seed: one steps on a batch of two datums in one forward_backward, the other
    on the same datums in two calls before its optim_step; their weights stay the same. A sampled answer's
    per-token logprobs are the trainer's logprobs of the same tokens."""
    tc, ids, datum = trained[:3]
    other = types.Datum(model_input=types.ModelInput.from_ints(ids[1:]),
                        loss_fn_inputs={"target_tokens": ids[2:] + ids[:1], "weights": [1.0] * 7})
    whole, split = (alice.create_lora_training_client(base_model=tiny_models["student"], rank=4, seed=3).result()
                    for _ in range(2))
    whole.forward_backward([datum, other], "cross_entropy").result()
    split.forward_backward([datum], "cross_entropy").result()
    split.forward_backward([other], "cross_entropy").result()
    for client in (whole, split):
        client.optim_step(types.AdamParams(learning_rate=1e-2)).result()

    def logprobs(client, d):
        return client.forward([d], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()

    for d in (datum, other):
        np.testing.assert_allclose(logprobs(whole, d), logprobs(split, d), atol=1e-5)

    sampler = tc.save_weights_and_get_sampling_client()
    prompt = ids[:4]
    seq = sampler.sample(types.ModelInput.from_ints(prompt), 1,
                         types.SamplingParams(max_tokens=6, temperature=1.0, seed=7)).result().sequences[0]
    full = prompt + list(seq.tokens)
    replay = types.Datum(model_input=types.ModelInput.from_ints(full[:-1]), loss_fn_inputs={"target_tokens": full[1:]})
    trainer = logprobs(tc, replay)[len(prompt) - 1:]
    np.testing.assert_allclose(np.array(seq.logprobs), trainer, atol=1e-4)


def test_a_killed_base_process_fails_its_requests_and_the_service_goes_on(service, tiny_models):
    """Each base runs in a process of its own (its command line names the service's data dir). One stopped
    (SIGSTOP) with requests queued and then killed (SIGKILL): every pending future fails through the SDK
    naming the kill and an error id; another base answers throughout; the base's next request starts a fresh
    process, where the model that stepped since its last save says it lost its weights, its checkpoint loads
    with the same logprobs as before, and a sampler of its sampler checkpoint samples the same tokens."""
    url, data, _ = service
    base = tiny_models["teacher"]  # a base of its own: the module's other models (on the student) go on
    alice = tinker.ServiceClient(base_url=url, api_key=ALICE)  # a session of its own (max_models_per_session)

    def workers() -> list[int]:
        return [pid for pid, cmd in processes_mentioning(str(data))
                if "providers.tinker_api.process" in cmd and base in cmd]

    def pending() -> float:
        text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {OPS}"}, timeout=30).text
        return float(next(line.split()[1] for line in text.splitlines()
                          if line.startswith("trl_tinker_futures_pending ")))

    tc = alice.create_lora_training_client(base_model=base, rank=4, seed=0).result()
    ids = tc.get_tokenizer().encode(TEXT)[:8]
    datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]), loss_fn_inputs={"target_tokens": ids[1:]})
    prompt, greedy = types.ModelInput.from_ints(ids[:4]), types.SamplingParams(max_tokens=4, temperature=0)

    def logprobs(client):
        return client.forward([datum], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].to_numpy()

    def step() -> list:
        return [tc.forward_backward([datum], "cross_entropy"), tc.optim_step(types.AdamParams(learning_rate=1e-2))]

    [f.result() for f in step()]
    saved, saved_logprobs = tc.save_state("before-the-kill").result().path, logprobs(tc)
    sampler = alice.create_sampling_client(model_path=tc.save_weights_for_sampler("before-the-kill").result().path
                                           ).result()
    sampled = sampler.sample(prompt, 1, greedy).result().sequences[0].tokens
    [f.result() for f in step()]  # a step no save holds

    pids = workers()
    assert len(pids) == 1, f"no process of its own for base {base}: {pids}"
    os.kill(pids[0], signal.SIGSTOP)
    try:
        queued = [*step(), sampler.sample(prompt, 1, greedy)]
        wait_until(lambda: pending() >= len(queued), 30, message="the requests queued on the stopped process")
        student = alice.create_sampling_client(base_model=tiny_models["student"]).result()  # another base answers
        assert student.sample(prompt, 1, greedy).result(timeout=60).sequences[0].tokens
    finally:
        os.kill(pids[0], signal.SIGKILL)
    for future in queued:
        with pytest.raises(tinker.RequestFailedError, match=rf"internal error [0-9a-f]{{12}}: the worker process .*"
                           rf"\(pid {pids[0]}\) was killed by SIGKILL"):
            future.result(timeout=60)
    assert pending() == 0

    with pytest.raises(tinker.RequestFailedError, match="lost its weights"):
        tc.forward([datum], "cross_entropy").result(timeout=60)
    restored = alice.create_training_client_from_state(saved).result(timeout=60)
    np.testing.assert_allclose(logprobs(restored), saved_logprobs, atol=1e-5)
    assert sampler.sample(prompt, 1, greedy).result(timeout=60).sequences[0].tokens == sampled
    assert len(workers()) == 1 and workers() != pids  # a fresh process
