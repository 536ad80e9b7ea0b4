"""The environment of every process the server starts: training jobs (local, Slurm, Ray), validation and
export children. One rule for all of them: the server's own environment without its settings and
secrets, plus what the caller gives that child explicitly.

Removed: every TRL_FSDP_* variable (the service's settings, its API and node tokens among them), Hugging
Face tokens, and any variable whose name says it holds a secret (a `_TOKEN`, `_KEY`, `_SECRET`,
`_PASSWORD` or `_CREDENTIALS` part, e.g. WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, GITHUB_TOKEN). A child
gets one of those only when its caller names it in `keep`: the operator handed it to that kind of child
(`--pass-env training=WANDB_API_KEY`, the Hub token an export is configured to push with).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

# The server's own settings and secrets: never in a child's environment, whatever `keep` says.
SERVER_PREFIXES = ("TRL_FSDP_",)
SECRET_NAMES = frozenset({"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN", "HF_API_TOKEN"})
SECRET_WORDS = ("TOKEN", "TOKENS", "KEY", "KEYS", "SECRET", "SECRETS", "PASSWORD", "PASSWD", "CREDENTIAL",
                "CREDENTIALS")
# Kinds of child processes, for `--pass-env KIND=VAR`.
CHILD_KINDS = ("training", "validation", "export")


def is_secret(name: str) -> bool:
    """Whether an environment variable's name says it holds a credential (or is the server's own)."""
    upper = name.upper()
    if upper.startswith(SERVER_PREFIXES) or upper in SECRET_NAMES:
        return True
    # Whole parts only: TOKENIZERS_PARALLELISM is no token; PGPASSWORD and WANDB_API_KEY are secrets.
    return any(part in SECRET_WORDS or part.endswith(("PASSWORD", "SECRET")) for part in upper.split("_"))


def child_env(keep: Iterable[str | None] = (), extra: Mapping[str, str] | None = None,
              base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process: `base` (default: this process's) without secrets (see
    `is_secret`), except the variables named in `keep` (never TRL_FSDP_*), then `extra` on top."""
    base = os.environ if base is None else base
    kept = {k for k in keep if k and not k.upper().startswith(SERVER_PREFIXES)}
    env = {k: v for k, v in base.items() if k in kept or not is_secret(k)}
    return {**env, **(extra or {})}


def parse_pass_env(items: Iterable[str]) -> dict[str, list[str]]:
    """`--pass-env KIND=VAR` values as {kind: [VAR, ...]}; a bad item raises ValueError naming it."""
    passed: dict[str, list[str]] = {}
    for item in items:
        kind, sep, var = item.partition("=")
        if not sep or kind not in CHILD_KINDS or not var.replace("_", "").isalnum() or var[0].isdigit():
            raise ValueError(f"--pass-env: {item!r} must be KIND=VARIABLE with KIND one of {list(CHILD_KINDS)}")
        if var.upper().startswith(SERVER_PREFIXES):
            raise ValueError(f"--pass-env: {var} is the service's own setting; no child gets TRL_FSDP_* variables")
        passed.setdefault(kind, []).append(var)
    return passed
