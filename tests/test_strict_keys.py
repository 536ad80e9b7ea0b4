"""Unknown keys are an error at every level of a job file and of a request, naming the full key path and the
nearest accepted key: a typo never runs silently with the default (issue 20, item 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from providers.api.requests import PreferenceOptimizeRequest, SupervisedFineTuneRequest
from providers.api.to_spec import logging_spec
from providers.cli.jobfile import JobFileError, job_request
from providers.errors import BadRequest, first_validation_error
from providers.launchers.torchrun import TorchRunOptions
from providers.training.spec import FsdpSpec, SchedulingSpec

LORA = {"type": "LoRA", "lora_attn_modules": ["q_proj"], "apply_lora_to_mlp": False, "apply_lora_to_output": False,
        "rank": 4, "alpha": 8}


def job_file(tmp_path: Path, **overrides) -> Path:
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    spec = {"method": "sft", "model": "/models/m", "dataset": "d.jsonl",
            "training": {"n_epochs": 1, "batch_size": 2, "lr": 1e-3,
                         "scheduling": {"priority": 1, "resources": {"gpus": 0}}},
            "algorithm": dict(LORA), "fsdp": {"sharding_strategy": "FULL_SHARD"}, "torch_run": {"nproc_per_node": 2},
            "logger": {"report_to": []}}
    for dotted, value in overrides.items():  # "training__data_config__bacth_size" -> spec[training][data_config]...
        *parents, last = dotted.split("__")
        node = spec
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# (a typo at each level of a job file, the path the error must name, the key it must suggest)
JOB_FILE_TYPOS = [
    ({"epocs": 1}, "epocs", None),
    ({"training__bacth_size": 4}, "training.bacth_size", "batch_size"),
    ({"training__n_epoch": 2}, "training.n_epoch", "n_epochs"),
    ({"training__data_config": {"packd": True}}, "training.data_config.packd", "packed"),
    ({"training__optimizer_config": {"weight_decy": 0.1}}, "training.optimizer_config.weight_decy", "weight_decay"),
    ({"training__efficiency_config": {"enable_activation_checkpoint": True}},
     "training.efficiency_config.enable_activation_checkpoint", "enable_activation_checkpointing"),
    ({"training__scheduling__priorty": 3}, "training.scheduling.priorty", "priority"),
    ({"training__scheduling__resources__gpu": 1}, "training.scheduling.resources.gpu", "gpus"),
    ({"algorithm__rnak": 8}, "algorithm.rnak", "rank"),
    ({"fsdp__sharding_stratgy": "NO_SHARD"}, "fsdp.sharding_stratgy", "sharding_strategy"),
    ({"torch_run__nproc_per_nod": 1}, "torch_run.nproc_per_nod", "nproc_per_node"),
    ({"logger__report_too": ["tensorboard"]}, "logger.report_too", "report_to"),
]


@pytest.mark.parametrize("overrides,key_path,near", JOB_FILE_TYPOS, ids=[t[1] for t in JOB_FILE_TYPOS])
def test_a_typo_at_any_level_of_a_job_file_is_refused_naming_path_and_nearest_key(tmp_path, overrides, key_path, near):
    with pytest.raises(JobFileError) as e:
        job_request(job_file(tmp_path, **overrides))
    message = str(e.value)
    assert f"job.yaml: {key_path}: unknown key '{key_path.rsplit('.', 1)[-1]}'" in message, message
    if near:
        assert f"did you mean '{near}'?" in message, message


def test_typos_in_other_methods_algorithm_sections(tmp_path):
    for method, algorithm, key_path, near in [
        ("dpo", {"beta": 0.1, "los_type": "sigmoid"}, "algorithm.los_type", "loss_type"),
        ("kto", {"desirable_weigth": 1.0}, "algorithm.desirable_weigth", "desirable_weight"),
        ("distill", {"teacher_model": "/t", "temprature": 2.0}, "algorithm.temprature", "temperature"),
        ("distill", {"teacher_model": "/t", "student_peft": {**LORA, "alpah": 8}}, "algorithm.student_peft.alpah", "alpha"),
    ]:
        path = job_file(tmp_path, method=method, algorithm=algorithm)
        with pytest.raises(JobFileError, match=rf"{key_path}: unknown key .*did you mean '{near}'"):
            job_request(path)


def test_a_misspelt_method_gets_the_nearest(tmp_path):
    with pytest.raises(JobFileError, match=r"method: 'gpro' is not one of .*; did you mean 'grpo'\?"):
        job_request(job_file(tmp_path, method="gpro"))
    with pytest.raises(JobFileError) as e:
        job_request(job_file(tmp_path, method="reinforce"))
    assert "did you mean" not in str(e.value)


def test_the_shipped_examples_have_no_unknown_key(monkeypatch):
    monkeypatch.setenv("TRL_MODELS_DIR", "/models")
    examples = Path(__file__).resolve().parent.parent / "examples"
    for path in sorted(examples.glob("*.yaml")):
        if "pipeline" not in path.name:
            assert job_request(path).body["training_config"]


def request(call: str, **changes) -> dict:
    body = {"job_uuid": "j", "training_config": {
        "n_epochs": 1, "data_config": {"dataset_id": "d", "batch_size": 2, "shuffle": True, "data_format": "instruct"},
        "optimizer_config": {"optimizer_type": "adamw", "lr": 1e-4, "weight_decay": 0.0, "num_warmup_steps": 0},
        "efficiency_config": {"enable_activation_checkpointing": False}},
        "hyperparam_search_config": {}, "logger_config": {}}
    if call == "sft":
        body.update(model="m", algorithm_config=dict(LORA))
    else:
        body.update(finetuned_model="m", algorithm_config={"reward_scale": 0.1, "reward_clip": 5.0, "epsilon": 0.1,
                                                           "gamma": 0.0})
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = body
        for p in parents:
            node = node[p]
        node[last] = value
    return body


REQUEST_TYPOS = [
    ("sft", {"modle": "m"}, "modle", "model"),
    ("sft", {"training_config__n_epoch": 1}, "training_config.n_epoch", "n_epochs"),
    ("sft", {"training_config__data_config__bacth_size": 4}, "training_config.data_config.bacth_size", "batch_size"),
    ("sft", {"training_config__optimizer_config__lrr": 1}, "training_config.optimizer_config.lrr", "lr"),
    ("sft", {"training_config__efficiency_config__fsdp_cpu_offlaod": True},
     "training_config.efficiency_config.fsdp_cpu_offlaod", "fsdp_cpu_offload"),
    ("sft", {"algorithm_config__rnak": 4}, "algorithm_config.rnak", "rank"),
    ("sft", {"algorithm_config": {"type": "QAT", "quantizer_name": "q", "group_size": 8, "group_sise": 8}},
     "algorithm_config.group_sise", "group_size"),
    ("sft", {"algorithm_config": {"type": "PEFT", "method": "ia3", "num_virtual_token": 4}},
     "algorithm_config.num_virtual_token", "num_virtual_tokens"),
    ("sft", {"algorithm_config": {"type": "distillation", "teacher_model": "t", "kl_directon": "reverse"}},
     "algorithm_config.kl_directon", "kl_direction"),
    ("dpo", {"algorithm_config__gama": 0.0}, "algorithm_config.gama", "gamma"),
    ("dpo", {"algorithm_config": {"type": "orpo", "betta": 0.1}}, "algorithm_config.betta", "beta"),
]


@pytest.mark.parametrize("call,changes,key_path,near", REQUEST_TYPOS, ids=[t[2] for t in REQUEST_TYPOS])
def test_a_typo_at_any_level_of_a_request_is_refused_naming_path_and_nearest_key(call, changes, key_path, near):
    model = SupervisedFineTuneRequest if call == "sft" else PreferenceOptimizeRequest
    model.model_validate(request(call))  # the same request without the typo is accepted
    with pytest.raises(ValidationError) as e:
        model.model_validate(request(call, **changes))
    message = first_validation_error(e.value)
    assert message.startswith(f"{key_path}: unknown key"), message
    assert f"did you mean '{near}'?" in message, message


def test_the_extension_objects_refuse_unknown_keys_naming_the_nearest():
    for model, data, prefix, key_path, near in [
        (SchedulingSpec, {"max_retrys": 1}, "training_config.scheduling", "max_retrys", "max_retries"),
        (SchedulingSpec, {"resources": {"ram_gbs": 1}}, "training_config.scheduling", "resources.ram_gbs", "ram_gb"),
        (FsdpSpec, {"cpu_ofload": True}, "training_config.fsdp_config", "cpu_ofload", "cpu_offload"),
        (TorchRunOptions, {"nnode": 2}, "training_config.torch_run_config", "nnode", "nnodes"),
    ]:
        with pytest.raises(ValidationError) as e:
            model.model_validate(data)
        message = first_validation_error(e.value, prefix)
        assert message.startswith(f"{prefix}.{key_path}: unknown key") and f"did you mean '{near}'?" in message, message
    with pytest.raises(BadRequest, match=r"logger_config.reportto: unknown key 'reportto'; did you mean 'report_to'\?"):
        logging_spec({"reportto": ["tensorboard"]}, 10)


def test_pipeline_and_workflow_requests_refuse_unknown_keys(monkeypatch):
    from providers.cli.jobfile import pipeline_request
    from providers.pipelines.teacher_student import PipelineRequest
    from providers.workflows.tasks import EnhanceRequest

    monkeypatch.setenv("TRL_MODELS_DIR", "/models")
    body, _ = pipeline_request(Path(__file__).resolve().parent.parent / "examples" / "pipeline_teacher_students.yaml")
    PipelineRequest.model_validate(body)  # the shipped example is accepted
    lora = {**LORA, "rnk": 2}
    for change, key_path, near in [
        (lambda b: b["teacher"].update(top_kk=5), "teacher.top_kk", "top_k"),
        (lambda b: b["students"][0].update(temprature=1.0), "students.0.temprature", "temperature"),
        (lambda b: b["students"][0].update(peft=lora), "students.0.peft.rnk", "rank"),
        (lambda b: b["students"][0].update(scheduling={"priorty": 1}), "students.0.scheduling.priorty", "priority"),
        (lambda b: b.update(merge={"methd": "linear"}), "merge.methd", "method"),
    ]:
        bad = json.loads(json.dumps(body))
        change(bad)
        with pytest.raises(ValidationError) as e:
            PipelineRequest.model_validate(bad)
        message = first_validation_error(e.value)
        assert message.startswith(f"{key_path}: unknown key") and f"did you mean '{near}'?" in message, message
    with pytest.raises(ValidationError) as e:
        EnhanceRequest.model_validate({"enhancement_id": "x", "enhancement_idd": 1})
    assert first_validation_error(e.value).startswith("enhancement_idd: unknown key 'enhancement_idd'; did you mean")


@pytest.mark.slow
def test_the_service_answers_a_typo_at_each_level_with_a_400_naming_it(tmp_path, tiny_models):
    """Through the real service: the field of the 400 is the full key path, the reason the nearest key."""
    import copy

    from test_fsdp_service import Service, sft_body

    svc = Service(tmp_path / "data")
    try:
        body = sft_body("typo", tiny_models["student"], scheduling={"priority": 0})
        body["rows"] = [{"prompt": "a", "completion": "b"}] * 4
        for change, field, near in [
            (lambda b: b["training_config"]["data_config"].update(bacth_size=4),
             "training_config.data_config.bacth_size", "batch_size"),
            (lambda b: b["training_config"].update(max_step_per_epoch=4), "training_config.max_step_per_epoch",
             "max_steps_per_epoch"),
            (lambda b: b["training_config"]["fsdp_config"].update(sharding_stategy="NO_SHARD"),
             "training_config.fsdp_config.sharding_stategy", "sharding_strategy"),
            (lambda b: b["training_config"]["torch_run_config"].update(nproc_per_nod=1),
             "training_config.torch_run_config.nproc_per_nod", "nproc_per_node"),
            (lambda b: b["training_config"]["scheduling"].update(max_retry=1),
             "training_config.scheduling.max_retry", "max_retries"),
            (lambda b: b.update(logger_config={"report_two": []}), "logger_config.report_two", "report_to"),
        ]:
            bad = copy.deepcopy(body)
            change(bad)
            r = svc.post("/v1/post-training/supervised-fine-tune", json=bad)
            assert r.status_code == 400, r.text
            assert field in r.text and f"did you mean '{near}'?" in r.text, r.text
        assert svc.get("/v1/post-training/jobs").json()["data"] == []  # nothing ran with a default
    finally:
        svc.stop()
