"""Llama Stack post-training providers (inline::trl, remote::trl_fsdp) and the training core they share."""
