"""Narrow filters for library warnings a user of this package cannot act on.

Imported by `providers/__init__.py`, so every process that imports this package (the FSDP service, the
inline provider inside `llama stack run`, training jobs, torchrun ranks, the zygote, the CLI) installs
them before it imports the libraries that would warn. Each filter matches one message from one module;
anything else still shows. `llama stack run` imports llama_stack before it loads a provider, so its one
import-time warning needs the `PYTHONWARNINGS` value below in the server's environment.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# llama_stack 0.2.12's SqlStoreConfig (providers/utils/sqlstore/sqlstore.py) puts `default="sqlite"` in an
# Annotated Field of a union; pydantic >= 2.12 warns that the default is ignored there. Every run.yaml names
# its store type, so nothing depends on that default.
SQLSTORE_DEFAULT = "The 'default' attribute with value 'sqlite' was provided to the `Field()` function"
# The same filter for the environment of a process that imports llama_stack before this package
# (`llama stack run`): -W syntax, message prefix : category : exact module.
PYTHONWARNINGS = f"ignore:{SQLSTORE_DEFAULT}:UserWarning:pydantic._internal._generate_schema"


class _DropMessage(logging.Filter):
    """Drops records of one logger whose message starts with a given text."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def install() -> None:
    """Install the filters (idempotent: warnings dedupes identical filters, a logger keeps one of each)."""
    warnings.filterwarnings("ignore", message=SQLSTORE_DEFAULT.replace("(", r"\(").replace(")", r"\)"),
                            category=UserWarning, module=r"pydantic\._internal\._generate_schema")
    # TRL 1.16 (trl/models/utils.py) reads the deprecated `model.is_gradient_checkpointing`; transformers
    # warns on each DPO job. Only a TRL release can change that line.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                            module=r"transformers\.modeling_utils")
    # TRL keeps newer trainers (ORPO, CPO) in trl.experimental, whose import warns that its API may change; the
    # recipes pin TRL's version (constraints.txt) and tests/test_preference_methods.py trains each one.
    warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'", category=UserWarning,
                            module=r"providers\.training\.(recipes\.\w+|preload)$")
    # bitsandbytes, on import on an AVX512-BF16 CPU, tries to fetch an optional 4-bit CPU kernel from the Hugging
    # Face Hub through the `kernels` package and falls back to its own kernel when it cannot. Installing
    # `kernels` does not help offline (the fetch fails instead); the fallback only matters for 4-bit on CPU.
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropMessage) for f in bnb.filters):
        bnb.addFilter(_DropMessage("Failed to load CPU gemm_4bit_forward from kernels-community"))
    # transformers falls back to numbered checkpoint order where a file system's mtimes are coarse; the
    # checkpoints here are numbered, so the fallback is the order they have anyway.
    sorting = logging.getLogger("transformers.trainer_utils")
    if not any(isinstance(f, _DropMessage) for f in sorting.filters):
        sorting.addFilter(_DropMessage("mtime may not be reliable"))
    # accelerate's INFO lines (FSDP state saved, a dataset without a length) say nothing a job's owner acts on.
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    no_progress_bars()


def no_progress_bars() -> None:
    """No progress bars (`Loading weights`, dataset `map`s) from the Hugging Face libraries: in the service's and
    jobs' logs they are carriage-return noise, and in a terminal they cross `--watch`'s lines. The variables
    reach child processes (training jobs, ranks); a library imported before this package is told directly.
    Setting a variable to 0 brings the bars back."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # huggingface_hub, and transformers through it
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        if "huggingface_hub" in sys.modules:
            sys.modules["huggingface_hub"].utils.disable_progress_bars()
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    if os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1" and "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


install()
