"""Request -> JobSpec for every method in the method table, without training or servers.

Each request goes the way the FSDP service takes it: the service's request body model, the method from the
algorithm_config type (providers/training/methods.py), then `api.to_spec.prepare_job` with a tiny model.
"""

from __future__ import annotations

import importlib
import json
import re
import typing
from pathlib import Path

import pytest
import torch
from pydantic import TypeAdapter

from providers.api.paths import ProviderDefaults
from providers.api.requests import (
    ALGORITHM_CONFIGS,
    WRITTEN_CONFIGS,
    PreferenceAlgorithmConfig,
    PreferenceOptimizeRequest,
    SFTAlgorithmConfig,
    SupervisedFineTuneRequest,
    TrainingConfig,
)
from providers.api.to_spec import efficiency_spec, method_of, prepare_job
from providers.training.methods import (
    METHODS,
    PREFERENCE_CALL,
    SERVABLE,
    SFT_CALL,
    RowKind,
    method_for,
    recipe_module,
)
from providers.training.spec import JobSpec, check_name

LORA = {"type": "LoRA", "lora_attn_modules": ["q_proj", "v_proj"], "apply_lora_to_mlp": False,
        "apply_lora_to_output": False, "rank": 4, "alpha": 8}
DPO_0_2_12 = {"reward_scale": 0.2, "reward_clip": 5.0, "epsilon": 0.1, "gamma": 0.0}  # no `type`: DPO
EXACT = {"type": "string_check", "name": "exact", "input": "{{ sample.output_text }}",
         "reference": "{{ item.expected_answer }}", "operation": "eq"}
GRPO = {"type": "grpo", "graders": [EXACT], "num_generations": 4, "max_completion_length": 16, "beta": 0.04,
        "loss_type": "dr_grpo", "scale_rewards": "none", "temperature": 0.9, "epsilon": 0.3, "num_iterations": 2}

# The fields an algorithm_config type cannot do without
REQUIRED = {"distillation": {"teacher_model": "t"}, "PEFT": {"method": "lora"}, "grpo": {"graders": [EXACT]},
            "LoRA": {"lora_attn_modules": [], "apply_lora_to_mlp": True, "apply_lora_to_output": False, "rank": 4,
                     "alpha": 8},
            "QAT": {"quantizer_name": "q", "group_size": 32}}

# (case, call, algorithm_config, method, what the spec must hold)
CASES = [
    ("sft-full", SFT_CALL, None, "sft", lambda s: s.peft is None),
    ("sft-lora", SFT_CALL, LORA, "sft", lambda s: s.peft.peft_type == "lora" and s.peft.target_modules == ["q_proj", "v_proj"]),
    ("sft-peft", SFT_CALL, {"type": "PEFT", "method": "ia3"}, "sft", lambda s: s.peft.peft_type == "ia3"),
    ("distill", SFT_CALL, {"type": "distillation", "teacher_model": "TEACHER", "method": "logit",
                           "kl_direction": "reverse"}, "distill",
     lambda s: s.distill.kl_direction == "reverse" and s.distill.teacher_model),
    ("dpo-0.2.12", PREFERENCE_CALL, DPO_0_2_12, "dpo", lambda s: s.dpo.beta == 0.2),
    ("dpo", PREFERENCE_CALL, {"type": "dpo", "beta": 0.3}, "dpo", lambda s: s.dpo.beta == 0.3),
    ("dpo-default", PREFERENCE_CALL, None, "dpo", lambda s: s.dpo.beta == 0.1),
    ("kto", PREFERENCE_CALL, {"type": "kto", "beta": 0.2, "desirable_weight": 1.5, "undesirable_weight": 0.5},
     "kto", lambda s: (s.kto.beta, s.kto.desirable_weight, s.kto.undesirable_weight) == (0.2, 1.5, 0.5)),
    ("kto-defaults", PREFERENCE_CALL, {"type": "kto"}, "kto", lambda s: s.kto.beta == 0.1),
    ("orpo", PREFERENCE_CALL, {"type": "orpo", "beta": 0.25}, "orpo", lambda s: s.orpo.beta == 0.25),
    ("cpo-simpo", PREFERENCE_CALL, {"type": "cpo", "loss_type": "simpo", "simpo_gamma": 1.0, "cpo_alpha": 0.0},
     "cpo", lambda s: (s.cpo.loss_type, s.cpo.simpo_gamma, s.cpo.cpo_alpha) == ("simpo", 1.0, 0.0)),
    # every preference method takes adapters
    ("dpo-lora", PREFERENCE_CALL, {"type": "dpo", "peft": LORA}, "dpo", lambda s: s.peft.peft_type == "lora"),
    ("kto-ia3", PREFERENCE_CALL, {"type": "kto", "peft": {"type": "PEFT", "method": "ia3"}}, "kto",
     lambda s: s.peft.peft_type == "ia3" and s.kto.beta == 0.1),
    ("orpo-lora", PREFERENCE_CALL, {"type": "orpo", "peft": LORA}, "orpo",
     lambda s: s.peft.target_modules == ["q_proj", "v_proj"]),
    ("cpo-lora", PREFERENCE_CALL, {"type": "cpo", "peft": LORA}, "cpo", lambda s: s.peft.peft_type == "lora"),
    ("grpo", PREFERENCE_CALL, GRPO, "grpo",
     lambda s: s.grpo.model_dump(exclude={"use_vllm", "row_keyed_sampling"}) == {k: v for k, v in GRPO.items()
                                                                                 if k != "type"}),
    ("grpo-lora", PREFERENCE_CALL, {**GRPO, "peft": LORA}, "grpo",
     lambda s: s.peft.peft_type == "lora" and s.peft.target_modules == ["q_proj", "v_proj"] and s.grpo.beta == 0.04),
]


@pytest.fixture(scope="module")
def rows(toy_data):
    return {"completion": toy_data["instruct"][:8], "preference": toy_data["preference"][:8],
            "graded_prompt": toy_data["instruct"][:8]}


def training_config(**extra) -> dict:
    return {"n_epochs": 1, "max_steps_per_epoch": 2, "data_config": {"dataset_id": "d", "batch_size": 2}, **extra}


def body(call: str, algorithm_config, model: str, **tc) -> dict:
    b = {"job_uuid": "j", "training_config": training_config(**tc)}
    if call == PREFERENCE_CALL:
        b.update(finetuned_model="result", model=model)
    else:
        b["model"] = model
    if algorithm_config is not None:
        b["algorithm_config"] = algorithm_config
    return b


def to_spec(tmp_path: Path, call: str, algorithm_config, model: str, rows: dict, check_host: bool = True,
            **tc) -> JobSpec:
    """The service's path: its body model, the method from the algorithm_config type, prepare_job."""
    model_cls = PreferenceOptimizeRequest if call == PREFERENCE_CALL else SupervisedFineTuneRequest
    req = model_cls.model_validate(body(call, algorithm_config, model, **tc))
    method = method_of(call, req.algorithm_config)
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    return prepare_job(
        job_uuid="j", run_dir=run_dir, method=method, model=model, training_config=req.training_config,
        algorithm_config=req.algorithm_config, logger_config=None, checkpoint_dir=None,
        defaults=ProviderDefaults(data_dir=str(tmp_path)), train_rows=rows[METHODS[method].rows],
        validation_rows=None, result_name="result" if call == PREFERENCE_CALL else None, check_host=check_host,
    )


@pytest.mark.parametrize("case, call, algorithm_config, method, holds", CASES, ids=[c[0] for c in CASES])
def test_request_becomes_the_methods_spec(tmp_path, tiny_models, rows, case, call, algorithm_config, method, holds):
    if algorithm_config and algorithm_config.get("teacher_model") == "TEACHER":
        algorithm_config = {**algorithm_config, "teacher_model": tiny_models["teacher"]}
    spec = to_spec(tmp_path, call, algorithm_config, tiny_models["student"], rows)
    assert spec.method == method
    assert holds(spec), spec.model_dump()
    section = METHODS[method].section
    assert section is None or getattr(spec, section) is not None
    for other in {m.section for m in METHODS.values()} - {section, None}:
        assert getattr(spec, other) is None, other  # only the method's own section
    spec.save()
    assert JobSpec.load(spec.run_dir) == spec  # the training process reads back the same spec
    first = json.loads(Path(spec.data.train_file).read_text().splitlines()[0])
    assert ("chosen" in first) == (METHODS[method].rows == "preference"), first


def test_every_method_is_covered_by_a_case():
    requestable = {name for name, m in METHODS.items() if m.call}
    assert requestable == {c[3] for c in CASES}
    assert {"kto", "orpo", "cpo", "grpo"} <= requestable
    # every preference method is also requested with adapters
    assert {n for n, m in METHODS.items() if m.call == PREFERENCE_CALL} == {
        c[3] for c in CASES if c[1] == PREFERENCE_CALL and (c[2] or {}).get("peft")}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_table_entry_has_a_recipe_a_request_type_and_a_row_kind(name):
    m = METHODS[name]
    recipe = importlib.import_module(recipe_module(name))
    assert callable(recipe.train)
    assert m.rows in typing.get_args(RowKind)
    if m.section is not None:
        assert JobSpec.section_model(m.section)  # a settings model for the section exists
    if m.call is None:  # teacher: started by pipelines, not by a Llama Stack call
        assert not m.algorithm_types and not m.servable
        return
    union = SFTAlgorithmConfig if m.call == SFT_CALL else PreferenceAlgorithmConfig
    for algorithm_type in m.algorithm_types:
        assert method_for(m.call, algorithm_type) == name
        if algorithm_type is not None:  # the call's union holds the type's request model, and it parses
            model = ALGORITHM_CONFIGS[algorithm_type]
            assert model in typing.get_args(typing.get_args(union)[0])
            parsed = TypeAdapter(union).validate_python({"type": algorithm_type, **REQUIRED.get(algorithm_type, {})})
            assert type(parsed) is model and parsed.type == algorithm_type
            if m.settings is not None and model not in WRITTEN_CONFIGS:  # generated: the settings, type and peft
                assert issubclass(model, m.settings) and set(model.model_fields) == {*m.settings.model_fields,
                                                                                     "type", "peft"}
            if m.call == PREFERENCE_CALL:
                assert "peft" in model.model_fields
    assert m.servable == (name in SERVABLE)


def test_cli_methods_come_from_the_table(tmp_path):
    from providers.cli.jobfile import REQUESTABLE as CLI_METHODS
    from providers.cli.jobfile import job_request

    assert set(CLI_METHODS) == {n for n, m in METHODS.items() if m.call}
    job = tmp_path / "kto.yaml"
    job.write_text("method: kto\nmodel: /m\ndataset: {id: prefs}\nalgorithm: {beta: 0.2}\n")
    request = job_request(job)
    assert request.route == "preference-optimize"
    assert request.body["algorithm_config"] == {"type": "kto", "beta": 0.2}
    assert request.body["finetuned_model"] == "/m"


@pytest.mark.parametrize("call, algorithm_config, tc, needles", [
    (PREFERENCE_CALL, {"type": "kto", "beta": 0}, {}, ["algorithm_config", "beta"]),
    (PREFERENCE_CALL, {"type": "kto", "desirable_weight": -1}, {}, ["algorithm_config", "desirable_weight"]),
    (PREFERENCE_CALL, {"type": "kto", "undesirable_weight": "x"}, {}, ["algorithm_config", "undesirable_weight"]),
    (PREFERENCE_CALL, {"type": "orpo", "beta": -0.5}, {}, ["algorithm_config", "beta"]),
    (PREFERENCE_CALL, {"type": "orpo", "beta": float("inf")}, {}, ["algorithm_config", "beta"]),
    (PREFERENCE_CALL, {"type": "ppo"}, {}, ["algorithm_config", "ppo", "kto", "orpo"]),
    (PREFERENCE_CALL, {"type": "dpo", "loss_type": "nope"}, {}, ["algorithm_config", "loss_type"]),
    (SFT_CALL, {"type": "kto"}, {}, ["algorithm_config", "kto"]),  # kto is not a supervised_fine_tune type
    (PREFERENCE_CALL, {"type": "kto"}, {"padding_free": True}, ["padding_free", "kto"]),
    (PREFERENCE_CALL, {"type": "kto"}, {"group_by_length": True}, ["group_by_length", "kto"]),
    (PREFERENCE_CALL, {"type": "orpo"}, {"precompute_ref_log_probs": True}, ["precompute_ref_log_probs", "orpo"]),
    (PREFERENCE_CALL, {"type": "kto"}, {"max_seq_len": 0}, ["training_config", "max_seq_len"]),
    (PREFERENCE_CALL, {"type": "orpo"}, {"scheduling": {"priority": 1000}}, ["training_config.scheduling.priority"]),
    (PREFERENCE_CALL, {"type": "orpo"}, {"data_config": {"dataset_id": "d", "batch_size": -1}},
     ["training_config", "batch_size"]),
])
def test_a_bad_field_is_a_value_error_naming_it(tmp_path, tiny_models, rows, call, algorithm_config, tc, needles):
    with pytest.raises(ValueError) as e:
        to_spec(tmp_path, call, algorithm_config, tiny_models["student"], rows, **tc)
    assert all(n in str(e.value) for n in needles), str(e.value)


def test_completion_rows_for_a_preference_method_name_the_dataset(tmp_path, tiny_models, rows):
    with pytest.raises(ValueError, match="training_config.data_config.dataset_id.*chosen"):
        to_spec(tmp_path, PREFERENCE_CALL, {"type": "orpo"}, tiny_models["student"],
                {"preference": rows["completion"]})


def test_unknown_algorithm_type_names_the_field():
    accepted = [t for m in METHODS.values() if m.call == PREFERENCE_CALL for t in m.algorithm_types if t]
    assert accepted[:3] == ["dpo", "kto", "orpo"] and "cpo" in accepted
    with pytest.raises(ValueError, match=rf"algorithm_config.type: 'ppo' .*{re.escape(str(accepted))}"):
        method_for(PREFERENCE_CALL, "ppo")


@pytest.mark.parametrize("field", ["job_uuid", "dataset_id"])
@pytest.mark.parametrize("value", ["../x", ".hidden", "a/b", "", "x" * 129, "a\nb"])
def test_names_have_one_rule_and_one_message(field, value):
    with pytest.raises(ValueError, match=f"^{field}: .* must be 1-128 letters, digits"):
        check_name(value, field)


def test_check_host_false_leaves_the_capability_checks_to_the_training_node(tmp_path, tiny_models, rows):
    """A job that runs on other machines (a cluster launcher) is not refused for what this host lacks."""
    if torch.cuda.is_available():
        pytest.skip("this host can run flash attention checks; the test needs a host without CUDA")
    tc = TrainingConfig(**training_config(attn_implementation="flash_attention_2"))
    with pytest.raises(ValueError, match="training_config.attn_implementation"):
        efficiency_spec(tc)
    assert efficiency_spec(tc, check_host=False).attn_implementation == "flash_attention_2"
    spec = to_spec(tmp_path, PREFERENCE_CALL, {"type": "kto"}, tiny_models["student"], rows, check_host=False,
                   attn_implementation="flash_attention_2")
    assert spec.efficiency.attn_implementation == "flash_attention_2"
    with pytest.raises(ValueError, match="training_config.attn_implementation"):
        to_spec(tmp_path / "again", PREFERENCE_CALL, {"type": "kto"}, tiny_models["student"], rows,
                attn_implementation="flash_attention_2")


def test_both_providers_pass_the_preference_algorithm_config_through():
    """The inline provider and the remote adapter take every preference method's config (the 0.2.12 server
    validates the body against this annotation) and the adapter forwards it with its `type`."""
    import inspect

    from providers.inline_trl.provider import TrlPostTrainingImpl
    from providers.remote_fsdp.adapter import TrlFsdpAdapter

    for provider in (TrlPostTrainingImpl, TrlFsdpAdapter):
        annotation = inspect.signature(provider.preference_optimize).parameters["algorithm_config"].annotation
        assert annotation == PreferenceAlgorithmConfig, provider
    for cfg in ({"type": "kto", "beta": 0.3}, {"type": "orpo", "beta": 0.3}, {"type": "cpo", "loss_type": "simpo"},
                DPO_0_2_12):
        parsed = TypeAdapter(PreferenceAlgorithmConfig).validate_python(cfg)
        forwarded = parsed.model_dump(mode="json")  # what the adapter sends the service
        assert method_of(PREFERENCE_CALL, PreferenceOptimizeRequest.model_validate(
            body(PREFERENCE_CALL, forwarded, "m")).algorithm_config) == cfg.get("type", "dpo")


@pytest.mark.parametrize("algorithm_config, loc", [
    ({"reward_scale": -1, "reward_clip": 5.0, "epsilon": 0.1, "gamma": 0.0}, ("algorithm_config", "reward_scale")),
    ({"type": "dpo", "loss_weights": "x"}, ("algorithm_config", "loss_weights")),
    ({"type": "kto", "beta": 0}, ("algorithm_config", "beta")),
    ({"type": "orpo", "beta": 0}, ("algorithm_config", "beta")),
    ({"type": "ppo"}, ("algorithm_config",)),
    ("dpo", ("algorithm_config",)),
])
def test_preference_config_errors_keep_0_2_12_field_paths(algorithm_config, loc):
    """A 0.2.12 client's DPO error names `algorithm_config.FIELD` (no method tag in between), as before
    KTO and ORPO joined DPO on preference_optimize."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        PreferenceOptimizeRequest.model_validate(body(PREFERENCE_CALL, algorithm_config, "m"))
    assert [err["loc"] for err in e.value.errors()] == [loc], e.value.errors()


@pytest.mark.parametrize("algorithm_config, needles", [
    ({**GRPO, "graders": [{**EXACT, "reference": "{{ item.answer }}"}]},
     ["algorithm_config.graders[0].reference", "answer", "expected_answer"]),  # a column the rows lack
    ({**GRPO, "graders": [{**EXACT, "type": "python"}]}, ["algorithm_config", "graders", "python"]),
    ({**GRPO, "graders": []}, ["algorithm_config", "graders"]),
    ({k: v for k, v in GRPO.items() if k != "graders"}, ["algorithm_config", "graders"]),
    ({**GRPO, "num_generations": 1}, ["algorithm_config", "num_generations"]),
    ({**GRPO, "loss_type": "ppo"}, ["algorithm_config", "loss_type", "dr_grpo"]),
    ({**GRPO, "beta": -0.1}, ["algorithm_config", "beta"]),
    ({**GRPO, "use_vllm": True}, ["algorithm_config.use_vllm"]),
])
def test_a_bad_grpo_request_names_the_field_and_leaves_nothing(tmp_path, tiny_models, rows, algorithm_config,
                                                               needles):
    if algorithm_config.get("use_vllm") and torch.cuda.is_available():
        pytest.skip("a host with CUDA may run vLLM")
    with pytest.raises(ValueError) as e:
        to_spec(tmp_path, PREFERENCE_CALL, algorithm_config, tiny_models["student"], rows)
    assert all(n in str(e.value) for n in needles), str(e.value)


def test_grpo_rows_keep_the_columns_the_graders_read(tmp_path, tiny_models, toy_data):
    dialog = [{"messages": [{"role": "user", "content": "reverse: a b"}], "answer": "b a", "level": 1}]
    grader = {**EXACT, "reference": "{{ item.answer }}"}
    spec = to_spec(tmp_path, PREFERENCE_CALL, {**GRPO, "graders": [grader]}, tiny_models["student"],
                   {"graded_prompt": dialog})
    first = json.loads(Path(spec.data.train_file).read_text().splitlines()[0])
    assert first == {"prompt": [{"role": "user", "content": "reverse: a b"}], "answer": "b a", "level": 1}


def test_the_docs_show_every_methods_algorithm_config():
    """docs/inline-trl.md shows a request of every method the table makes requestable with a settings model."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "inline-trl.md").read_text()
    missing = [t for m in METHODS.values() if m.call and m.settings for t in m.algorithm_types
               if t and f'"type": "{t}"' not in docs]
    assert not missing, f"docs/inline-trl.md shows no algorithm_config of type {missing}"


def test_a_model_directory_is_checked_from_its_config_alone(tmp_path):
    """The service's model check reads config.json (no torch, no transformers import) within a bound: a
    config over 4 MiB is refused before it is read; the verdicts are transformers' (causal LM or not)."""
    from providers.api.paths import check_model_path
    from providers.errors import BadRequest

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    check_model_path(str(tmp_path), "model")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(BadRequest, match="not a causal LM"):
        check_model_path(str(tmp_path), "model")
    huge = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "padding": "x" * (5 << 20)}
    (tmp_path / "config.json").write_text(json.dumps(huge))
    with pytest.raises(BadRequest, match="model: .*over 4 MiB"):
        check_model_path(str(tmp_path), "model")
