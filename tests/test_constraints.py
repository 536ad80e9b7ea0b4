"""The tested set installs anywhere: constraints.txt holds only `name==version` pins a registry serves, and
every dependency of pyproject.toml (extras included) is pinned there. A `pip freeze` of a wheel installed
from a local file wrote `name @ file:///tmp/...` once, and both README commands failed on every other
machine while CI (on the machine that had the file) stayed green."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PLAIN_PIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[0-9][0-9A-Za-z.!]*$")  # no local label (+cpu), no URL


def pin_problems(text: str) -> list[str]:
    """Every line of a constraints file that is not a plain registry pin, as 'line N: why'."""
    problems = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            problems.append(f"line {number}: {line!r} is a pip option (-e, -r, --index-url ...), not a pin")
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement as e:
            problems.append(f"line {number}: {line!r} is not a requirement ({e}): a local path?")
            continue
        if req.url:
            problems.append(f"line {number}: {req.name} is pinned to {req.url} (a direct reference: a file, path "
                            "or VCS checkout that exists only where it was frozen); pin name==version")
        elif not PLAIN_PIN.match(line):
            problems.append(f"line {number}: {line!r} is not name==version (without a local label such as +cpu)")
    return problems


def pinned_names(text: str) -> set[str]:
    return {canonicalize_name(m.group(1)) for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", text, re.M)}


def unpinned_dependencies(pyproject: dict, pins: set[str]) -> list[str]:
    """Dependencies of the project (and of every extra) that the constraints leave unpinned."""
    project = pyproject["project"]
    deps = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        deps += extra
    return sorted({Requirement(d).name for d in deps if canonicalize_name(Requirement(d).name) not in pins})


def test_constraints_are_plain_registry_pins():
    problems = pin_problems((ROOT / "constraints.txt").read_text())
    assert not problems, "constraints.txt (regenerate with scripts/freeze-constraints.sh):\n" + "\n".join(problems)


def test_every_dependency_is_pinned():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    missing = unpinned_dependencies(pyproject, pinned_names((ROOT / "constraints.txt").read_text()))
    assert not missing, f"pyproject.toml dependencies without a pin in constraints.txt: {missing}"


@pytest.mark.parametrize("line", [
    "swagger_ui_bundle @ file:///tmp/sw/swagger_ui_bundle-1.1.0-py3-none-any.whl#sha256=f752",
    "-e git+https://example.invalid/x.git#egg=x",
    "-e .",
    "./wheels/foo-1.0-py3-none-any.whl",
    "foo @ git+https://example.invalid/foo.git@v1",
    "torch==2.13.0+cpu",
    "foo>=1.0",
    "foo",
])
def test_the_check_refuses_each_kind_of_direct_reference(line):
    assert pin_problems(f"bar==1.0\n{line}\n"), line


def test_the_check_finds_a_dependency_left_unpinned():
    pyproject = {"project": {"dependencies": ["foo>=1", "Bar_Baz"], "optional-dependencies": {"x": ["qux[a]==2"]}}}
    assert unpinned_dependencies(pyproject, pinned_names("foo==1.0\nbar-baz==2\n")) == ["qux"]
