"""Request -> JobSpec: the one path from a validated post-training request to the job's spec.

`prepare_job` is what both providers and the FSDP service call: it resolves the model, maps the request's
algorithm_config (through the method table, `providers/training/methods.py`), training_config and
logger_config onto the JobSpec's sections, writes the rows into the run directory, and returns the spec.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from llama_stack.apis.post_training import LoraFinetuningConfig, QATFinetuningConfig
from pydantic import ValidationError

from ..errors import BadRequest, client_errors, first_validation_error
from ..training.efficiency import check_4bit, check_method_settings, check_supported
from ..training.keys import unknown_key_message
from ..training.loggers import check_report_to
from ..training.methods import METHODS, PREFERENCE_CALL, method_for
from ..training.spec import (
    CheckpointSpec,
    DataSpec,
    EfficiencySpec,
    JobSpec,
    LoggingSpec,
    OptimizerSpec,
    PeftSpec,
    SchedulingSpec,
    TeacherSpec,
)
from .paths import (
    ProviderDefaults,
    check_path_text,
    checkpoint_output_dir,
    confine,
    hub_origin,
    resolve_model,
    result_name_of,
)
from .requests import ALGORITHM_CONFIGS, DataConfig, PeftFinetuningConfig, TrainingConfig

log = logging.getLogger("providers.api")


def efficiency_spec(tc: TrainingConfig, check_host: bool = True) -> EfficiencySpec:
    """The EfficiencySpec of a request's training_config (the extension fields, and 0.2.12's
    `efficiency_config.enable_activation_checkpointing`), checked against this host unless `check_host` is
    False (a job that runs on other machines: its training process checks again on its node)."""
    ec = getattr(tc, "efficiency_config", None)
    if ec is not None:
        if getattr(ec, "enable_activation_offloading", False):
            raise BadRequest("training_config.efficiency_config.enable_activation_offloading: not supported; "
                             "use gradient_checkpointing (recompute) instead")
        for name in ("fsdp_cpu_offload", "memory_efficient_fsdp_wrap"):
            if getattr(ec, name, False):
                raise BadRequest(f"training_config.efficiency_config.{name}: FSDP options are set in "
                                 "training_config.fsdp_config (remote::trl_fsdp), e.g. cpu_offload")
    checkpointing = getattr(tc, "gradient_checkpointing", None)
    if checkpointing is None:
        checkpointing = bool(ec is not None and ec.enable_activation_checkpointing)
    spec = EfficiencySpec(
        gradient_checkpointing=checkpointing,
        **{name: getattr(tc, name) for name in EfficiencySpec.model_fields
           if name != "gradient_checkpointing" and getattr(tc, name, None) is not None},
    )
    if check_host:
        with client_errors():  # the core says what this host lacks, naming the field
            check_supported(spec)
    return spec


# logger_config is a free-form dict in 0.2.12; these are the keys it means something with here.
LOGGER_KEYS = ("logging_steps", "tensorboard", "wandb_project", "report_to", "project", "run_name")


def logging_spec(logger_config: dict[str, Any] | None, default_steps: int) -> LoggingSpec:
    """logger_config (a free-form dict in the API) as the job's logging settings; errors name the field."""

    cfg = logger_config or {}
    if not isinstance(cfg, dict):
        raise BadRequest("logger_config: must be an object")
    unknown = [k for k in cfg if k not in LOGGER_KEYS]
    if unknown:
        raise BadRequest(f"logger_config.{str(unknown[0])[:100]}: {unknown_key_message(unknown[0], LOGGER_KEYS)}")
    with client_errors():
        report_to = check_report_to(cfg.get("report_to"))
    try:
        return LoggingSpec(
            logging_steps=cfg.get("logging_steps", default_steps),
            tensorboard=cfg.get("tensorboard", False),
            wandb_project=cfg.get("wandb_project"),
            report_to=report_to,
            project=cfg.get("project"),
            run_name=cfg.get("run_name"),
        )
    except ValidationError as e:
        first = e.errors()[0]
        raise BadRequest(f"logger_config.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


# Llama Stack's LoraFinetuningConfig names modules as torchtune does (q_proj, k_proj, v_proj, output_proj,
# apply_lora_to_mlp, apply_lora_to_output); each architecture's Hugging Face modules, as peft target names.
# peft ignores a target no module has, so every name is mapped here and then checked against the model.
_LLAMA_LIKE = {
    "q_proj": ["q_proj"], "k_proj": ["k_proj"], "v_proj": ["v_proj"], "output_proj": ["o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"], "output": ["lm_head"],
}
LORA_MODULE_NAMES: dict[str, dict[str, list[str]]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "granite", "gemma", "gemma2", "gemma3_text"), _LLAMA_LIKE),
    # Phi-3 fuses q, k and v into one projection, and gate and up into another: adapting q adapts all three.
    "phi3": {"q_proj": ["qkv_proj"], "k_proj": ["qkv_proj"], "v_proj": ["qkv_proj"], "output_proj": ["o_proj"],
             "mlp": ["gate_up_proj", "down_proj"], "output": ["lm_head"]},
    # GPT-2 fuses q, k and v (c_attn); its attention output and MLP output are both `c_proj`, told apart by parent.
    "gpt2": {"q_proj": ["c_attn"], "k_proj": ["c_attn"], "v_proj": ["c_attn"], "output_proj": ["attn.c_proj"],
             "mlp": ["mlp.c_fc", "mlp.c_proj"], "output": ["lm_head"]},
}


def lora_targets(model_type: str, attn_modules: list[str], mlp: bool, output: bool) -> list[str]:
    """Llama Stack's LoRA module names as the model's own (peft target names), in request order, once each.

    Names outside the table (a model's own names, such as `o_proj`) pass through unchanged; `check_targets`
    then refuses any the model does not have."""
    table = LORA_MODULE_NAMES.get(model_type, _LLAMA_LIKE)
    names = [t for name in attn_modules for t in table.get(name, [name])]
    names += table["mlp"] if mlp else []
    names += table["output"] if output else []
    return list(dict.fromkeys(names))


def has_module(module_names: set[str], target: str) -> bool:
    """peft's rule: a target names a module whose full name is the target or ends with '.' + target."""
    return target in module_names or any(n.endswith("." + target) for n in module_names)


def check_targets(model_type: str, modules: dict[str, str], targets: list[str], field: str,
                  requested: list[str] | None = None) -> None:
    """Every target must name one of the model's modules; raises ValueError naming the field, the value and
    what the model has."""
    missing = [t for t in targets if not has_module(set(modules), t)]
    if not missing:
        return
    linear = sorted({name.rsplit(".", 1)[-1] for name, kind in modules.items() if kind in ("Linear", "Conv1D")})
    llama_stack_names = [k for k in LORA_MODULE_NAMES.get(model_type, _LLAMA_LIKE) if k not in ("mlp", "output")]
    asked = f" (from {requested})" if requested and requested != targets else ""
    raise BadRequest(
        f"{field}: {missing}{asked} is not a module of this {model_type!r} model; accepted: Llama Stack's names "
        f"{llama_stack_names} or the model's own module names, such as {linear}"
    )


def peft_spec(cfg: LoraFinetuningConfig | PeftFinetuningConfig | None, model: str | None = None,
              field: str = "algorithm_config", check_host: bool = True) -> PeftSpec | None:
    """A request's LoRA / PEFT settings as the job's PeftSpec. With `model` (a local model directory), Llama
    Stack's module names become the model's own and every target is checked against the model's modules
    (read from its config: no weights are loaded). `check_host`: whether QLoRA must be able to run here."""
    if cfg is None:
        return None
    from ..training.components import model_modules

    model_type, modules = "llama", None
    if model is not None:
        try:
            model_type, modules = model_modules(model)
        except Exception as e:  # noqa: BLE001 - a config that builds no model cannot be trained either
            raise BadRequest(f"model: {model!r}: no model can be built from its config: {type(e).__name__}: "
                             f"{str(e)[:300]}") from None
    if isinstance(cfg, PeftFinetuningConfig):
        spec = PeftSpec(**cfg.model_dump(exclude={"type"}))
        if modules is not None and spec.target_modules:
            check_targets(model_type, modules, spec.target_modules, f"{field}.target_modules")
        return spec
    if cfg.quantize_base and check_host:
        with client_errors():
            check_4bit(f"{field}.quantize_base")  # QLoRA: a 400 naming what this host lacks
    attn = list(cfg.lora_attn_modules)
    if not attn and not cfg.apply_lora_to_mlp and not cfg.apply_lora_to_output:
        raise BadRequest(f"{field}.lora_attn_modules: no modules to adapt (and apply_lora_to_mlp, "
                         "apply_lora_to_output are false)")
    targets = lora_targets(model_type, attn, cfg.apply_lora_to_mlp, cfg.apply_lora_to_output)
    if modules is not None:
        # The attention names on their own first, so that the error names the field holding a bad name.
        check_targets(model_type, modules, lora_targets(model_type, attn, False, False),
                      f"{field}.lora_attn_modules", attn)
        check_targets(model_type, modules, targets, f"{field}.apply_lora_to_mlp/apply_lora_to_output")
    return PeftSpec(
        peft_type="dora" if cfg.use_dora else "lora", target_modules=targets, rank=cfg.rank, alpha=cfg.alpha,
        quantize_base=bool(cfg.quantize_base),
    )


def build_job_spec(
    *,
    job_uuid: str,
    method: str,
    model: str,
    training_config: TrainingConfig,
    run_dir: str,
    model_id: str | None = None,
    model_revision: str | None = None,
    train_file: str,
    validation_file: str | None,
    defaults: ProviderDefaults,
    logger_config: dict[str, Any] | None = None,
    output_dir: str | None = None,
    result_name: str | None = None,
    peft: PeftSpec | None = None,
    not_applied: dict[str, str] | None = None,
    fsdp=None,
    check_host: bool = True,
    **sections: Any,
) -> JobSpec:
    """The request, validated and resolved against provider defaults, as the job's spec. `sections`: the
    method's settings (its JobSpec section, e.g. `dpo=DpoSpec(...)`); `check_host`: whether this host must be
    able to run the efficiency knobs (False: the job runs on other machines, which check on their node)."""
    tc = training_config
    dc = tc.data_config
    oc = tc.optimizer_config
    if oc is not None:
        optimizer = OptimizerSpec(optimizer_type=oc.optimizer_type.value, lr=oc.lr, weight_decay=oc.weight_decay,
                                  num_warmup_steps=oc.num_warmup_steps)
    elif tc.learning_rate is not None:
        optimizer = OptimizerSpec(lr=tc.learning_rate)
    else:
        optimizer = OptimizerSpec()
    efficiency = efficiency_spec(tc, check_host)
    logging_settings = logging_spec(logger_config, defaults.logging_steps)
    scheduling = scheduling_spec(tc)
    with client_errors():  # JobSpec's own checks of combinations (e.g. QLoRA without an adapter)
        return JobSpec(
            job_uuid=job_uuid,
            result_name=result_name,
            not_applied=not_applied or {},
            method=method,
            model=model,
            model_id=model_id,
            model_revision=model_revision,
            run_dir=run_dir,
            data=DataSpec(
                train_file=train_file,
                validation_file=validation_file,
                batch_size=dc.batch_size,
                shuffle=dc.shuffle,
                packed=bool(dc.packed),
                train_on_input=bool(dc.train_on_input),
                max_seq_len=tc.max_seq_len,
            ),
            optimizer=optimizer,
            n_epochs=tc.n_epochs,
            max_steps_per_epoch=tc.max_steps_per_epoch,
            gradient_accumulation_steps=tc.gradient_accumulation_steps,
            max_validation_steps=tc.max_validation_steps,
            # A request without dtype takes the provider config's (TrainingConfig.dtype defaults to None).
            dtype=tc.dtype or defaults.dtype,
            seed=tc.seed,
            peft=peft,
            **sections,
            checkpoint=CheckpointSpec(
                output_dir=output_dir or str(Path(run_dir) / "checkpoints"), save_steps=tc.save_steps,
                save_total_limit=tc.save_total_limit, resume=tc.resume_from_checkpoint,
            ),
            logging=logging_settings,
            fsdp=fsdp,
            efficiency=efficiency,
            scheduling=scheduling,
        )


def scheduling_spec(tc: TrainingConfig) -> SchedulingSpec:
    """training_config.scheduling as a SchedulingSpec; raises ValueError naming the field."""
    if tc.scheduling is not None and not isinstance(tc.scheduling, dict):
        raise BadRequest("training_config.scheduling: must be an object")
    try:
        return SchedulingSpec.model_validate(tc.scheduling or {})
    except ValidationError as e:
        raise BadRequest(first_validation_error(e, "training_config.scheduling")) from None


class RequestContext:
    """What an algorithm_config's `job_settings` (api/requests.py) asks of the API layer: adapters checked
    against the job's model, a distillation teacher resolved and confined as the job's model is, and whether
    this host can run the method's settings."""

    def __init__(self, model: str, defaults: ProviderDefaults, check_host: bool):
        self.model, self.defaults, self.check_host = model, defaults, check_host

    def peft(self, cfg: LoraFinetuningConfig | PeftFinetuningConfig | None, field: str) -> PeftSpec | None:
        return peft_spec(cfg, self.model, field, self.check_host)

    def check_on_host(self, settings: Any, field: str) -> None:
        if self.check_host:
            with client_errors():
                check_method_settings(settings, field)

    def teacher(self, model: str | None, outputs_dir: str | None, kind: str) -> tuple[str | None, str | None]:
        """(teacher model, teacher outputs dir), one of them set: a model resolved as the job's is, or a teacher
        task's outputs in this server's directories; logit and hybrid distillation need the student's tokenizer."""
        if model is not None:
            field = "algorithm_config.teacher_model"
            teacher = resolve_model(model, field, self.defaults)
        else:
            field = "algorithm_config.teacher_outputs_dir"
            check_path_text(outputs_dir, field)
            roots = None
            if self.defaults.allowed_model_roots is not None:  # a server that confines paths: its own tasks' outputs
                roots = [self.defaults.data_dir, *self.defaults.allowed_model_roots]
            teacher = str(confine(Path(outputs_dir), roots, field, outputs_dir, self.defaults.model_roots_hint,
                                  self.defaults))
            if not (Path(teacher) / "teacher_task.json").exists():
                raise BadRequest(f"{field}: {teacher!r} holds no teacher task outputs")
        if kind != "output":
            from ..training.components import check_same_tokenizer

            try:
                check_same_tokenizer(self.model, teacher)
            except ValueError as e:
                raise BadRequest(f"{field}: {e}") from None
        return (teacher, None) if model is not None else (None, teacher)


def algorithm_settings(method: str, model: str, algorithm_config: Any, defaults: ProviderDefaults,
                       check_host: bool = True) -> dict[str, Any]:
    """The JobSpec parts (peft, the method's section, not-applied settings) of a request's algorithm_config:
    the config's own `job_settings` (api/requests.py), or, for sft, its adapters; raises ValueError naming
    the field."""
    if algorithm_config is None and METHODS[method].settings is not None:  # e.g. DPO with its defaults
        algorithm_config = ALGORITHM_CONFIGS[next(t for t in METHODS[method].algorithm_types if t)]()
    ctx = RequestContext(model, defaults, check_host)
    if hasattr(algorithm_config, "job_settings"):
        return algorithm_config.job_settings(ctx)
    if isinstance(algorithm_config, QATFinetuningConfig):
        raise BadRequest("algorithm_config.type 'QAT': quantization-aware training is not supported by this provider")
    return {"peft": ctx.peft(algorithm_config, "algorithm_config")}


def check_output_layer_adapter(peft: PeftSpec | None, section: Any) -> None:
    """TRL 1.16's trainers compute log-probs from `lm_head.weight` directly, so an adapter on the LM head
    would never train: refuse it, unless the method's settings say it trains (`trains_lm_head_adapter`)."""
    if peft is None or "lm_head" not in (peft.target_modules or []):
        return
    if section is not None and section.trains_lm_head_adapter:
        return
    raise BadRequest(
        "algorithm_config.apply_lora_to_output / target_modules: an adapter on lm_head is not trained by "
        "TRL's trainers (they read lm_head.weight directly); leave lm_head out, or train it fully"
    )


def method_of(call: str, algorithm_config: Any) -> str:
    """The method a Llama Stack call (`supervised_fine_tune`, `preference_optimize`, or the service's route
    name) asks for: its algorithm_config's `type` looked up in the method table."""
    return method_for(call.replace("-", "_"), getattr(algorithm_config, "type", None))


def preference_target(finetuned_model: str, model: str | None) -> tuple[str, str | None]:
    """(model to train, result name) of a preference_optimize call. In 0.2.12, `finetuned_model` is the
    model to train. Published examples send `model` (the base) and `finetuned_model` (the result's name):
    with `model` given, it is trained and `finetuned_model` names the result."""
    if model:
        return model, result_name_of(finetuned_model)
    return finetuned_model, None


async def fetch_rows(datasetio: Any, dataset_id: str, field: str) -> list[dict[str, Any]]:
    """All rows of a registered dataset through Llama Stack's datasetio; errors name the field."""
    try:
        page = await datasetio.iterrows(dataset_id=dataset_id, limit=-1)
    except Exception as e:  # noqa: BLE001 - the datasetio router raises several types for unknown ids
        raise BadRequest(f"{field}: dataset {str(dataset_id)[:200]!r} cannot be read: {e}") from None
    if not page.data:
        raise BadRequest(f"{field}: dataset {dataset_id!r} is empty")
    return page.data


def write_rows(rows: Any, path: Path, kind: str, field: str) -> int:
    """Normalize and write rows as JSONL; raises ValueError naming the field (bad row or empty)."""
    from ..training.data import DataFormatError, normalize_rows, write_jsonl

    try:
        n = write_jsonl(normalize_rows(rows, kind), path)
    except DataFormatError as e:
        raise BadRequest(f"{field}: {e}") from None
    if n == 0:
        raise BadRequest(f"{field}: the dataset has no rows")
    return n


def teacher_job_spec(*, job_uuid: str, run_dir: Path, model: str, rows: Any, output_dir: str, top_k: int | None,
                     max_new_tokens: int, generation_batch_size: int, scheduling: SchedulingSpec) -> JobSpec:
    """A teacher task (answers and top-k log-probs for every prompt) as a JobSpec: its prompts written into its
    (new, reserved) run directory. `model` is resolved already (`paths.resolve_model`)."""
    write_rows(rows, run_dir / "train.jsonl", METHODS["teacher"].rows, "rows")
    with client_errors("teacher"):
        return JobSpec(
            job_uuid=job_uuid, method="teacher", model=model, run_dir=str(run_dir),
            data=DataSpec(train_file=str(run_dir / "train.jsonl")),
            checkpoint=CheckpointSpec(output_dir=output_dir),
            teacher=TeacherSpec(teacher_model=model, top_k=top_k, max_new_tokens=max_new_tokens,
                                generation_batch_size=generation_batch_size),
            scheduling=scheduling,
        )


def data_config_of(training_config: TrainingConfig) -> DataConfig:
    if training_config.data_config is None:
        raise BadRequest("training_config.data_config: required (dataset_id, batch_size)")
    return training_config.data_config


def prepare_job(
    *,
    job_uuid: str,
    run_dir: Path,
    method: str,
    model: str,
    training_config: TrainingConfig,
    algorithm_config: Any,
    logger_config: dict[str, Any] | None,
    checkpoint_dir: str | None,
    defaults: ProviderDefaults,
    train_rows: Any,
    validation_rows: Any | None,
    result_name: str | None = None,
    fsdp=None,
    output_dir: str | None = None,
    check_host: bool = True,
) -> JobSpec:
    """Validate a request, write its rows into its (new, reserved) run directory, and return its spec.
    `check_host`: whether this host must be able to run the job's knobs (False: it runs on other machines)."""
    data_config_of(training_config)
    ref = model
    # preference_optimize's model to train is `finetuned_model` unless the request named `model`
    asked_as = "finetuned_model" if METHODS[method].call == PREFERENCE_CALL and not result_name else "model"
    model = resolve_model(ref, asked_as, defaults)
    model_id, model_revision = hub_origin(ref, model)
    settings = algorithm_settings(method, model, algorithm_config, defaults, check_host)
    # the method's own checks (training/settings.py hooks): its other models confined as the job's model is,
    # and, once the rows are written, its settings against them
    name = METHODS[method].section
    section = settings.get(name) if name else None
    if section is not None:
        section = settings[name] = section.with_models_resolved(
            lambda ref, field: resolve_model(ref, field, defaults), "algorithm_config")
    check_output_layer_adapter(settings.get("peft"), section)
    if output_dir is None:
        output_dir = checkpoint_output_dir(checkpoint_dir, result_name or job_uuid, defaults)
    kind = METHODS[method].rows
    rows_field = "training_config.data_config.dataset_id"
    write_rows(train_rows, run_dir / "train.jsonl", kind, rows_field)
    if section is not None:
        from ..jobs.child_env import child_env

        with client_errors():  # the child's environment carries no secret
            section.check_rows(run_dir / "train.jsonl", "algorithm_config", rows_field,
                               child_env(extra={"PYTHONSAFEPATH": "1"}))
    validation_file = None
    if validation_rows is not None:
        validation_file = str(run_dir / "validation.jsonl")
        write_rows(validation_rows, Path(validation_file), kind, "training_config.data_config.validation_dataset_id")
    return build_job_spec(
        job_uuid=job_uuid,
        method=method,
        model=model,
        model_id=model_id,
        model_revision=model_revision,
        training_config=training_config,
        run_dir=str(run_dir),
        train_file=str(run_dir / "train.jsonl"),
        validation_file=validation_file,
        defaults=defaults,
        logger_config=logger_config,
        output_dir=output_dir,
        result_name=result_name,
        fsdp=fsdp,
        check_host=check_host,
        **settings,
    )
