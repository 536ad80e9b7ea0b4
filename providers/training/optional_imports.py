"""Optional packages that libraries import only because they are installed, left out of a training process
until the code that uses one brings it back.

peft imports bitsandbytes and TRL's profiling module imports mlflow, trackio and wandb whenever they are
installed; a job that trains no 4-bit layer and logs to none of them still paid for the imports: 1.4 s of CPU
for bitsandbytes (it builds torch inductor's tables) and 1.4 s for mlflow and trackio, 40% of what starting a
training process costs on its own. The job zygote, one node's rank parent and the training entry point leave
them out (`leave_out`); `efficiency.model_kwargs` brings bitsandbytes back for a 4-bit job and
`loggers.logger_args` brings back the loggers a job names (`bring_back`).
"""

from __future__ import annotations

import importlib
import sys

LEFT_OUT = ("bitsandbytes", "mlflow", "trackio", "wandb")

# Modules that bind one of them at their own import when it is installed (as `name = package`): given the
# package when it is brought back. Others ask at call time and cache the answer (cleared by `bring_back`).
BOUND_AT_IMPORT = {
    "trl.extras.profiling": {"mlflow": "mlflow", "trackio": "trackio", "wandb": "wandb"},
    "peft.helpers": {"bitsandbytes": "bnb"},
}
CACHED_CHECKS = ("peft.import_utils", "transformers.utils.import_utils", "transformers.integrations.integration_utils",
                 "accelerate.utils.imports", "trl.import_utils")


def leave_out(packages: tuple[str, ...] = LEFT_OUT) -> None:
    """Make `packages` look not installed to this process (`import` fails, find_spec finds nothing), except
    those already imported. Call before the libraries that import them."""
    for name in packages:
        sys.modules.setdefault(name, None)


def bring_back(package: str) -> None:
    """Undo `leave_out` for `package` (no-op where it was not left out): import it, hand it to the modules that
    bind it at import, and forget what the libraries remembered of its absence. A package that is not installed
    stays missing (its users say so)."""
    if package not in sys.modules or sys.modules[package] is not None:
        return
    del sys.modules[package]
    names = {package} | {bound[package] for bound in BOUND_AT_IMPORT.values() if package in bound}  # bnb too
    for checks in CACHED_CHECKS:
        for attr, value in vars(sys.modules.get(checks, object)).items():
            if any(n in attr for n in names) and hasattr(value, "cache_clear"):
                value.cache_clear()
    try:
        module = importlib.import_module(package)
    except ImportError:
        return
    for importer, bound in BOUND_AT_IMPORT.items():
        loaded = sys.modules.get(importer)
        if loaded is not None and package in bound and vars(loaded).get(bound[package]) is None:
            setattr(loaded, bound[package], module)
