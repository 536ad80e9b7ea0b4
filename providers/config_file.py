"""Operator config files (`--launchers-config`, `--outbound-config`): one YAML (or JSON) section read into
its model, a bad file stopping start-up with one line that names the flag and the key."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)


def read_section(path: str, flag: str, section: str, model: type[Model]) -> Model:
    """`section` of the file at `path` (or the whole file, when it has no such key) as a `model`."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).expanduser().read_text()) or {}
        return model.model_validate(data.get(section, data))
    except (OSError, yaml.YAMLError, AttributeError) as e:  # AttributeError: the file holds no mapping
        raise SystemExit(f"{flag}: cannot read {path}: {e}") from None
    except ValidationError as e:
        first = e.errors()[0]
        raise SystemExit(f"{flag} {path}: {section}.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
