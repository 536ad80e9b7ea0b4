"""What Llama Stack 0.2.12's own request shapes mean here (issue 17).

- LoRA module names are torchtune's (`output_proj`, `apply_lora_to_mlp`, `apply_lora_to_output`): each
  becomes the model's own module, and a name the model lacks is a 400 naming the field.
- A request without `dtype` takes the provider config's dtype (the typed client sends no default).
- An adapter trained from a hub id names that id (and revision) as its base, not this machine's cache path.

The unit tests build architectures from configs alone (no weights); the slow ones go through the real
`llama-stack-client` against `llama stack run` (inline::trl and remote::trl_fsdp).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import hf_cache_with, wait_for_job
from conftest import kill_leftover_processes
from llama_stack.apis.post_training import LoraFinetuningConfig

from providers.api.paths import hub_origin
from providers.api.requests import PeftFinetuningConfig, TrainingConfig
from providers.api.to_spec import LORA_MODULE_NAMES, peft_spec

REPO_ROOT = Path(__file__).resolve().parent.parent
HUB_ID = "tiny-org/compat-student"
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=32100)


def lora(attn, mlp=False, output=False) -> LoraFinetuningConfig:
    return LoraFinetuningConfig(type="LoRA", lora_attn_modules=attn, apply_lora_to_mlp=mlp,
                                apply_lora_to_output=output, rank=4, alpha=8)


def config_dir(tmp_path: Path, model_type: str) -> str:
    """A model directory holding only a config.json of `model_type` (tiny sizes, no weights)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, **SMALL) if model_type != "gpt2" else AutoConfig.for_model(
        "gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=100)
    out = tmp_path / model_type
    config.save_pretrained(out)
    return str(out)


# -- unit: the name table, checked against each architecture's real modules ------------------------------
@pytest.mark.parametrize("model_type", sorted(LORA_MODULE_NAMES))
def test_llama_stack_lora_names_exist_in_every_supported_architecture(tmp_path, model_type):
    from providers.training.components import model_modules

    path = config_dir(tmp_path, model_type)
    spec = peft_spec(lora(["q_proj", "k_proj", "v_proj", "output_proj"], mlp=True, output=True), path)
    expected = {t for names in LORA_MODULE_NAMES[model_type].values() for t in names}
    assert set(spec.target_modules) == expected
    assert "output_proj" not in spec.target_modules
    # Each target is a Linear (or GPT-2's Conv1D) somewhere in the model, as peft will look for it.
    _, modules = model_modules(path)
    for target in spec.target_modules:
        kinds = {kind for name, kind in modules.items() if name == target or name.endswith("." + target)}
        assert kinds and kinds <= {"Linear", "Conv1D"}, (target, kinds)


def test_output_proj_is_o_proj_for_llama(tmp_path):
    spec = peft_spec(lora(["q_proj", "v_proj", "output_proj"]), config_dir(tmp_path, "llama"))
    assert spec.target_modules == ["q_proj", "v_proj", "o_proj"]
    # The model's own name passes through; the MLP and LM head come from the two flags.
    spec = peft_spec(lora(["o_proj"], mlp=True, output=True), config_dir(tmp_path, "qwen2"))
    assert spec.target_modules == ["o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def test_fused_projections_of_phi3_and_gpt2(tmp_path):
    assert peft_spec(lora(["q_proj", "v_proj", "output_proj"], mlp=True),
                     config_dir(tmp_path, "phi3")).target_modules == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert peft_spec(lora(["q_proj", "output_proj"], mlp=True),
                     config_dir(tmp_path, "gpt2")).target_modules == ["c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def test_a_module_the_model_lacks_is_refused_naming_the_field(tmp_path):
    llama = config_dir(tmp_path, "llama")
    with pytest.raises(ValueError, match=r"algorithm_config\.lora_attn_modules: \['attn_out'\].*'llama'.*o_proj"):
        peft_spec(lora(["q_proj", "attn_out"]), llama)
    # A Hugging Face name of another architecture is no module of this one either.
    with pytest.raises(ValueError, match=r"algorithm_config\.lora_attn_modules: \['c_attn'\]"):
        peft_spec(lora(["c_attn"]), llama)
    with pytest.raises(ValueError, match=r"algorithm_config\.target_modules: \['wq'\]"):
        peft_spec(PeftFinetuningConfig(method="lora", target_modules=["q_proj", "wq"]), llama)
    with pytest.raises(ValueError, match=r"algorithm_config\.lora_attn_modules: no modules to adapt"):
        peft_spec(lora([]), llama)


def test_training_config_without_dtype_leaves_it_to_the_provider():
    tc = TrainingConfig(n_epochs=1)
    assert tc.dtype is None and "dtype" not in tc.model_fields_set
    assert TrainingConfig(n_epochs=1, dtype="bfloat16").dtype == "bf16"
    with pytest.raises(ValueError, match="dtype"):
        TrainingConfig(n_epochs=1, dtype="int8")


def test_hub_origin_only_for_a_cache_snapshot_of_that_id(tmp_path):
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / ("a" * 40)
    assert hub_origin("org/name", str(snapshot)) == ("org/name", "a" * 40)
    assert hub_origin("org/other", str(snapshot)) == (None, None)
    assert hub_origin(str(snapshot), str(snapshot)) == (None, None)
    assert hub_origin("student", str(tmp_path / "student")) == (None, None)


# -- end to end through llama-stack-client ----------------------------------------------------------------
def sft(client, job_uuid, model, training_config, algorithm_config=None):
    return client.post_training.supervised_fine_tune(
        job_uuid=job_uuid, model=model, training_config=training_config, hyperparam_search_config={},
        logger_config={}, algorithm_config=algorithm_config)


def tc_without_dtype(dataset_id="toy", steps=3, **extra) -> dict:
    """A training_config as a 0.2.12 user writes it, with no dtype: the provider config decides."""
    return {"n_epochs": 1, "max_steps_per_epoch": steps,
            "data_config": {"dataset_id": dataset_id, "batch_size": 4, "shuffle": True},
            "optimizer_config": {"optimizer_type": "adamw", "lr": 5e-3, "weight_decay": 0.0, "num_warmup_steps": 0},
            **extra}


def completed(client, job_uuid):
    status = wait_for_job(client, job_uuid, timeout=600)
    res = status.resources_allocated or {}
    assert status.status == "completed", (status.status, res.get("error"), res.get("log_file"))
    return status


def files_mentioning(directory: Path, text: str) -> list[str]:
    return [str(p) for p in directory.rglob("*") if p.is_file() and p.suffix in (".json", ".md", ".jinja", ".txt")
            and text in p.read_text(errors="replace")]


@pytest.fixture(scope="module")
def hf_home(tiny_models, tmp_path_factory) -> Path:
    return hf_cache_with(tiny_models["student"], HUB_ID, tmp_path_factory.mktemp("compat_hf_home"))


@pytest.fixture(scope="module")
def inline(llama_stack_factory, run_yaml, tmp_path_factory, hf_home, toy_data):
    server = llama_stack_factory(run_yaml, tmp_path_factory.mktemp("compat_inline"),
                                 env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    client = server.client()
    client.datasets.register(purpose="post-training/messages", source={"type": "rows", "rows": toy_data["instruct"][:32]},
                             dataset_id="toy")
    return server, client


@pytest.mark.slow
def test_lora_from_a_hub_id_adapts_o_proj_and_names_the_hub_model(inline, hf_home, tiny_models):
    """Llama Stack's full LoRA request, from a hub id, without dtype: the adapter covers o_proj, names
    `org/name` (and its revision) as its base, loads from that cache offline, and the run trained in the
    provider config's fp32."""
    server, client = inline
    job_uuid = "compat-lora-hub"
    sft(client, job_uuid, HUB_ID, tc_without_dtype(),
        {"type": "LoRA", "lora_attn_modules": ["q_proj", "v_proj", "output_proj"], "apply_lora_to_mlp": False,
         "apply_lora_to_output": False, "rank": 4, "alpha": 8})
    status = completed(client, job_uuid)
    run_dir = Path(status.resources_allocated["run_dir"])
    spec = json.loads((run_dir / "spec.json").read_text())
    snapshot = spec["model"]
    assert spec["dtype"] == "fp32"  # run.yaml's provider config; the request sent none
    assert "/snapshots/" in snapshot and spec["model_id"] == HUB_ID and spec["model_revision"] == Path(snapshot).name

    final = run_dir / "checkpoints" / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "v_proj", "o_proj"}
    assert config["base_model_name_or_path"] == HUB_ID and config["revision"] == Path(snapshot).name
    from safetensors import safe_open

    with safe_open(str(final / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    for layer in range(2):
        for ab in ("lora_A", "lora_B"):
            assert any(f"layers.{layer}.self_attn.o_proj.{ab}" in k for k in keys), keys
    assert not files_mentioning(final, snapshot), "the cache path leaked into the saved adapter"

    # Another process, offline, with only that Hugging Face cache: the adapter loads over its named base.
    load = (
        "import json, sys; from transformers import AutoModelForCausalLM; from peft import PeftModel\n"
        "c = json.load(open(sys.argv[1] + '/adapter_config.json'))\n"
        "base = AutoModelForCausalLM.from_pretrained(c['base_model_name_or_path'], revision=c['revision'])\n"
        "m = PeftModel.from_pretrained(base, sys.argv[1])\n"
        "o = m.base_model.model.model.layers[0].self_attn.o_proj\n"
        "print(float(o.lora_B['default'].weight.abs().sum()) > 0)"  # trained: B starts at zero
    )
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", load, str(final)], env=env, cwd=str(hf_home), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.slow
def test_merged_model_from_a_hub_id_holds_no_cache_path(inline):
    server, client = inline
    job_uuid = "compat-merge-hub"
    sft(client, job_uuid, HUB_ID, tc_without_dtype(steps=2),
        {"type": "PEFT", "method": "lora", "target_modules": ["q_proj", "o_proj"], "rank": 4, "merge_adapter": True})
    status = completed(client, job_uuid)
    run_dir = Path(status.resources_allocated["run_dir"])
    snapshot = json.loads((run_dir / "spec.json").read_text())["model"]
    merged = run_dir / "checkpoints" / "final" / "merged"
    assert (merged / "config.json").exists()
    assert json.loads((merged / "config.json").read_text()).get("_name_or_path") in (None, HUB_ID)
    assert not files_mentioning(run_dir / "checkpoints", snapshot)


@pytest.mark.slow
def test_a_lora_module_the_model_lacks_is_a_400(inline, tiny_models):
    from llama_stack_client import BadRequestError

    _, client = inline
    with pytest.raises(BadRequestError, match=r"algorithm_config\.lora_attn_modules.*'attn_out'"):
        sft(client, "compat-bogus", tiny_models["student"], tc_without_dtype(),
            {"type": "LoRA", "lora_attn_modules": ["q_proj", "attn_out"], "apply_lora_to_mlp": False,
             "apply_lora_to_output": False, "rank": 4, "alpha": 8})
    assert "compat-bogus" not in {j.job_uuid for j in client.post_training.job.list()}


@pytest.fixture(scope="module")
def remote(tmp_path_factory, llama_stack_factory, toy_data, tiny_models):
    from test_fsdp_service import Service

    root = tmp_path_factory.mktemp("compat_fsdp")
    service = Service(root / "service")
    server = llama_stack_factory(REPO_ROOT / "run_fsdp.yaml", root / "stack",
                                 env={"TRL_FSDP_URL": service.url, "TRL_FSDP_STACK_DIR": str(root / "stack")})
    client = server.client()
    client.datasets.register(purpose="post-training/messages", source={"type": "rows", "rows": toy_data["instruct"][:32]},
                             dataset_id="toy")
    yield client, service
    service.stop()
    kill_leftover_processes(service.data_dir)


@pytest.mark.slow
def test_remote_job_without_dtype_takes_the_service_default(remote, tiny_models):
    """remote::trl_fsdp forwards no dtype the client did not send, so the service's own default (fp32) holds;
    its LoRA names map the same way and a bad one is a 400 through both hops."""
    from llama_stack_client import BadRequestError

    client, service = remote
    sft(client, "compat-remote", tiny_models["student"], tc_without_dtype(steps=2, torch_run_config={"nproc_per_node": 1}),
        {"type": "LoRA", "lora_attn_modules": ["q_proj", "output_proj"], "apply_lora_to_mlp": False,
         "apply_lora_to_output": False, "rank": 4, "alpha": 8})
    spec = json.loads((service.runs_dir / "compat-remote" / "spec.json").read_text())
    assert spec["dtype"] == "fp32"
    assert spec["peft"]["target_modules"] == ["q_proj", "o_proj"]
    completed(client, "compat-remote")
    with pytest.raises(BadRequestError, match=r"algorithm_config\.lora_attn_modules.*'attn_out'"):
        sft(client, "compat-remote-bogus", tiny_models["student"], tc_without_dtype(),
            {"type": "LoRA", "lora_attn_modules": ["attn_out"], "apply_lora_to_mlp": False,
             "apply_lora_to_output": False, "rank": 4, "alpha": 8})
