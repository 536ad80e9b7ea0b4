"""The library versions this project was tested with, and a warning at start-up when others are installed.

The training core relies on internals of accelerate (its FSDP switch on CPU) and of TRL's trainers (how
they compute log-probs and losses): a release outside the tested range may change them silently.
`pyproject.toml` bounds the same ranges; `constraints.txt` pins the exact tested set.
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

log = logging.getLogger("providers.versions")

# package: (lowest tested, first untested); keep in step with pyproject.toml.
TESTED = {
    "torch": ("2.6", "2.15"),
    "transformers": ("5.0", "5.25"),
    "trl": ("1.0", "1.17"),
    "peft": ("0.17", "0.22"),
    "accelerate": ("1.10", "1.16"),
    "llama_stack": ("0.2.12", "0.2.13"),
}


def _key(v: str) -> tuple[int, ...]:
    parts = []
    for piece in v.split("+")[0].split("."):
        digits = "".join(c for c in piece if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def untested_versions() -> list[str]:
    """'name X (tested: >=A, <B)' for each installed package outside its tested range."""
    out = []
    for name, (low, high) in TESTED.items():
        try:
            installed = version(name.replace("_", "-"))
        except PackageNotFoundError:
            continue
        if not _key(low) <= _key(installed) < _key(high):
            out.append(f"{name} {installed} (tested: >={low}, <{high})")
    return out


def warn_untested_versions() -> None:
    for item in untested_versions():
        log.warning("untested library version %s: training may fail or change silently; install the tested set "
                    "with `pip install -c constraints.txt -e .`", item)
