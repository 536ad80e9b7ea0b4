"""Merge several students' PEFT adapters into one.

- `linear` (any PEFT type): the weighted average of the adapters' tensors. Needs the same base model,
  PEFT type and tensor shapes (same rank and target modules).
- `svd`, `cat`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` (LoRA only): peft's
  `add_weighted_adapter` with that combination type.
Anything that cannot be combined raises ValueError saying why.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

LORA_COMBINATIONS = ("svd", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def _adapter_config(path: Path) -> dict:
    config = path / "adapter_config.json"
    if not config.exists():
        raise ValueError(f"{path} is not a PEFT adapter (no adapter_config.json): full fine-tunes cannot be merged")
    return json.loads(config.read_text())


def _adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def check_mergeable(adapter_dirs: list[Path]) -> list[dict]:
    configs = [_adapter_config(p) for p in adapter_dirs]
    first = configs[0]
    for path, config in zip(adapter_dirs[1:], configs[1:]):
        for key in ("base_model_name_or_path", "revision", "peft_type"):
            if config.get(key) != first.get(key):
                raise ValueError(
                    f"cannot merge {adapter_dirs[0]} and {path}: different {key} "
                    f"({first.get(key)!r} vs {config.get(key)!r})"
                )
    return configs


def merge_adapters(adapter_dirs: list[str | Path], out_dir: str | Path, weights: list[float] | None = None,
                   method: str = "linear") -> dict:
    """Write the merged adapter to out_dir; returns a summary."""
    dirs = [Path(p) for p in adapter_dirs]
    if len(dirs) < 2:
        raise ValueError("merging needs at least two adapters")
    weights = weights or [1.0 / len(dirs)] * len(dirs)
    if len(weights) != len(dirs):
        raise ValueError(f"{len(weights)} weights for {len(dirs)} adapters")
    configs = check_mergeable(dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if method == "linear":
        _merge_linear(dirs, out, weights)
    elif method in LORA_COMBINATIONS:
        if configs[0]["peft_type"] != "LORA":
            raise ValueError(f"merge method {method!r} is for LoRA adapters, not {configs[0]['peft_type']}")
        _merge_with_peft(dirs, out, weights, method, configs[0]["base_model_name_or_path"], configs[0].get("revision"))
    else:
        raise ValueError(f"unknown merge method {method!r}: use 'linear' or one of {LORA_COMBINATIONS}")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (dirs[0] / name).exists():
            shutil.copy(dirs[0] / name, out / name)
    summary = {"method": method, "weights": weights, "adapters": [str(p) for p in dirs],
               "peft_type": configs[0]["peft_type"], "base_model": configs[0]["base_model_name_or_path"]}
    (out / "merge.json").write_text(json.dumps(summary, indent=2))
    return summary


def _merge_linear(dirs: list[Path], out: Path, weights: list[float]) -> None:
    from safetensors.torch import save_file

    tensors = [_adapter_tensors(p) for p in dirs]
    first = tensors[0]
    for path, t in zip(dirs[1:], tensors[1:]):
        if t.keys() != first.keys() or any(t[k].shape != first[k].shape for k in first):
            raise ValueError(
                f"cannot average {dirs[0]} and {path}: their adapter tensors differ in names or shapes "
                "(different rank or target modules); use a LoRA combination such as 'cat' or 'svd'"
            )
    merged = {k: sum(w * t[k].float() for w, t in zip(weights, tensors)).to(first[k].dtype) for k in first}
    save_file(merged, str(out / "adapter_model.safetensors"))
    shutil.copy(dirs[0] / "adapter_config.json", out / "adapter_config.json")


def _merge_with_peft(dirs: list[Path], out: Path, weights: list[float], method: str, base: str,
                     revision: str | None = None) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # A base named by hub id (and revision) loads from the Hugging Face cache, as peft's AutoPeftModel does.
    base_model = AutoModelForCausalLM.from_pretrained(base, revision=revision)
    model = PeftModel.from_pretrained(base_model, str(dirs[0]), adapter_name="s0")
    names = ["s0"]
    for i, path in enumerate(dirs[1:], 1):
        model.load_adapter(str(path), adapter_name=f"s{i}")
        names.append(f"s{i}")
    kwargs = {"density": 0.5} if method in ("ties", "dare_linear", "dare_ties", "magnitude_prune") else {}
    model.add_weighted_adapter(names, weights, "merged", combination_type=method, **kwargs)
    model.save_pretrained(str(out / "peft"), selected_adapters=["merged"])
    for f in (out / "peft" / "merged").iterdir():  # peft writes a named adapter into a subfolder
        shutil.move(str(f), out / f.name)
    shutil.rmtree(out / "peft")
