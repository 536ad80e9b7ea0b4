"""What an export is called: the result's name (not the checkpoint folder's) and the base model's hub id
(not this machine's path), as Hugging Face model cards, llama.cpp's GGUF file names and Ollama name them."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..api.paths import HUB_ID

# Folders a trained model sits in below its result's own directory (RUN_DIR/checkpoints/final,
# CHECKPOINT_DIR/RESULT/final/merged, .../checkpoint-40): never the result's name.
_PLUMBING = re.compile(r"final|merged|checkpoints|checkpoint-\d+|adapter")
_OLLAMA_UNSAFE = re.compile(r"[^a-z0-9._-]+")


def result_name(model_dir: str | Path, given: str | None = None) -> str:
    """The trained result's name: `given`, else the first folder above the checkpoint plumbing (the job's
    result name or job id)."""
    if given:
        return given
    path = Path(model_dir).resolve()
    for part in (path, *path.parents):
        if part.name and not _PLUMBING.fullmatch(part.name):
            return part.name
    return path.name or "model"


def hub_id(model: str | None) -> str | None:
    """The Hugging Face id of a base model: the id itself, a hub cache snapshot's id
    (`.../models--ORG--NAME/snapshots/REV`), or the id a local copy's config.json says it came from;
    None for a model that only exists on this machine."""
    if not model:
        return None
    path = Path(model)
    if not path.is_absolute() and not path.exists() and HUB_ID.fullmatch(model):
        return model
    for part in (path, *path.parents):
        if part.name.startswith("models--") and part.name.count("--") >= 2:
            return part.name.removeprefix("models--").replace("--", "/", 1)
    config = path / "config.json"
    if config.is_file():
        try:
            origin = json.loads(config.read_text()).get("_name_or_path")
        except (ValueError, OSError):
            origin = None
        # a local copy of a hub model: only an ORG/NAME id counts (a bare word may be a relative path)
        if isinstance(origin, str) and "/" in origin and HUB_ID.fullmatch(origin) and not Path(origin).exists():
            return origin
    return None


def base_label(model: str | None) -> str | None:
    """How a card names a base model: its hub id, else the local folder's name (never the full path)."""
    if not model:
        return None
    return hub_id(model) or Path(model).name


def gguf_file_name(name: str, dtype: str) -> str:
    """llama.cpp's convention, `<name>-<encoding>.gguf` (e.g. `reverse-sft-f16.gguf`)."""
    return f"{name}-{dtype}.gguf"


def ollama_name(name: str, dtype: str) -> str:
    """Ollama's `model:tag` (lowercase letters, digits, `.`, `_`, `-`): the result's name, tagged with the
    encoding, for `ollama create NAME -f Modelfile`."""
    model = _OLLAMA_UNSAFE.sub("-", name.lower()).strip("-._") or "model"
    return f"{model}:{dtype.lower()}"
