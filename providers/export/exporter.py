"""export_model: a checkpoint (PEFT adapter or full model) -> merged full model, GGUF + Modelfile,
Hub upload (or its dry run). Everything lands under one output directory:

    OUT/merged/       the full model (an adapter merged into its base with peft's merge_and_unload)
    OUT/gguf/         RESULT-<dtype>.gguf (the result's name, not the checkpoint folder's) and Modelfile
    OUT/hub/          what is pushed: the adapter (or the merged model), README.md, validation files
    OUT/export.json   the summary
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..serving.engine import adapter_base, is_adapter
from .names import base_label, gguf_file_name, hub_id, ollama_name, result_name


def _config_origin(model_dir: Path) -> str | None:
    """The model a full model directory was trained from, as its config.json records it (`_name_or_path`)."""
    try:
        return json.loads((model_dir / "config.json").read_text()).get("_name_or_path") or None
    except (OSError, ValueError):
        return None


def merged_model(model: Path, out: Path) -> Path:
    """A full model directory for `model`: the training core's merge (save_merged) for adapters."""
    if not is_adapter(model):
        return model
    if (model / "merged" / "config.json").exists():  # the job already merged it (merge_adapter: true)
        src = model / "merged"
    else:
        tmp = out / "adapter"
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(model, tmp, ignore=shutil.ignore_patterns("merged"))
        from ..training.components import save_merged  # torch, transformers, peft: only when merging

        save_merged(tmp)  # writes tmp/merged
        src = tmp / "merged"
    dest = out / "merged"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.move(str(src), dest)
    shutil.rmtree(out / "adapter", ignore_errors=True)
    return dest


def export_model(model: str, out_dir: str, formats: list[str], gguf_dtype: str = "f16",
                 hub: dict[str, Any] | None = None, card: dict[str, Any] | None = None,
                 validation_dir: str | None = None) -> dict[str, Any]:
    """Export `model` into out_dir in `formats` (merged, gguf, hub); returns and writes export.json."""
    from .gguf_export import export_gguf
    from .hub import push_to_hub
    from .modelfile import write_modelfile

    src, out = Path(model), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    card = card or {}
    name = result_name(src, card.get("name"))
    base = adapter_base(src) if is_adapter(src) else (card.get("base_model") or _config_origin(src))
    summary: dict[str, Any] = {"model": str(src), "name": name, "adapter": is_adapter(src),
                               "base_model": adapter_base(src) if is_adapter(src) else None,
                               "base_model_id": hub_id(base), "formats": formats}
    full = None
    if "merged" in formats or "gguf" in formats:
        full = merged_model(src, out)
        summary["merged"] = {"path": str(full)}
    if "gguf" in formats:
        gguf_dir = out / "gguf"
        file_name = gguf_file_name(name, gguf_dtype)
        summary["gguf"] = export_gguf(full, gguf_dir / file_name, gguf_dtype, name=name,
                                      base_model=summary["base_model_id"])
        summary["gguf"]["modelfile"] = write_modelfile(full, gguf_dir, file_name)
        summary["gguf"]["ollama_name"] = ollama_name(name, gguf_dtype)
        summary["gguf"]["ollama_create"] = f"ollama create {summary['gguf']['ollama_name']} -f Modelfile"
    if "hub" in formats:
        hub = hub or {}
        folder = out / "hub"
        if folder.exists():
            shutil.rmtree(folder)
        upload = src if hub.get("upload", "adapter") == "adapter" or full is None else full
        shutil.copytree(upload, folder, ignore=shutil.ignore_patterns("merged", "checkpoint-*", "*.bin", "*.pt"))
        validation = None
        if validation_dir and (Path(validation_dir) / "validation.json").exists():
            for f in ("validation.json", "validation.md"):
                shutil.copy(Path(validation_dir) / f, folder / f)
            validation = json.loads((Path(validation_dir) / "validation.json").read_text())
        info = {**card, "name": name, "adapter": is_adapter(upload), "base_model": base_label(base),
                "base_model_id": summary["base_model_id"], "validation": validation}
        summary["hub"] = push_to_hub(folder, hub.get("repo_id") or f"local/{name}", info, token=hub.get("token"),
                                     private=hub.get("private", True), allow_existing=hub.get("allow_existing", False),
                                     dry_run_reason=hub.get("dry_run_reason"))
    (out / "export.json").write_text(json.dumps(summary, indent=2))
    return summary
