"""Job and pipeline files: YAML in, API request bodies out.

A job file names a method, a model, a dataset (a local JSONL/JSON/CSV/Parquet file, or the id of a
dataset the server already has) and the training, algorithm, FSDP and logger settings:

    method: sft                          # a requestable method of providers/training/methods.py: sft, dpo, ...
    job_uuid: my-job                     # optional: default FILE-STEM-YYYYMMDD-HHMMSS
    model: ${TRL_MODELS_DIR}/student     # ${VAR} and ~ are expanded; relative paths are from this file
    dataset: data/reverse.jsonl          # or {id: a-registered-dataset}
    validation_dataset: data/val.jsonl   # optional
    training:                            # training_config; shortcuts go where the API wants them:
      n_epochs: 1                        #   batch_size, shuffle, data_format, packed, train_on_input
      max_steps_per_epoch: 20            #     -> data_config
      batch_size: 8                      #   lr, weight_decay, num_warmup_steps, optimizer_type
      lr: 3.0e-3                         #     -> optimizer_config
    algorithm: {type: LoRA, ...}         # algorithm_config (sft: LoRA / PEFT / none = full; other methods:
                                         #   their own type, the default)
    fsdp: {sharding_strategy: FULL_SHARD}       # training_config.fsdp_config (FSDP service)
    torch_run: {nproc_per_node: 2}              # training_config.torch_run_config (FSDP service)
    logger: {report_to: [tensorboard]}          # logger_config
    checkpoint_dir: null

A pipeline file is the FSDP service's teacher-student pipeline request, with `dataset:` a local file
(sent inline as `rows`) or a service dataset id.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import yaml

from ..training.keys import nearest, unknown_key_message
from ..training.methods import METHODS, PREFERENCE_CALL
from ..training.settings import DpoSpec

DATA_KEYS = ("batch_size", "shuffle", "data_format", "packed", "train_on_input", "validation_dataset_id")
OPTIMIZER_KEYS = ("optimizer_type", "lr", "weight_decay", "num_warmup_steps")
REQUESTABLE = tuple(name for name, m in METHODS.items() if m.call)  # the methods a Llama Stack call requests
# 0.2.12's DPO config has four required fields (a Llama Stack server checks them); a job file may leave them
# out: the values that change nothing (beta's default; no clipping, smoothing or discount).
LLAMA_STACK_REQUIRED = {"dpo": {"reward_scale": DpoSpec.model_fields["beta"].default, "reward_clip": 0.0,
                                "epsilon": 0.0, "gamma": 0.0}}
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class JobFileError(ValueError):
    """A job file that cannot become a request; the message names the file, key and value."""


def _expand(value: Any) -> Any:
    if isinstance(value, str):
        return os.path.expanduser(os.path.expandvars(value))
    if isinstance(value, list):
        return [_expand(v) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise JobFileError(f"{path}: no such file") from None
    except yaml.YAMLError as e:
        raise JobFileError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise JobFileError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    data = _expand(data)
    unresolved = re.findall(r"\$\{?(\w+)", json.dumps(data))
    if unresolved:
        raise JobFileError(f"{path}: environment variable(s) not set: {sorted(set(unresolved))}")
    return data


def _local(path_value: str, base: Path) -> Path:
    p = Path(path_value)
    return p if p.is_absolute() else (base / p)


def load_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL, JSON (a list), CSV or Parquet file, as plain JSON-able dicts."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise JobFileError(f"{path}: line {n} is not JSON ({e})") from None
    elif suffix == ".json":
        rows = json.loads(path.read_text())
        if not isinstance(rows, list):
            raise JobFileError(f"{path}: a .json dataset must be a list of rows")
    elif suffix in (".csv", ".parquet"):
        import pandas as pd

        frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
        rows = json.loads(frame.to_json(orient="records"))  # numpy values -> JSON types, NaN -> null
    else:
        raise JobFileError(f"{path}: unknown dataset format {suffix!r}; use one of {', '.join(DATA_SUFFIXES)}")
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise JobFileError(f"{path}: expected a non-empty list of row objects")
    for row in rows:  # CSV/Parquet cells that held NaN come back as None; keep them JSON-clean
        for k, v in list(row.items()):
            if isinstance(v, float) and not math.isfinite(v):
                row[k] = None
    return rows


def dataset_id_for(path: Path, rows: list[dict[str, Any]]) -> str:
    """A stable id for a local file's rows: the same rows are uploaded once, changed rows get a new id."""
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:12]
    return f"{SAFE.sub('-', path.stem)[:80]}-{digest}"


class Dataset:
    """A job's dataset: either rows from a local file (to upload) or an id the server already has."""

    def __init__(self, dataset_id: str, rows: list[dict[str, Any]] | None = None, path: Path | None = None):
        self.dataset_id, self.rows, self.path = dataset_id, rows, path


def resolve_dataset(value: Any, base: Path, key: str, source: Path) -> Dataset:
    if isinstance(value, dict) and set(value) == {"id"}:
        return Dataset(str(value["id"]))
    if not isinstance(value, str):
        raise JobFileError(f"{source}: {key}: expected a file path or {{id: DATASET_ID}}, got {value!r}")
    path = _local(value, base)
    if path.suffix.lower() in DATA_SUFFIXES:
        if not path.is_file():
            raise JobFileError(f"{source}: {key}: no such file {path}")
        rows = load_rows(path)
        return Dataset(dataset_id_for(path, rows), rows, path)
    return Dataset(value)  # a registered dataset id


class JobRequest:
    """What `submit` sends: the route, the body, and the datasets to upload first."""

    def __init__(self, route: str, body: dict[str, Any], datasets: list[Dataset]):
        self.route, self.body, self.datasets = route, body, datasets

    @property
    def job_uuid(self) -> str:
        return self.body["job_uuid"]


def check_sections(spec: dict[str, Any], method: str, path: Path) -> None:
    """Unknown keys at any depth of a job file's sections are an error naming the key path and the nearest
    accepted key (a typo would otherwise run with the default)."""
    from pydantic import create_model

    from ..api.requests import PREFERENCE_CONFIGS, SFTAlgorithmConfig, TrainingConfig
    from ..api.to_spec import LOGGER_KEYS
    from ..launchers.torchrun import TorchRunOptions
    from ..training.keys import first_unknown_key
    from ..training.spec import FsdpSpec, SchedulingSpec

    shortcuts = {k: (Any, None) for k in (*DATA_KEYS, *OPTIMIZER_KEYS)}  # training: data/optimizer shortcuts
    training = create_model("Training", __base__=TrainingConfig, **shortcuts)
    types = [t for t in METHODS[method].algorithm_types if t is not None]
    algorithm = PREFERENCE_CONFIGS[types[0]] if METHODS[method].call == PREFERENCE_CALL else SFTAlgorithmConfig
    document = create_model(
        "JobFile", training=(training | None, None), fsdp=(FsdpSpec | None, None),
        torch_run=(TorchRunOptions | None, None), algorithm=(algorithm | None, None))
    sections = {k: spec[k] for k in ("training", "fsdp", "torch_run", "algorithm") if isinstance(spec.get(k), dict)}
    if "algorithm" in sections and len(types) == 1:  # the type job_request fills in selects the model
        sections["algorithm"] = {"type": types[0], **sections["algorithm"]}
    found = first_unknown_key(document, sections)
    scheduling = (spec.get("training") or {}).get("scheduling") if isinstance(spec.get("training"), dict) else None
    if not found and isinstance(scheduling, dict):
        found = first_unknown_key(SchedulingSpec, scheduling, ("training", "scheduling"))
    if not found and isinstance(spec.get("logger"), dict):
        found = next(((("logger", k), unknown_key_message(k, LOGGER_KEYS)) for k in spec["logger"]
                      if k not in LOGGER_KEYS), None)
    if found:
        key_path, message = found
        raise JobFileError(f"{path}: {'.'.join(map(str, key_path))}: {message}")


def job_request(path: str | Path, job_uuid: str | None = None) -> JobRequest:
    """Read a job file into a request body (dataset ids filled in; rows to upload kept aside)."""
    path = Path(path)
    spec = load_yaml(path)
    known = {"method", "job_uuid", "model", "dataset", "validation_dataset", "training", "algorithm", "fsdp",
             "torch_run", "logger", "checkpoint_dir", "description"}
    for key in spec:
        if key not in known:
            raise JobFileError(f"{path}: {key}: {unknown_key_message(key, known)}")
    method = spec.get("method")
    if method not in REQUESTABLE:
        near = nearest(method, REQUESTABLE) if isinstance(method, str) else None
        hint = f"; did you mean {near!r}?" if near else ""
        raise JobFileError(f"{path}: method: {method!r} is not one of {list(REQUESTABLE)}{hint}")
    check_sections(spec, method, path)
    for key in ("model", "dataset"):
        if key not in spec:
            raise JobFileError(f"{path}: {key}: required")
    base = path.parent
    model = str(spec["model"])
    if model.startswith((".", "..")):
        model = str(_local(model, base).resolve())
    datasets = [resolve_dataset(spec["dataset"], base, "dataset", path)]
    training = dict(spec.get("training") or {})
    data_config = dict(training.pop("data_config", None) or {})
    optimizer_config = dict(training.pop("optimizer_config", None) or {})
    for k in DATA_KEYS:
        if k in training:
            data_config[k] = training.pop(k)
    for k in OPTIMIZER_KEYS:
        if k in training:
            optimizer_config[k] = training.pop(k)
    data_config["dataset_id"] = datasets[0].dataset_id
    if spec.get("validation_dataset") is not None:
        val = resolve_dataset(spec["validation_dataset"], base, "validation_dataset", path)
        datasets.append(val)
        data_config["validation_dataset_id"] = val.dataset_id
    data_config.setdefault("batch_size", 8)
    data_config.setdefault("shuffle", True)
    data_config.setdefault("data_format", "instruct")
    optimizer_config.setdefault("optimizer_type", "adamw")
    optimizer_config.setdefault("lr", 1e-4)
    optimizer_config.setdefault("weight_decay", 0.0)
    optimizer_config.setdefault("num_warmup_steps", 0)
    training.setdefault("n_epochs", 1)
    training["data_config"] = data_config
    training["optimizer_config"] = optimizer_config
    if spec.get("fsdp") is not None:
        training["fsdp_config"] = spec["fsdp"]
    if spec.get("torch_run") is not None:
        training["torch_run_config"] = spec["torch_run"]
    algorithm = dict(spec.get("algorithm") or {})
    uuid = job_uuid or spec.get("job_uuid") or f"{SAFE.sub('-', path.stem)}-{time.strftime('%Y%m%d-%H%M%S')}"
    body: dict[str, Any] = {"job_uuid": uuid, "training_config": training, "hyperparam_search_config": {},
                            "logger_config": spec.get("logger") or {}}
    if spec.get("checkpoint_dir"):
        body["checkpoint_dir"] = spec["checkpoint_dir"]
    info = METHODS[method]
    types = [t for t in info.algorithm_types if t is not None]
    if len(types) == 1:  # a method selected by one algorithm_config type: the job file may omit it
        algorithm = {"type": types[0], **LLAMA_STACK_REQUIRED.get(method, {}), **algorithm}
    body["finetuned_model" if info.call == PREFERENCE_CALL else "model"] = model
    if algorithm:
        body["algorithm_config"] = algorithm
    return JobRequest(info.call.replace("_", "-"), body, datasets)


def pipeline_request(path: str | Path, pipeline_id: str | None = None) -> tuple[dict[str, Any], Dataset | None]:
    """A pipeline file -> the teacher-student pipeline request body (rows inline for a local file)."""
    path = Path(path)
    spec = load_yaml(path)
    body = dict(spec)
    body["pipeline_id"] = pipeline_id or spec.get("pipeline_id") or f"{SAFE.sub('-', path.stem)}-{time.strftime('%Y%m%d-%H%M%S')}"
    dataset = None
    if "dataset" in body:
        dataset = resolve_dataset(body.pop("dataset"), path.parent, "dataset", path)
        if dataset.rows is not None:
            body["rows"] = dataset.rows
        else:
            body["dataset_id"] = dataset.dataset_id
    return body, dataset
