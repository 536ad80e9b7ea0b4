"""Push an exported model to the Hugging Face Hub with a model card; without a token, a dry run that
writes the card and the list of files that would be uploaded. Where a push may go (token, namespaces,
visibility) is the operator's setting (`providers.outbound.HubPublishing`), never a request's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import BadRequest
from ..outbound import HUB_NAME, HubPublishing


class HubSettings(BaseModel):
    """A Hub push: the repository's name and its namespace among those the operator allows; the token,
    the namespaces and whether a repository may be public are the operator's (outbound.hub)."""

    model_config = ConfigDict(extra="forbid")

    repo: str = Field(pattern=HUB_NAME)
    namespace: str | None = Field(None, pattern=HUB_NAME)  # default: the first allowed namespace
    private: bool = True
    upload: Literal["adapter", "merged"] = "adapter"

    @model_validator(mode="before")
    @classmethod
    def _no_client_secrets(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if "token_env" in data:
                raise BadRequest("token_env: a request may not choose the service's Hub token; the operator "
                                 "configures it (outbound.hub.token_env), and without one every push is a dry run")
            if "repo_id" in data:
                raise BadRequest("repo_id: give `repo` (the repository's name) and `namespace` (one the operator "
                                 "allows) instead")
        return data


def hub_target(hub: HubSettings, policy: HubPublishing, field: str) -> dict[str, Any]:
    """What the export step pushes and how, after the operator's rules; errors name `field`."""
    allowed = policy.allowed_namespaces
    if hub.namespace is not None and hub.namespace not in allowed:
        raise BadRequest(f"{field}.namespace: {hub.namespace!r} is not a namespace this service may push to; "
                         f"allowed: {allowed} (outbound.hub.allowed_namespaces)")
    if not hub.private and not policy.allow_public:
        raise BadRequest(f"{field}.private: this service creates private repositories only "
                         "(outbound.hub.allow_public is false); leave private true")
    token_env = policy.token_env if policy.token() else None
    namespace = hub.namespace or (allowed[0] if allowed else "local")
    return {"repo_id": f"{namespace}/{hub.repo}", "private": hub.private, "upload": hub.upload,
            "token_env": token_env, "allow_existing": policy.allow_existing_repos,
            "dry_run_reason": None if token_env else (
                f"the operator's Hub token variable {policy.token_env} is unset" if policy.token_env
                else "the operator configured no Hub token (outbound.hub.token_env)")}


def model_card(repo_id: str, info: dict[str, Any]) -> str:
    """README.md with YAML front matter: base model, library, training data, method, validation results."""
    base, base_id = info.get("base_model"), info.get("base_model_id")
    adapter = info.get("adapter", False)
    meta = ["---", f"library_name: {'peft' if adapter else 'transformers'}", "pipeline_tag: text-generation",
            "tags:", "- trl", "- llama-stack-post-training"]
    if info.get("method"):
        meta.append(f"- {info['method']}")
    if base_id:  # the Hub links a card to its base by id; a model only on the trainer's machine has none
        meta.append(f"base_model: {base_id}")
    meta.append("---")
    lines = [*meta, "", f"# {info.get('name') or repo_id.split('/')[-1]}", ""]
    origin = f" from [`{base_id}`](https://huggingface.co/{base_id})." if base_id else (
        f" from the local model `{base}` (not on the Hub)." if base else ".")
    lines.append(f"{'A PEFT adapter' if adapter else 'A model'} trained with the TRL post-training service{origin}")
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
                private: bool = True, commit_message: str = "Upload trained model", allow_existing: bool = False,
                dry_run_reason: str | None = None) -> dict[str, Any]:
    """Write README.md into `folder`; upload the folder when a token is given, else write
    hub_upload_plan.json (the dry run, with `dry_run_reason`). A repository that already exists is
    committed to only with `allow_existing`, and only when it is private unless `private` is False.
    Returns what was (or would be) uploaded."""
    folder = Path(folder)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()
                   and p.name not in ("hub_upload_plan.json",))
    (folder / "README.md").write_text(model_card(repo_id, {**info, "files": files}))
    files = sorted(set(files) | {"README.md"})
    plan = {"repo_id": repo_id, "private": private, "files": [
        {"path": f, "bytes": (folder / f).stat().st_size} for f in files], "dry_run": token is None}
    if token is None:
        plan["dry_run_reason"] = dry_run_reason or "no Hub token"
        (folder / "hub_upload_plan.json").write_text(json.dumps(plan, indent=2))
        return plan
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    if api.repo_exists(repo_id, repo_type="model"):
        if not allow_existing:
            raise PermissionError(f"hub.repo: {repo_id} already exists and this service commits only to repositories "
                                  "it creates (outbound.hub.allow_existing_repos is false); choose a new name")
        if private and not api.model_info(repo_id).private:
            raise PermissionError(f"hub.repo: {repo_id} exists and is public; this push was to be private")
    else:
        api.create_repo(repo_id, private=private, exist_ok=False, repo_type="model")
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                               commit_message=commit_message, ignore_patterns=["hub_upload_plan.json"])
    return {**plan, "url": str(getattr(commit, "commit_url", commit))}
