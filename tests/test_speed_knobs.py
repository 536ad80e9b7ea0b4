"""The speed and memory knobs (`JobSpec.efficiency`): each one changes what runs and is recorded as in force,
the ones that must not change the numbers do not, and the ones this host cannot run are refused with a
message naming the field.

Recipes run in this process (imports paid once) on the tiny student; a job takes 1-3 s.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from providers.training import efficiency
from providers.training.data import normalize_rows, write_jsonl
from providers.training.run import resources_used
from providers.training.run_files import RunFiles
from providers.training.spec import (
    CheckpointSpec,
    DataSpec,
    DpoSpec,
    EfficiencySpec,
    JobSpec,
    OptimizerSpec,
    PeftSpec,
)


def make_spec(tmp_path: Path, rows: list[dict], method: str = "sft", model: str = "", steps: int = 3,
              name: str = "job", batch_size: int = 8, **fields) -> JobSpec:
    run_dir = tmp_path / name
    write_jsonl(rows, run_dir / "train.jsonl")
    data = {"batch_size": batch_size, "shuffle": False, "max_seq_len": 128, **fields.pop("data", {})}
    spec = JobSpec(
        job_uuid=name, method=method, model=model, run_dir=str(run_dir),
        data=DataSpec(train_file=str(run_dir / "train.jsonl"), **data),
        optimizer=OptimizerSpec(lr=1e-3), max_steps_per_epoch=steps, max_validation_steps=1,
        checkpoint=CheckpointSpec(output_dir=str(run_dir / "checkpoints"), resume=False),
        dpo=DpoSpec(beta=0.1) if method == "dpo" else None,
        **fields,
    )
    spec.save()
    return spec


def train(spec: JobSpec) -> tuple[list[float], dict]:
    from providers.training.recipes import dpo, sft

    files = RunFiles(spec.run_dir)
    summary = {"sft": sft, "dpo": dpo}[spec.method].train(spec, files)
    losses = [m["loss"] for m in files.read_metrics() if "loss" in m and "eval_loss" not in m]
    return losses, summary


@pytest.fixture(scope="module")
def sft_rows(toy_data):
    # Lengths vary (3-5 letters, and some long answers) so that a padded batch really holds padding.
    rows = list(normalize_rows(toy_data["instruct"][:24], "completion"))
    for i, r in enumerate(rows[::3]):
        r["completion"][0]["content"] = " ".join(["x y z"] * (i + 2))
    return rows


@pytest.fixture(scope="module")
def dpo_rows(toy_data):
    return list(normalize_rows(toy_data["preference"][:16], "preference"))


def test_a_capped_run_tokenizes_only_the_rows_its_steps_reach(tmp_path, monkeypatch):
    from datasets import Dataset

    from providers.training.components import reachable_rows, total_steps

    rows = Dataset.from_list([{"i": i} for i in range(1000)])

    def reach(method: str = "sft", world: int = 1, **fields) -> list[int]:
        monkeypatch.setenv("WORLD_SIZE", str(world))
        spec = make_spec(tmp_path, [], method=method, steps=fields.pop("steps", 2), batch_size=4, **fields)
        picked = reachable_rows(rows, spec)
        assert total_steps(spec, len(picked)) == total_steps(spec, len(rows))  # the same steps, fewer rows
        return list(picked["i"])

    shuffled = {"data": {"shuffle": True}}
    assert reach(**shuffled) == reach(**shuffled) != list(range(8)) and len(reach(**shuffled)) == 2 * 4  # seeded
    assert len(reach(world=2, n_epochs=3, gradient_accumulation_steps=2)) == 3 * 2 * 4 * 2 * 2
    assert reach() == list(range(8))  # not shuffled: the rows the trainer reads first
    assert reach(method="kto", **shuffled) == list(range(8))  # KTO shuffled its rows once itself: the first ones
    assert len(reach(steps=None)) == 1000 and len(reach(steps=300)) == 1000  # every row is reached


@pytest.mark.slow  # trains
def test_padding_free_sft_trains_the_same_losses_as_padded(tmp_path, tiny_models, sft_rows):
    student = tiny_models["student"]
    padded, _ = train(make_spec(tmp_path, sft_rows, model=student, name="padded"))
    free_spec = make_spec(tmp_path, sft_rows, model=student, name="free", efficiency=EfficiencySpec(padding_free=True))
    free, _ = train(free_spec)
    print(f"losses padded {padded} / padding-free {free}")
    assert len(padded) == len(free) == 3
    assert free == pytest.approx(padded, rel=1e-4, abs=1e-5)
    assert resources_used(free_spec)["efficiency"]["padding_free"] is True


@pytest.mark.slow  # trains
@pytest.mark.parametrize("padding_free", [False, True])
def test_full_logits_loss_trains_the_same_losses_as_trls_chunked_lm_head(tmp_path, tiny_models, sft_rows, padding_free):
    """On CPU the core computes SFT's loss from full logits (about half the step time at 25M); TRL's chunked LM
    head is the reference, and with completion-only masks, padding and padding-free batches the losses agree."""
    student = tiny_models["student"]
    runs = {}
    for chunked in (True, False):
        spec = make_spec(tmp_path, sft_rows, model=student, name=f"chunked-{chunked}-{padding_free}",
                         efficiency=EfficiencySpec(padding_free=padding_free, chunked_lm_head=chunked))
        runs[chunked] = train(spec)[0]
        assert resources_used(spec)["efficiency"]["chunked_lm_head"] is chunked
        metrics = RunFiles(spec.run_dir).read_metrics()
        assert all("mean_token_accuracy" in m and m["num_tokens"] > 0 for m in metrics if "loss" in m and "eval_loss" not in m)
    print(f"losses chunked {runs[True]} / full logits {runs[False]}")
    assert len(runs[False]) == 3 and runs[False] == pytest.approx(runs[True], rel=1e-4, abs=1e-5)
    default = make_spec(tmp_path, sft_rows, model=student, name=f"default-{padding_free}")
    assert resources_used(default)["efficiency"]["chunked_lm_head"] is False  # this host has no CUDA


@pytest.mark.slow  # trains
def test_gradient_checkpointing_is_non_reentrant_and_changes_no_loss(tmp_path, tiny_models, sft_rows, monkeypatch):
    from transformers import PreTrainedModel

    calls = []
    original = PreTrainedModel.activation_checkpointing_enable

    def recording(self, *args, **kw):
        calls.append(kw.get("activation_checkpointing_kwargs"))
        original(self, *args, **kw)
        assert self.is_gradient_checkpointing

    monkeypatch.setattr(PreTrainedModel, "activation_checkpointing_enable", recording)
    student = tiny_models["student"]
    plain, _ = train(make_spec(tmp_path, sft_rows, model=student, name="plain", steps=2))
    assert not calls  # TRL's default (on) is turned off
    spec = make_spec(tmp_path, sft_rows, model=student, name="ckpt", steps=2,
                     efficiency=EfficiencySpec(gradient_checkpointing=True))
    checkpointed, _ = train(spec)
    assert calls == [{"use_reentrant": False}], calls
    assert checkpointed == pytest.approx(plain, rel=1e-5)
    assert resources_used(spec)["efficiency"]["gradient_checkpointing"] is True


@pytest.mark.slow  # trains
def test_group_by_length_sft_trains(tmp_path, tiny_models, sft_rows):
    spec = make_spec(tmp_path, sft_rows, model=tiny_models["student"], name="bucketed", data={"shuffle": True},
                     efficiency=EfficiencySpec(group_by_length=True))
    losses, _ = train(spec)
    assert len(losses) == 3
    assert resources_used(spec)["efficiency"]["group_by_length"] is True


@pytest.mark.slow  # trains
def test_qlora_sft_trains_a_4bit_base_on_this_host(tmp_path, tiny_models, sft_rows):
    if efficiency.four_bit_trains_here():
        pytest.skip(efficiency.four_bit_trains_here())
    spec = make_spec(tmp_path, sft_rows, model=tiny_models["student"], name="qlora", steps=2,
                     peft=PeftSpec(method="lora", quantize_base=True))
    assert spec.efficiency.load_in_4bit  # quantize_base (Llama Stack's field) is the same switch
    # As a job forked from the zygote runs: the preloaded training stack left bitsandbytes and the loggers out
    # (optional_imports: 2.8 s of CPU per training process), and this 4-bit job brings bitsandbytes back, as a
    # job that logs to mlflow brings mlflow back, to TRL's profiling module too.
    forked = textwrap.dedent(f"""
        import sys
        from providers.training.preload import preload
        assert preload() is None
        assert "peft" in sys.modules and "trl.extras.profiling" in sys.modules and "matplotlib.pyplot" in sys.modules
        import gc
        assert gc.get_freeze_count() > 100_000  # the imports are out of every later collection
        assert sys.modules["bitsandbytes"] is None and sys.modules["mlflow"] is None  # imported without them
        from providers.training.run import main
        code = main({spec.run_dir!r})
        assert "Linear4bit" in repr(vars(sys.modules["bitsandbytes"].nn))
        from providers.training.optional_imports import bring_back
        import trl.extras.profiling
        bring_back("mlflow")
        assert trl.extras.profiling.mlflow is sys.modules["mlflow"] and trl.extras.profiling.is_mlflow_available()
        sys.exit(code)
    """)
    subprocess.run([sys.executable, "-c", forked], check=True, timeout=300, cwd=Path(__file__).resolve().parent.parent)
    files = RunFiles(spec.run_dir)
    status = files.read_status()
    assert status["state"] == "completed", status
    losses = [m["loss"] for m in files.read_metrics() if "loss" in m and "eval_loss" not in m]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    adapter = Path(status["final_checkpoint"])
    assert (adapter / "adapter_config.json").exists()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert "nf4" in resources_used(spec)["efficiency"]["load_in_4bit"]


@pytest.mark.slow  # trains
def test_precomputed_reference_log_probs_match_the_reference_copy_without_loading_it(
        tmp_path, tiny_models, dpo_rows, monkeypatch):
    from providers.training import components
    from providers.training.recipes import dpo

    student = tiny_models["student"]
    loads = []
    original = components.load_model
    counted = lambda *a, **kw: loads.append(a) or original(*a, **kw)  # noqa: E731
    monkeypatch.setattr(dpo, "load_model", counted)  # the policy
    monkeypatch.setattr(components, "load_model", counted)  # the reference (components.reference_model)
    copy, _ = train(make_spec(tmp_path, dpo_rows, method="dpo", model=student, name="refcopy", batch_size=4))
    assert len(loads) == 2  # policy + frozen reference
    loads.clear()
    spec = make_spec(tmp_path, dpo_rows, method="dpo", model=student, name="precomputed", batch_size=4,
                     efficiency=EfficiencySpec(precompute_ref_log_probs=True))
    precomputed, _ = train(spec)
    assert len(loads) == 1  # the policy only
    print(f"DPO losses with a reference copy {copy} / precomputed {precomputed}")
    assert precomputed == pytest.approx(copy, rel=1e-4)
    assert resources_used(spec)["efficiency"]["reference"].startswith("precomputed")


@pytest.mark.slow  # trains
@pytest.mark.parametrize("peft", [None, PeftSpec(method="lora")], ids=["reference-copy", "lora"])
def test_dpo_from_full_logits_logs_what_trls_chunked_lm_head_logs(tmp_path, tiny_models, dpo_rows, peft):
    """On CPU the core answers DPOTrainer's log-prob call from full logits (recipes/dpo.LogitsDPOTrainer);
    with TRL's chunked LM head as the reference, every logged figure agrees: losses, log-probs, rewards,
    margins and the metric fields (entropy, mean logits, token accuracy), for the policy and the reference."""
    runs = {}
    for chunked in (True, False):
        spec = make_spec(tmp_path, dpo_rows, method="dpo", model=tiny_models["student"], batch_size=4, peft=peft,
                         name=f"dpo-chunked-{chunked}-{peft is not None}",
                         efficiency=EfficiencySpec(chunked_lm_head=chunked))
        train(spec)
        assert resources_used(spec)["efficiency"]["chunked_lm_head"] is chunked
        runs[chunked] = [m for m in RunFiles(spec.run_dir).read_metrics() if "loss" in m and "eval_loss" not in m]
    keys = ["loss", "logps/chosen", "logps/rejected", "rewards/margins", "rewards/chosen", "entropy",
            "logits/chosen", "logits/rejected", "mean_token_accuracy", "num_tokens"]
    chunked, full = ([[m[k] for k in keys] for m in runs[c]] for c in (True, False))
    print(f"chunked {chunked}\nfull logits {full}")
    assert len(full) == 3 and any(abs(m[keys.index("rewards/margins")]) > 1e-4 for m in full[1:])
    for a, b in zip(chunked, full):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5)


def test_full_logits_lm_head_returns_trls_fields_and_gradients(tiny_models):
    """Field by field against TRL's add_fused_lm_head on one batch with padding, prompt masks and labels the
    model predicts (so is_top1 is true somewhere): log-probs and their gradient, entropy, mean logits,
    top-1 and WPO's log-sum-of-squared-probs."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from providers.training.recipes.dpo import add_logits_lm_head

    fields = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"], dtype=torch.float32)
    input_ids = torch.randint(0, model.config.vocab_size, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 8:] = 0
    with torch.no_grad():
        greedy = model(input_ids=input_ids).logits.argmax(-1)
    input_ids[:, 1::2] = greedy[:, :-1:2]  # every other token is the model's own top-1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100  # the prompt
    results = []
    for patch in (add_fused_lm_head, add_logits_lm_head):
        patch(model, outputs=fields)
        model.zero_grad()
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        out.log_probs.sum().backward()
        results.append((out, model.lm_head.weight.grad.clone(), model.model.layers[0].mlp.up_proj.weight.grad.clone()))
    (trl_out, *trl_grads), (ours, *our_grads) = results
    assert trl_out.is_top1.any() and torch.equal(ours.is_top1, trl_out.is_top1)
    assert torch.equal(ours.label_mask, trl_out.label_mask)
    for f in ("log_probs", "entropy", "mean_logits", "log_sum_sq_probs"):
        mask = trl_out.label_mask
        torch.testing.assert_close(getattr(ours, f)[mask], getattr(trl_out, f)[mask], rtol=1e-5, atol=1e-5, msg=f)
    torch.testing.assert_close(ours.log_probs, trl_out.log_probs, rtol=1e-5, atol=1e-5)
    for a, b in zip(our_grads, trl_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    plain = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
    assert plain.logits.shape == (3, 12, model.config.vocab_size) and plain.loss is not None  # generation path


def test_padding_free_cached_logit_batches_give_the_same_logits(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from providers.training.recipes.distill import CachedLogitsCollator
    from providers.training.recipes.teacher import answer_batch
    from providers.training.spec import TeacherSpec

    tok = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"]).eval()
    prompts = [[{"role": "user", "content": f"reverse: {' '.join('abcdefgh'[: 3 + i])}"}] for i in range(4)]
    with torch.no_grad():
        rows = answer_batch(teacher, tok, prompts, TeacherSpec(teacher_model="t", top_k=5, max_new_tokens=6))
    # As the trainer's dataset gives them (with_format("torch")): tensors.
    rows = [{k: torch.tensor(r[k]) for k in ("input_ids", "completion_start", "topk_ids", "topk_logprobs")} for r in rows]
    padded = CachedLogitsCollator(tok.pad_token_id, 128)(rows)
    flat = CachedLogitsCollator(tok.pad_token_id, 128, padding_free=True)(rows)
    assert flat["input_ids"].shape[0] == 1 and "attention_mask" not in flat
    assert flat["input_ids"].shape[1] == sum(len(r["input_ids"]) for r in rows) < padded["input_ids"].numel()
    with torch.no_grad():
        a = teacher(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], use_cache=False).logits
        b = teacher(input_ids=flat["input_ids"], position_ids=flat["position_ids"], use_cache=False).logits
    mask_a, mask_b = padded["labels"][:, 1:] != -100, flat["labels"][:, 1:] != -100
    assert mask_a.sum() == mask_b.sum() > 0
    torch.testing.assert_close(a[:, :-1][mask_a], b[:, :-1][mask_b], rtol=1e-4, atol=1e-4)
    assert torch.equal(padded["topk_ids"][:, :-1][mask_a], flat["topk_ids"][:, :-1][mask_b])


# -- refusals ---------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only refusals")
@pytest.mark.parametrize("knob, words", [
    ({"use_liger_kernel": True}, ["use_liger_kernel", "GPU"]),
    ({"attn_implementation": "flash_attention_2"}, ["attn_implementation", "GPU", "sdpa"]),
    ({"attn_implementation": "kernels"}, ["attn_implementation", "GPU"]),
])
def test_knob_this_host_cannot_run_is_refused_naming_the_field(knob, words):
    with pytest.raises(ValueError) as e:
        efficiency.check_supported(EfficiencySpec(**knob))
    assert all(w in str(e.value) for w in words), str(e.value)


def test_torch_compile_without_a_compiler_is_refused(monkeypatch):
    monkeypatch.setattr(efficiency, "_cuda_capability", lambda: None)
    monkeypatch.setattr(efficiency.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="torch_compile.*C\\+\\+ compiler"):
        efficiency.check_supported(EfficiencySpec(torch_compile=True))


def test_4bit_without_bitsandbytes_is_refused(monkeypatch):
    efficiency.four_bit_trains_here.cache_clear()
    monkeypatch.setattr(efficiency, "_has", lambda module: module != "bitsandbytes")
    try:
        with pytest.raises(ValueError, match="algorithm_config.quantize_base: .*bitsandbytes"):
            efficiency.check_4bit("algorithm_config.quantize_base")
    finally:
        efficiency.four_bit_trains_here.cache_clear()


@pytest.mark.parametrize("method, fields, words", [
    ("sft", {"efficiency": EfficiencySpec(load_in_4bit=True)}, ["load_in_4bit", "PEFT"]),
    ("sft", {"efficiency": EfficiencySpec(precompute_ref_log_probs=True)}, ["precompute_ref_log_probs", "DPO"]),
    ("dpo", {"efficiency": EfficiencySpec(padding_free=True)}, ["padding_free", "dpo"]),
    ("sft", {"efficiency": EfficiencySpec(group_by_length=True), "data": {"packed": True}}, ["group_by_length"]),
    ("sft", {"efficiency": EfficiencySpec(padding_free=True), "peft": PeftSpec(method="prompt_tuning")},
     ["padding_free", "prompt_tuning"]),
])
def test_combination_that_cannot_work_is_refused(tmp_path, method, fields, words):
    with pytest.raises(ValueError) as e:
        make_spec(tmp_path, [], method=method, model="m", **fields)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_request_fields_become_the_spec(tmp_path, tiny_models):
    from llama_stack.apis.post_training import EfficiencyConfig

    from providers.api.paths import ProviderDefaults
    from providers.api.requests import TrainingConfig
    from providers.api.to_spec import build_job_spec, peft_spec

    def spec_for(**tc):
        config = TrainingConfig(n_epochs=1, data_config={"dataset_id": "d", "batch_size": 2, "shuffle": True,
                                                         "data_format": "instruct"}, **tc)
        return build_job_spec(job_uuid="j", method="sft", model=tiny_models["student"], training_config=config,
                              run_dir=str(tmp_path), train_file="t.jsonl", validation_file=None,
                              defaults=ProviderDefaults(data_dir=str(tmp_path)))

    e = spec_for(padding_free=True, gradient_checkpointing=True, group_by_length=True).efficiency
    assert (e.padding_free, e.gradient_checkpointing, e.group_by_length) == (True, True, True)
    e = spec_for(efficiency_config=EfficiencyConfig(enable_activation_checkpointing=True)).efficiency
    assert e.gradient_checkpointing  # Llama Stack's own field means the same
    with pytest.raises(ValueError, match="enable_activation_offloading"):
        spec_for(efficiency_config=EfficiencyConfig(enable_activation_offloading=True))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="training_config.use_liger_kernel"):
            spec_for(use_liger_kernel=True)
    from llama_stack.apis.post_training import LoraFinetuningConfig

    lora = LoraFinetuningConfig(lora_attn_modules=["q_proj"], apply_lora_to_mlp=False, apply_lora_to_output=False,
                                rank=4, alpha=8, quantize_base=True)
    if efficiency.four_bit_trains_here() is None:
        assert peft_spec(lora).quantize_base


def test_trainer_arguments_carry_the_knobs(tmp_path, tiny_models):
    from providers.training.components import load_model, trainer_args

    spec = make_spec(tmp_path, [], model=tiny_models["student"], name="args", data={"shuffle": True},
                     efficiency=EfficiencySpec(torch_compile=True, gradient_checkpointing=True, group_by_length=True,
                                               attn_implementation="eager"))
    args = trainer_args(spec, num_rows=8, has_eval=False)
    assert args["torch_compile"] is True and args["use_liger_kernel"] is False
    assert args["activation_checkpointing"] is True
    assert args["activation_checkpointing_kwargs"] == {"use_reentrant": False}
    assert args["train_sampling_strategy"] == "group_by_length"
    assert load_model(spec.model, spec).config._attn_implementation == "eager"
    assert trainer_args(make_spec(tmp_path, [], model="m", name="plain"), 8, False)["activation_checkpointing"] is False
