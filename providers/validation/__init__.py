"""Validation report of a trained adapter or full model against its base model (validation.json + .md)."""

from .report import validate_model

__all__ = ["validate_model"]
