"""Path and name checks for requests: names that become directories, paths confined to allowed roots, and
model references (local directories or Hugging Face hub ids) resolved to local causal-LM directories.
Every error is a ValueError naming the request field."""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import json
import re
from collections.abc import Callable
from pathlib import Path, PurePath

from pydantic import BaseModel, Field, field_validator

from .. import access
from ..errors import BadRequest, client_errors
from ..outbound import HubDownloads
from ..training.spec import SAFE_NAME_RE, check_name
from .requests import normalize_dtype

class ProviderDefaults(BaseModel):
    """What the provider config contributes to every job."""

    data_dir: str
    dtype: str = "fp32"
    logging_steps: int = 1
    # Where a request's checkpoint_dir may point, besides DATA_DIR/checkpoints; None: anywhere.
    allowed_checkpoint_roots: list[str] | None = None
    # Where a request's model directories may lie (the HF cache is added); None: anywhere.
    allowed_model_roots: list[str] | None = None
    # How an operator allows another directory, for error messages ("start the service with ...").
    checkpoint_roots_hint: str = "add it to allowed_checkpoint_roots in the provider config"
    model_roots_hint: str = "add it to allowed_model_roots in the provider config"
    # Whether a hub id not in the cache may be downloaded, and up to what size: off unless the operator allows.
    hub_downloads: HubDownloads = Field(default_factory=HubDownloads)
    # A service with users: the folders that hold its users' objects, and who owns a path inside them (a job's
    # run dir, an `ft:` model, a task's folder...; None: the service's own). A member names only its own.
    private_dirs: list[str] = Field(default_factory=list)
    path_owner: Callable[[Path], str | None] | None = Field(None, exclude=True)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        return normalize_dtype(v, "dtype (the provider config's default precision)")

    @property
    def checkpoints_root(self) -> Path:
        return Path(self.data_dir).expanduser() / "checkpoints"

    @property
    def checkpoints_dir(self) -> Path:
        """Where relative checkpoint_dir values land (the Llama Stack examples send ./checkpoints): a
        member's own folder under DATA_DIR/checkpoints/users/ on a service with users."""
        root = self.checkpoints_root
        user = access.current()
        return root / "users" / user.name if self.path_owner and user and not user.is_admin else root


# A Hugging Face hub id: "org/name" (or a bare "name"), as users write `meta-llama/Llama-3.2-1B-Instruct`.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


def check_job_uuid(job_uuid: str) -> None:
    with client_errors():
        check_name(job_uuid, "job_uuid")


def check_path_text(value: str, field: str) -> None:
    """A path from a request: no NUL, no '..' component (a request never climbs out of a directory)."""
    if "\x00" in value:
        raise BadRequest(f"{field}: contains a NUL character")
    if len(value) > 4096:
        raise BadRequest(f"{field}: longer than 4096 characters")
    parts = PurePath(value).parts
    if ".." in parts:
        raise BadRequest(f"{field}: {value!r} has a '..' component; name the directory without parent references")
    if any(len(part.encode("utf-8", "surrogatepass")) > 255 for part in parts):
        raise BadRequest(f"{field}: a path component is longer than 255 bytes")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{field}: not valid UTF-8 text") from None


def is_within(path: Path, roots: list[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def confine(path: Path, roots: list[str] | None, field: str, value: str, hint: str,
            defaults: ProviderDefaults | None = None) -> Path:
    """`path` with symlinks resolved, which must lie under one of `roots` (None: anywhere) and, inside a
    service's data dir, belong to the requesting user (`defaults.path_owner`): another user's path is
    refused with the same words as a path outside the roots, whether it exists or not."""
    resolved = path.expanduser().resolve()
    allowed = [Path(r).expanduser().resolve() for r in roots] if roots is not None else None
    if (allowed is not None and not is_within(resolved, allowed)) or not owned(resolved, defaults):
        shown = [str(r) for r in allowed] if allowed is not None else "of this service"
        raise BadRequest(f"{field}: {value!r} is outside the allowed directories {shown}; to allow it, {hint}")
    return resolved


def owned(resolved: Path, defaults: ProviderDefaults | None) -> bool:
    """Whether the requesting user may name `resolved` (a resolved path): anything outside the service's
    private dirs, and inside them what `defaults.path_owner` says is the user's (admins, the service: all)."""
    if defaults is None or defaults.path_owner is None:
        return True
    if not is_within(resolved, [Path(d).resolve() for d in defaults.private_dirs]):
        return True
    return access.can_see(defaults.path_owner(resolved))


def hf_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def local_models(defaults: ProviderDefaults, limit: int = 12) -> list[str]:
    """The model directories in the allowed model roots (a root that is a model, or its sub-directories that
    are), the service's private dirs left out: what an error about an unknown model offers instead."""
    private = [Path(d).resolve() for d in defaults.private_dirs]
    found: list[str] = []
    for root in map(Path, defaults.allowed_model_roots or []):
        if is_within(root.resolve(), private) or not root.is_dir():
            continue
        candidates = [root] if (root / "config.json").is_file() else sorted(root.iterdir())
        found += [str(c) for c in candidates if (c / "config.json").is_file()]
    return found[:limit]


def hub_snapshot(repo_id: str, field: str, policy: HubDownloads, models: list[str] | None = None) -> Path:
    """A hub model's snapshot directory from the Hugging Face cache. Downloaded only when the operator allows
    it (`policy.allow_download`, HF_HUB_OFFLINE unset) and the repository's files in total fit
    `policy.max_download_gb`, checked before anything is downloaded."""
    from huggingface_hub import HfApi, constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))  # the cache only: no network
    except Exception:  # noqa: BLE001 - not cached (or an unusable name): a download may still be allowed
        pass
    if constants.HF_HUB_OFFLINE or not policy.allow_download:
        why = ("HF_HUB_OFFLINE=1 forbids downloading it" if constants.HF_HUB_OFFLINE else
               "this service downloads no models (its operator allows it with hub_downloads.allow_download)")
        if "/" not in repo_id:  # no ORG/NAME: most likely a model name from elsewhere (an OpenAI model), not a repo
            offer = f"one of its models by path: {', '.join(models)}" if models else "a model directory by its path"
            raise BadRequest(
                f"{field}: {repo_id!r} is not a model of this service (no such directory, and no Hugging Face "
                f"model by that name in its cache; {why}). Name {offer}, or a Hugging Face model id ORG/NAME in "
                f"its cache")
        raise BadRequest(
            f"{field}: {repo_id!r} is not a local directory and not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); {why}. Download it on a machine with network access "
            f"(`hf download {repo_id}`) into that cache, or give a local directory")
    cap = int(policy.max_download_gb * 1e9)
    try:
        info = HfApi().model_info(repo_id, files_metadata=True)
        sizes = [s.size for s in info.siblings or []]
        if any(size is None for size in sizes):
            raise BadRequest(f"{field}: the Hub does not say how large {repo_id!r} is; it is not downloaded")
        if sum(sizes) > cap:
            raise BadRequest(f"{field}: {repo_id!r} is {sum(sizes) / 1e9:.2f} GB, over this service's download "
                             f"limit of {policy.max_download_gb} GB (hub_downloads.max_download_gb)")
        # The revision whose sizes were checked, not whatever the branch points to a moment later.
        return Path(snapshot_download(repo_id, revision=info.sha))
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - unknown repo, gated, no network: all bad input here
        raise BadRequest(f"{field}: {repo_id!r} is not a local directory and could not be fetched from the "
                         f"Hugging Face Hub: {type(e).__name__}: {str(e)[:300]}") from None


def resolve_model(ref: str, field: str, defaults: ProviderDefaults) -> str:
    """A request's model (a local directory, or a hub id resolved through the Hugging Face cache) as a
    local causal-LM directory inside the allowed model roots; errors name the field."""
    if not isinstance(ref, str) or not ref:
        raise BadRequest(f"{field}: required (a model directory or a Hugging Face model id)")
    check_path_text(ref, field)
    local = Path(ref).expanduser()
    is_path = ref.startswith(("/", "./", "~")) or not HUB_ID.fullmatch(ref)
    path = (local if is_path or local.is_dir() else
            hub_snapshot(ref, field, defaults.hub_downloads, local_models(defaults)))
    roots = None
    if defaults.allowed_model_roots is not None:
        roots = [*defaults.allowed_model_roots, str(hf_cache_dir())]
    path = confine(path, roots, field, ref, defaults.model_roots_hint, defaults)  # before any existence check
    check_model_path(str(path), field)
    return str(path)


def hub_origin(ref: str, path: str) -> tuple[str | None, str | None]:
    """(hub id, snapshot commit) when a request's model `ref` was a hub id that resolved to its snapshot in the
    Hugging Face cache (`.../models--ORG--NAME/snapshots/COMMIT`); (None, None) for a local directory."""
    snapshot = Path(path)
    if (HUB_ID.fullmatch(ref) and snapshot.parent.name == "snapshots"
            and snapshot.parent.parent.name == "models--" + ref.replace("/", "--")):
        return ref, snapshot.name
    return None, None


def checkpoint_output_dir(checkpoint_dir: str | None, result_name: str, defaults: ProviderDefaults) -> str | None:
    """Where a new job writes its checkpoints: CHECKPOINT_DIR/RESULT_NAME (None: inside its run dir).

    A relative checkpoint_dir is taken under DATA_DIR/checkpoints, never the server's working directory.
    The directory must be new: a job resumes only from checkpoints it wrote itself."""
    if checkpoint_dir is None:
        return None
    if not isinstance(checkpoint_dir, str) or not checkpoint_dir:
        raise BadRequest("checkpoint_dir: must be a non-empty path")
    check_path_text(checkpoint_dir, "checkpoint_dir")
    base = Path(checkpoint_dir).expanduser()
    if not base.is_absolute():
        base = defaults.checkpoints_dir / base
    roots = None
    if defaults.allowed_checkpoint_roots is not None:
        roots = [str(defaults.checkpoints_dir), *defaults.allowed_checkpoint_roots]
    out = confine(base, roots, "checkpoint_dir", checkpoint_dir, defaults.checkpoint_roots_hint, defaults) / result_name
    if out.exists():
        raise BadRequest(f"checkpoint_dir: {str(out)!r} already exists; a new job writes a new directory "
                         "(choose another checkpoint_dir or result name)")
    return str(out)


def result_name_of(finetuned_model: str, field: str = "finetuned_model") -> str:
    """The name a trained model is given (artifacts, checkpoint directory): `org/name` becomes `org--name`."""
    name = finetuned_model.replace("/", "--")
    if not SAFE_NAME_RE.fullmatch(name):
        raise BadRequest(f"{field}: {finetuned_model[:200]!r} names the trained model, so it must be 1-128 letters, "
                         "digits, '.', '_', '-' or '/'")
    return name


@functools.cache
def transformers_dir() -> Path:
    return Path(importlib.util.find_spec("transformers").origin).parent


@functools.cache
def causal_lm_classes() -> dict[str, str]:
    """transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES (model_type -> class name), read from its source:
    importing its auto modules imports torch (2-3.6 s of CPU on a service's first request) for a table of
    strings. The import where the source no longer holds the table as a literal."""
    name = "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"
    try:
        for node in ast.parse((transformers_dir() / "models" / "auto" / "modeling_auto.py").read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
                return dict(ast.literal_eval(node.value.args[0]))  # OrderedDict([(type, class), ...])
    except (OSError, SyntaxError, ValueError, AttributeError, IndexError, TypeError):
        pass
    return dict(getattr(importlib.import_module("transformers.models.auto.modeling_auto"), name))


def known_model_type(model_type: object) -> bool:
    """A model_type transformers has a model of: a causal LM's, or one of its model packages."""
    if not isinstance(model_type, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,100}", model_type):
        return False
    return model_type in causal_lm_classes() or (transformers_dir() / "models" / model_type.replace("-", "_")).is_dir()


def check_model_path(path: str, field: str) -> None:
    """A local directory holding a causal LM config; the message names the field."""
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise BadRequest(f"{field}: {path!r} is not a local model directory (no config.json there)")
    try:
        if (p / "config.json").stat().st_size > 4 << 20:
            raise ValueError("config.json is over 4 MiB")
        config = json.loads((p / "config.json").read_text())
        if not isinstance(config, dict) or "model_type" not in config:
            raise ValueError("config.json holds no JSON object with a model_type")
        model_type = config["model_type"]
        if not known_model_type(model_type):
            raise ValueError(f"model_type {str(model_type)[:100]!r} is not one this service's transformers knows")
    except (OSError, ValueError, KeyError, TypeError) as e:  # any load failure is bad input
        raise BadRequest(f"{field}: {path!r} has a config that does not load: {type(e).__name__}: {e}") from None
    archs = config.get("architectures") or []
    causal = causal_lm_classes()
    if archs:
        # The classes the checkpoint was saved from decide: a BERT encoder ("BertModel", "BertForMaskedLM")
        # has model_type 'bert', which the causal-LM mapping also lists (BertLMHeadModel), yet it is no causal LM.
        causal_classes = set(causal.values())
        is_causal = any(a in causal_classes or str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    else:
        is_causal = model_type in causal
    if not is_causal:
        raise BadRequest(f"{field}: {path!r} is a {model_type!r} model ({archs}), not a causal LM")
