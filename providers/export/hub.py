"""Push an exported model to the Hugging Face Hub with a model card; without a token, a dry run that
writes the card and the list of files that would be uploaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def model_card(repo_id: str, info: dict[str, Any]) -> str:
    """README.md with YAML front matter: base model, library, training data, method, validation results."""
    base = info.get("base_model")
    adapter = info.get("adapter", False)
    meta = ["---", f"library_name: {'peft' if adapter else 'transformers'}", "pipeline_tag: text-generation",
            "tags:", "- trl", "- llama-stack-post-training"]
    if info.get("method"):
        meta.append(f"- {info['method']}")
    if base and not str(base).startswith("/"):
        meta.append(f"base_model: {base}")
    meta.append("---")
    lines = [*meta, "", f"# {repo_id.split('/')[-1]}", ""]
    lines.append(f"{'A PEFT adapter' if adapter else 'A model'} trained with the TRL post-training service"
                 + (f" from `{base}`." if base else "."))
    training = info.get("training") or {}
    if training:
        lines += ["", "## Training", ""] + [f"- {k}: {v}" for k, v in training.items()]
    data = info.get("data") or {}
    if data:
        lines += ["", "## Training data", ""] + [f"- {k}: {v}" for k, v in data.items()]
    v = info.get("validation")
    if v:
        s = v.get("summary", {})
        lines += ["", "## Validation", "", f"Overall: **{'passed' if v.get('passed') else 'failed'}**", "",
                  "| metric | this model | base |", "|---|---|---|"]
        for key, label in (("pass_rate", "held-out pass rate"), ("perplexity", "held-out perplexity")):
            mine, theirs = s.get(key), s.get(f"base_{key}")
            def fmt(x):
                return "n/a" if x is None else f"{x:.3f}"
            lines.append(f"| {label} | {fmt(mine)} | {fmt(theirs)} |")
        perf = v.get("performance") or {}
        if perf.get("tokens_per_s"):
            lines.append(f"\nGeneration: {perf['tokens_per_s']} tokens/s; peak memory {perf.get('peak_rss_mb')} MB "
                         "(on the validating machine).")
    files = info.get("files") or []
    if files:
        lines += ["", "## Files", ""] + [f"- `{f}`" for f in files]
    return "\n".join(lines) + "\n"


def push_to_hub(folder: str | Path, repo_id: str, info: dict[str, Any], token: str | None = None,
                private: bool = True, commit_message: str = "Upload trained model") -> dict[str, Any]:
    """Write README.md into `folder`; upload the folder when a token is given, else write
    hub_upload_plan.json (the dry run). Returns what was (or would be) uploaded."""
    folder = Path(folder)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()
                   and p.name not in ("hub_upload_plan.json",))
    (folder / "README.md").write_text(model_card(repo_id, {**info, "files": files}))
    files = sorted(set(files) | {"README.md"})
    plan = {"repo_id": repo_id, "private": private, "files": [
        {"path": f, "bytes": (folder / f).stat().st_size} for f in files], "dry_run": token is None}
    if token is None:
        (folder / "hub_upload_plan.json").write_text(json.dumps(plan, indent=2))
        return plan
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                               commit_message=commit_message, ignore_patterns=["hub_upload_plan.json"])
    return {**plan, "url": str(getattr(commit, "commit_url", commit))}
