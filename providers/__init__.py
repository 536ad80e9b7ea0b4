"""Llama Stack post-training providers (inline::trl, remote::trl_fsdp) and the training core they share."""

from . import quiet  # noqa: F401  first, so its narrow warning filters precede the libraries' imports
