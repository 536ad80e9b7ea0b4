"""FSDP for the training core: the option mapping (one table), process-group setup, and the pieces
that make TRL's trainers run under FSDP2 on CPU as well as on GPUs.

How each FsdpSpec option maps onto FSDP2 (`torch.distributed.fsdp.fully_shard`, through accelerate):

| option                         | FSDP2                                                                  |
|--------------------------------|------------------------------------------------------------------------|
| sharding_strategy FULL_SHARD   | fully_shard(reshard_after_forward=True) over all ranks                 |
| sharding_strategy SHARD_GRAD_OP| fully_shard(reshard_after_forward=False): params stay gathered fwd->bwd|
| sharding_strategy HYBRID_SHARD | 2-D mesh (replicate x shard), shard groups of shard_group_size ranks   |
|                                | (default nproc_per_node); rejected when a shard group would be 1 rank  |
| sharding_strategy NO_SHARD     | DistributedDataParallel: every rank holds all params, grads are        |
|                                | all-reduced (what FSDP1's NO_SHARD is; FSDP2 has no 1-rank shard mesh) |
| mixed_precision_policy bf16/fp16 | MixedPrecisionPolicy(param_dtype=bf16/fp16, reduce_dtype=fp32)       |
| cpu_offload                    | CPUOffloadPolicy(pin_memory=<CUDA available>): pinned memory needs an  |
|                                | accelerator, so on CPU the policy is unpinned                          |
| limit_all_gathers              | always on in FSDP2 (its all-gather buffers are freed in stream order)  |
| forward_prefetch               | layer[i].set_modules_to_forward_prefetch([layer[i+1]])                 |
| backward_prefetch PRE/POST     | layer[i].set_modules_to_backward_prefetch([layer[i-1]]); FSDP2 has a   |
|                                | single prefetch point (before the layer's gradient computation)        |
| backward_prefetch null         | set_modules_to_backward_prefetch([]): no prefetch                      |
| activation_checkpointing       | accelerate's FSDP activation checkpointing of each wrapped layer       |
| wrap_layer_cls                 | transformer_layer_cls_to_wrap; default: the model's _no_split_modules  |
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from .devices import backend
from .run_files import write_atomically
from .spec import JobSpec, mesh_shape

log = logging.getLogger("providers.training")


def world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(spec: JobSpec) -> None:
    """Join the job's process group (torchrun set the rendezvous env) and make accelerate use FSDP on CPU."""
    rank, local_rank, world_size = world()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        from datetime import timedelta

        from .run_files import progress_timeout_s

        # A collective waiting on a stopped peer fails a minute after the service's watchdog would (instead
        # of gloo's and NCCL's 30 / 10 minute defaults), so the watchdog names the rank that stalled.
        timeout = timedelta(seconds=progress_timeout_s(spec.scheduling.progress_timeout_s) + 60)
        dist.init_process_group(backend=backend(), timeout=timeout)
    enable_fsdp_without_accelerator()
    log.info("rank %d/%d joined (%s)", rank, world_size, backend())


def shutdown_distributed(wait_for_peers: bool = True) -> None:
    # Without this, c10d rendezvous workers may abort at exit ("terminate called without an active exception").
    if dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()


def enable_fsdp_without_accelerator() -> None:
    """accelerate turns FSDP on only for accelerator backends; on CPU it would silently run DDP.

    Patch AcceleratorState so that an FSDP plugin on a multi-CPU run really makes it an FSDP run
    (distributed_type FSDP in both AcceleratorState and PartialState's shared state).
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if getattr(AcceleratorState, "_fsdp_on_cpu_patched", False):
        return
    original_init = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init
    AcceleratorState._fsdp_on_cpu_patched = True


def decoder_layer_class(model_path: str, override: str | None = None) -> str:
    """The class FSDP wraps as one unit: the override, else the model's first `_no_split_modules` entry."""
    if override:
        return override
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = getattr(model, "_no_split_modules", None) or []
    if not layers:
        raise ValueError(f"fsdp_config.wrap_layer_cls: cannot find the decoder layer class of {model_path}; name it")
    return sorted(layers)[0]


def fsdp_trainer_args(spec: JobSpec) -> dict[str, Any]:
    """TrainingArguments fields that turn on FSDP2 with the job's options."""
    fsdp = spec.fsdp
    if fsdp.sharding_strategy == "NO_SHARD":
        return {}  # accelerate's multi-process default: DDP
    _, _, world_size = world()
    nproc = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    args: dict[str, Any] = {
        "fsdp": "full_shard",
        "fsdp_config": {
            "version": 2,
            "reshard_after_forward": fsdp.sharding_strategy in ("FULL_SHARD", "HYBRID_SHARD"),
            "transformer_layer_cls_to_wrap": [decoder_layer_class(spec.model, fsdp.wrap_layer_cls)],
            # efficiency.gradient_checkpointing means the same under FSDP: checkpoint each wrapped layer.
            "activation_checkpointing": fsdp.activation_checkpointing or spec.efficiency.gradient_checkpointing,
            "state_dict_type": "SHARDED_STATE_DICT",
            "cpu_ram_efficient_loading": False,
        },
    }
    shape = mesh_shape(fsdp, world_size, nproc)
    if shape is not None:
        from accelerate.parallelism_config import ParallelismConfig

        args["parallelism_config"] = ParallelismConfig(dp_replicate_size=shape[0], dp_shard_size=shape[1])
    return args


def options_in_force(spec: JobSpec) -> dict[str, Any]:
    """What the FSDP options became, for resources_allocated."""
    fsdp = spec.fsdp
    _, _, world_size = world()
    nproc = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if fsdp.sharding_strategy == "NO_SHARD":
        return {**fsdp.model_dump(), "implementation": "DistributedDataParallel (NO_SHARD)", "backend": backend()}
    shape = mesh_shape(fsdp, world_size, nproc)
    return {
        **fsdp.model_dump(),
        "implementation": "FSDP2 (fully_shard) via accelerate",
        "mesh": list(shape) if shape else [world_size],
        "reshard_after_forward": fsdp.sharding_strategy in ("FULL_SHARD", "HYBRID_SHARD"),
        "offload_policy": f"CPUOffloadPolicy(pin_memory={torch.cuda.is_available()})" if fsdp.cpu_offload else None,
        "backend": backend(),
    }


def _decoder_layers(model, layer_cls: str) -> list[torch.nn.Module]:
    """The FSDP units of the decoder layers, in order; a unit nested in another (an activation-checkpoint
    wrapper and its layer) counts once."""
    from torch.distributed.fsdp import FSDPModule

    units: list[torch.nn.Module] = []
    inside: set[int] = set()
    for m in model.modules():
        if id(m) in inside or m is model or not isinstance(m, FSDPModule):
            continue
        if layer_cls in type(m).__name__ or any(layer_cls in type(c).__name__ for c in m.children()):
            units.append(m)
            inside.update(id(d) for d in m.modules())
    return units


def _local_and_full_numel(model) -> tuple[int, int]:
    local = full = 0
    for p in model.parameters():
        full += p.numel()
        local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return local, full


class FsdpCallback(TrainerCallback):
    """Applies the options FSDP2 takes after wrapping (offload, mixed precision are set on the plugin
    before), records what each rank holds, and writes a consolidated HF model at every checkpoint."""

    def __init__(self, spec: JobSpec, rank_dir: Path, tokenizer):
        self.spec = spec
        self.rank_dir = rank_dir
        self.tokenizer = tokenizer

    def on_train_begin(self, args, state, control, model=None, **kw):
        fsdp = self.spec.fsdp
        layers = _decoder_layers(model, decoder_layer_class(self.spec.model, fsdp.wrap_layer_cls))
        for i, layer in enumerate(layers):
            if fsdp.forward_prefetch and i + 1 < len(layers):
                layer.set_modules_to_forward_prefetch([layers[i + 1]])
            if fsdp.backward_prefetch is None:
                layer.set_modules_to_backward_prefetch([])
            elif i > 0:
                layer.set_modules_to_backward_prefetch([layers[i - 1]])
        local, full = _local_and_full_numel(model)
        write_rank_report(self.rank_dir, local_params=local, total_params=full, fsdp_units=len(layers))

    def on_save(self, args, state, control, model=None, **kw):
        save_consolidated(model, Path(args.output_dir) / f"checkpoint-{state.global_step}", self.tokenizer)


def save_consolidated(model, out_dir: Path, tokenizer) -> None:
    """Gather the full state dict (a collective: every rank calls it) and save an HF model on rank 0."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir), state_dict=state_dict)
        tokenizer.save_pretrained(str(out_dir))
    dist.barrier()


def configure_plugin(trainer, spec: JobSpec) -> None:
    """Set the FSDP2 policies accelerate's plugin would get wrong on CPU, before the model is wrapped."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    fsdp = spec.fsdp
    if plugin is None:  # NO_SHARD runs as DDP
        return
    if fsdp.cpu_offload:
        plugin.cpu_offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    if fsdp.mixed_precision_policy:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[fsdp.mixed_precision_policy]
        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def write_rank_report(rank_dir: Path, **fields: Any) -> None:
    """Per-rank facts (params held, peak memory, error) in RUN_DIR/ranks/rank{N}.json."""
    import resource

    rank, local_rank, _ = world()
    rank_dir.mkdir(parents=True, exist_ok=True)
    path = rank_dir / f"rank{rank}.json"
    report = json.loads(path.read_text()) if path.exists() else {"rank": rank, "local_rank": local_rank}
    report.update(fields)
    report["peak_host_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if torch.cuda.is_available():
        report["peak_device_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    write_atomically(path, json.dumps(report))
