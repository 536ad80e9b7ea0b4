"""Speed and memory knobs (`JobSpec.efficiency`): what each one becomes in the model load and the trainer
config, whether this host can run it, and what is in force (for resources_allocated).

| field                    | becomes                                                                         |
|--------------------------|---------------------------------------------------------------------------------|
| gradient_checkpointing   | TrainingArguments activation_checkpointing, use_reentrant=False; under FSDP:    |
|                          | FSDP2 activation checkpointing of each decoder layer                            |
| padding_free             | SFTConfig padding_free (and CachedLogitsCollator for cached-logit distillation):|
|                          | a batch is one row of concatenated sequences with position_ids; attention stays |
|                          | inside each sequence (flash-attn varlen on GPUs, a block-diagonal mask under    |
|                          | sdpa/eager). packed=true (TRL's BFD packing) is padding-free too                |
| group_by_length          | train_sampling_strategy "group_by_length" (components.trainer_args)             |
| attn_implementation      | from_pretrained(attn_implementation=...); "kernels": kernels-community/flash-attn |
| load_in_4bit (QLoRA)     | BitsAndBytesConfig: NF4, double quantization, compute dtype = the job's dtype   |
| use_liger_kernel         | TrainingArguments use_liger_kernel (Triton kernels: CUDA only)                  |
| torch_compile            | TrainingArguments torch_compile (inductor: C++ on CPU, Triton on GPUs)          |
| precompute_ref_log_probs | DPOConfig precompute_ref_log_probs: the reference is the initial policy, so no  |
|                          | reference copy is ever loaded                                                   |
| chunked_lm_head          | SFT and DPO: TRL's chunked LM head (TRL's default), or the model's own forward  |
|                          | over full logits (recipes/sft.py LogitsLossSFTTrainer, recipes/dpo.py           |
|                          | LogitsDPOTrainer); default: chunked with CUDA, full logits on CPU (about 2x     |
|                          | faster per step there, same losses)                                             |

A knob this host cannot run raises ValueError naming the field and what it needs (a 400 at the API);
none is ever silently dropped.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
from typing import Any

from .devices import cuda_available
from .methods import METHODS
from .optional_imports import bring_back
from .spec import EfficiencySpec, JobSpec

KERNELS_FLASH_ATTENTION = "kernels-community/flash-attn"


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _cuda_capability() -> tuple[int, int] | None:
    if not cuda_available():  # no GPU driver: the API layer's checks import no torch
        return None
    import torch

    return torch.cuda.get_device_capability()


@functools.lru_cache(maxsize=1)
def four_bit_trains_here() -> str | None:
    """None when bitsandbytes trains a 4-bit layer on this host (probed once: a 64x64 NF4 linear, forward and
    backward), else why not."""
    bring_back("bitsandbytes")
    if not _has("bitsandbytes"):
        return "the bitsandbytes package is not installed (pip install 'bitsandbytes>=0.49')"
    try:
        import bitsandbytes as bnb
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4").to(device)
        x = torch.randn(2, 64, device=device, requires_grad=True)
        layer(x).sum().backward()
        if x.grad is None or not torch.isfinite(x.grad).all():
            return f"bitsandbytes {bnb.__version__} gives no finite gradient through a 4-bit layer on {device}"
    except Exception as e:  # noqa: BLE001 - any failure means: cannot train 4-bit here
        return f"bitsandbytes cannot run a 4-bit layer on this host ({type(e).__name__}: {e})"
    return None


def check_4bit(field: str) -> None:
    """Raise ValueError naming `field` when 4-bit (QLoRA) training cannot run here."""
    why = four_bit_trains_here()
    if why:
        raise ValueError(f"{field}: 4-bit (QLoRA) training needs bitsandbytes with a 4-bit backend for this device: {why}")


def check_supported(e: EfficiencySpec, prefix: str = "training_config.") -> None:
    """Raise ValueError (naming the field and what is needed) for a knob this host cannot run."""
    cap = _cuda_capability()
    attn = e.attn_implementation
    if attn in ("flash_attention_2", "flash_attention_3", "kernels"):
        if cap is None:
            raise ValueError(f"{prefix}attn_implementation: {attn!r} needs a CUDA GPU; this host has none: use 'sdpa'")
        if cap < (8, 0):
            raise ValueError(f"{prefix}attn_implementation: {attn!r} needs an Ampere or newer GPU (compute "
                             f"capability >= 8.0); this GPU is {cap[0]}.{cap[1]}: use 'sdpa'")
        need = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface", "kernels": "kernels"}[attn]
        if not _has(need):
            raise ValueError(f"{prefix}attn_implementation: {attn!r} needs the {need!r} package, which is not "
                             "installed: install it or use 'sdpa'")
        if attn == "flash_attention_3" and cap < (9, 0):
            raise ValueError(f"{prefix}attn_implementation: 'flash_attention_3' needs a Hopper GPU (9.0); this GPU "
                             f"is {cap[0]}.{cap[1]}: use 'flash_attention_2' or 'sdpa'")
    if e.load_in_4bit:
        check_4bit(f"{prefix}load_in_4bit")
    if e.use_liger_kernel:
        if cap is None:
            raise ValueError(f"{prefix}use_liger_kernel: Liger's kernels are Triton GPU kernels and this host has no "
                             "CUDA GPU: leave use_liger_kernel off")
        if not (_has("liger_kernel") and _has("triton")):
            raise ValueError(f"{prefix}use_liger_kernel: needs the liger-kernel and triton packages "
                             "(pip install liger-kernel)")
    if e.torch_compile:
        if cap is None and not shutil.which(os.environ.get("CXX", "g++")) and not shutil.which("c++"):
            raise ValueError(f"{prefix}torch_compile: torch.compile on CPU generates C++ and needs a C++ compiler "
                             "(g++), which is not on PATH")
        if cap is not None and not _has("triton"):
            raise ValueError(f"{prefix}torch_compile: torch.compile on GPUs needs the triton package")


def check_vllm(field: str = "algorithm_config.use_vllm") -> None:
    """Raise ValueError naming `field` unless vLLM generation can run here: a CUDA GPU and the vllm package."""
    if _cuda_capability() is None:
        raise ValueError(f"{field}: vLLM generation needs a CUDA GPU and this host has none: leave use_vllm off "
                         "(the model's own generate is used)")
    if not _has("vllm"):
        raise ValueError(f"{field}: the vllm package is not installed: install it or leave use_vllm off")


def check_method_settings(settings: Any, field: str = "algorithm_config") -> None:
    """What a method's settings section needs of this host (a ValueError naming the field): vLLM for use_vllm."""
    if getattr(settings, "use_vllm", False):
        check_vllm(f"{field}.use_vllm")


def model_kwargs(spec: JobSpec, precision: str) -> dict[str, Any]:
    """from_pretrained arguments for the trained model: attention implementation and 4-bit quantization."""
    e = spec.efficiency
    kw: dict[str, Any] = {"attn_implementation": KERNELS_FLASH_ATTENTION if e.attn_implementation == "kernels"
                          else e.attn_implementation}
    if e.load_in_4bit:
        import torch
        from transformers import BitsAndBytesConfig

        bring_back("bitsandbytes")
        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    return kw


def trainer_kwargs(spec: JobSpec) -> dict[str, Any]:
    """TrainingArguments fields (shared by SFT, DPO and the cached-logit Trainer) for the knobs."""
    e = spec.efficiency
    checkpointing = e.gradient_checkpointing and spec.fsdp is None  # FSDP: its own activation checkpointing
    # transformers 5 names it activation_checkpointing (gradient_checkpointing is its deprecated alias).
    kw: dict[str, Any] = {
        "activation_checkpointing": checkpointing,
        "use_liger_kernel": e.use_liger_kernel,
        "torch_compile": e.torch_compile,
    }
    if checkpointing:
        # Non-reentrant checkpointing: works with frozen inputs (PEFT) and keyword arguments, the PyTorch default.
        kw["activation_checkpointing_kwargs"] = {"use_reentrant": False}
    return kw


def padding_free(spec: JobSpec) -> bool:
    """Whether SFT batches are padding-free: asked for, or implied by BFD packing."""
    return spec.efficiency.padding_free or spec.data.packed


def chunked_lm_head(spec: JobSpec) -> bool:
    """Whether SFT and DPO compute their log-probs with TRL's chunked LM head. On GPUs it keeps [tokens x
    vocab] logits out of memory; on a CPU memory is plentiful and the chunked head's per-chunk log-softmax,
    entropy and top-1 (forward and backward) take about half of a 25M model's step, so there the model's
    own logits are used."""
    chosen = spec.efficiency.chunked_lm_head
    if chosen is None:
        return cuda_available()
    return chosen


def in_force(spec: JobSpec, model=None) -> dict[str, Any]:
    """The knobs as they ran, for resources_allocated.efficiency."""
    e = spec.efficiency
    out: dict[str, Any] = e.model_dump()
    out["gradient_checkpointing"] = e.gradient_checkpointing and spec.fsdp is None
    if spec.fsdp is not None:
        out["fsdp_activation_checkpointing"] = e.gradient_checkpointing or spec.fsdp.activation_checkpointing
    method = METHODS[spec.method]
    if method.padding_free:
        out["padding_free"] = padding_free(spec)
        out["packing"] = "bfd" if spec.data.packed else None
    out["chunked_lm_head"] = chunked_lm_head(spec) if method.chunked_lm_head else None
    if model is not None:
        config = getattr(model, "config", None)
        out["attn_implementation"] = getattr(config, "_attn_implementation", out["attn_implementation"])
    if e.load_in_4bit:
        out["load_in_4bit"] = "nf4, double quantization (bitsandbytes)"
    if method.reference:
        out["reference"] = ("precomputed log-probs of the initial policy" if e.precompute_ref_log_probs
                            else "the policy with adapters disabled" if spec.peft else "a frozen copy of the model")
    return out
