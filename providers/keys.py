"""Unknown keys are errors at every level: the error names the key and the nearest accepted one.

A typo (`bacth_size`) in a request or a job file must never fall back silently to a default. Every request
and spec model inherits `KnownKeys`; its error has the type `unknown_key` and carries the key in `ctx`, so
`error_loc` can name the full path (`training_config.data_config.bacth_size`).

It sits below every package that declares models (the training core, the graders, the API, the launchers),
so that none of them imports another only for this.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any, get_args

from pydantic import BaseModel, model_validator
from pydantic_core import PydanticCustomError

UNKNOWN_KEY = "unknown_key"


def accepted_keys(model: type[BaseModel]) -> list[str]:
    """The keys a model accepts: its field names and their aliases."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        keys.append(name)
        if field.alias and field.alias != name:
            keys.append(field.alias)
    return keys


def nearest(key: str, accepted: Iterable[str]) -> str | None:
    """The accepted key closest to a typo (difflib), or None when none is close."""
    match = difflib.get_close_matches(str(key), list(accepted), n=1, cutoff=0.6)
    return match[0] if match else None


def unknown_key_message(key: str, accepted: Iterable[str]) -> str:
    """`unknown key 'bacth_size'; did you mean 'batch_size'?` (or the accepted keys when none is close)."""
    accepted = sorted(accepted)
    near = nearest(key, accepted)
    hint = f"did you mean {near!r}?" if near else f"accepted: {', '.join(accepted)}"
    return f"unknown key {str(key)[:100]!r}; {hint}"


def check_keys(data: Any, accepted: Iterable[str]) -> None:
    """Raise an `unknown_key` validation error for the first key of `data` (a dict) not in `accepted`."""
    if not isinstance(data, dict):
        return
    accepted = list(accepted)
    for key in data:
        if key not in accepted:
            raise PydanticCustomError(UNKNOWN_KEY, unknown_key_message(key, accepted), {"key": str(key)[:100]})


class KnownKeys(BaseModel):
    """A model whose unknown keys are an error naming the nearest accepted key (pydantic's own
    `extra="forbid"` says only 'Extra inputs are not permitted')."""

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        check_keys(data, accepted_keys(cls))
        return data


def error_loc(error: dict[str, Any]) -> tuple:
    """A pydantic error's location; an unknown key's error ends with the key itself."""
    loc = tuple(error.get("loc") or ())
    if error.get("type") == UNKNOWN_KEY and (error.get("ctx") or {}).get("key") is not None:
        loc = (*loc, error["ctx"]["key"])
    return loc


def keys_checker(*models: type[BaseModel]):
    """A before-validator for a field typed with models this project does not own (Llama Stack's): a dict's
    keys must be those of the model its `type` selects (or of the only model)."""

    def check(value: Any) -> Any:
        if isinstance(value, dict):
            chosen = models[0] if len(models) == 1 else next(
                (m for m in models if "type" in m.model_fields and m.model_fields["type"].default == value.get("type")),
                None)
            if chosen is not None:  # an unknown `type` is the union's own error
                check_keys(value, accepted_keys(chosen))
        return value

    return check


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (through Optional, unions, Annotated and lists)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def first_unknown_key(model: type[BaseModel], data: Any, path: tuple = ()) -> tuple[tuple, str] | None:
    """The first unknown key in `data` at any depth of `model`'s fields, as (full key path, message); None
    when every key is known. For checking a document (a job file) before it becomes a request."""
    if isinstance(data, list):
        for i, item in enumerate(data):
            found = first_unknown_key(model, item, (*path, i))
            if found:
                return found
        return None
    if not isinstance(data, dict):
        return None
    accepted = accepted_keys(model)
    by_alias = {f.alias: name for name, f in model.model_fields.items() if f.alias}
    for key, value in data.items():
        if key not in accepted:
            return (*path, key), unknown_key_message(key, accepted)
        models = _models_in(model.model_fields[by_alias.get(key, key)].annotation)
        if len(models) > 1 and isinstance(value, dict):  # a union: the model its `type` selects
            models = [m for m in models if "type" in m.model_fields and m.model_fields["type"].default == value.get("type")]
        if len(models) == 1:
            found = first_unknown_key(models[0], value, (*path, key))
            if found:
                return found
    return None
