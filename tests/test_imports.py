"""The package's import structure: no import circles anywhere, and the training core imports nothing above it.

Fast: one interpreter imports the libraries once, then forks one child per module of providers/; each child
drops every `providers` module and imports its module first, as a fresh `python -c "import M"` would.
A circle shows up as an ImportError ("partially initialized module") in the module that starts it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PROVIDERS = REPO_ROOT / "providers"
# Needs an optional extra (`pip install .[ray]`); its import is tested where ray is installed.
OPTIONAL = {"providers.remote_fsdp.ray_launch": "ray"}

EACH_MODULE_ALONE = r"""
import importlib, json, os, sys, traceback
modules = json.loads(sys.argv[1])
for m in modules:  # the libraries once, here: the children only import the project's own modules
    try:
        importlib.import_module(m)
    except Exception:
        pass
failures = {}
for m in modules:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        for name in [n for n in sys.modules if n == "providers" or n.startswith("providers.")]:
            del sys.modules[name]
        try:
            importlib.import_module(m)
            out = b""
        except BaseException:
            out = traceback.format_exc().encode()
        os.write(w, out[-4000:])
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    os.waitpid(pid, 0)
    if out:
        failures[m] = out.decode()
print(json.dumps(failures))
"""


def modules() -> list[str]:
    """Every module of providers/ but the `__main__` ones (importing those runs them)."""
    names = []
    for path in sorted(PROVIDERS.rglob("*.py")):
        parts = path.relative_to(REPO_ROOT).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


@pytest.mark.slow  # imports the whole stack once per module: half a minute
def test_every_module_imports_alone():
    wanted = [m for m in modules() if m not in OPTIONAL or _installed(OPTIONAL[m])]
    out = subprocess.run([sys.executable, "-c", EACH_MODULE_ALONE, json.dumps(wanted)], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    failures = json.loads(out.stdout.strip().splitlines()[-1])
    assert not failures, "\n\n".join(f"{m}:\n{tb}" for m, tb in failures.items())


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a module of providers/, function-level ones too."""
    package = list(path.relative_to(REPO_ROOT).with_suffix("").parts[:-1])
    if path.name == "__init__.py":
        package = list(path.relative_to(REPO_ROOT).parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join([*base, node.module] if node.module else base)
            if node.module is None:  # `from . import x`: the names are modules of the package
                found += [(node.lineno, f"{name}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, name))
    return found


# Dependencies point down: each package may import, of providers/, only itself and what this table names.
# The training core sits on the graders (GRPO's spec and recipe use them), both on the unknown-key checks;
# the node registry sits below the launchers and the service that place work with it.
BELOW = {
    "providers.keys": (),
    "providers.graders": ("providers.keys",),
    "providers.training": ("providers.graders", "providers.keys"),
    "providers.cluster": ("providers.training", "providers.keys", "providers.errors", "providers.state_files"),
}


def _module_files(package: str) -> list[Path]:
    path = REPO_ROOT / package.replace(".", "/")
    return sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]


@pytest.mark.parametrize("package", list(BELOW))
def test_dependencies_point_down(package):
    """The core packages import nothing above them: the training core no HTTP, jobs, service or tools; the
    graders nothing of the training core (which imports them); the node registry no launcher and no service."""
    allowed = (package, *BELOW[package])
    above = []
    for path in _module_files(package):
        for line, name in imported_modules(path):
            if name.split(".")[0] == "providers" and name != "providers" and not any(
                    name == a or name.startswith(a + ".") for a in allowed):
                above.append(f"{path.relative_to(REPO_ROOT)}:{line}: {name}")
    assert not above, "\n".join(above)


def test_launchers_import_nothing_of_the_service():
    """A launcher knows how to start the entry point, not the service that calls it: the service builds the
    launchers (and hands the nodes launcher what it needs), never the other way round."""
    wrong = [f"{path.relative_to(REPO_ROOT)}:{line}: {name}"
             for path in _module_files("providers.launchers") for line, name in imported_modules(path)
             if name.startswith("providers.remote_fsdp")]
    assert not wrong, "\n".join(wrong)


@pytest.mark.slow  # one fresh interpreter
def test_the_service_config_imports_no_launcher_module():
    """Naming a launcher costs no import (the registry loads a launcher's module on first use): the service
    config with its defaults loads the registry and the torchrun options, no launcher."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import providers.remote_fsdp.service.config"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    launchers = sorted(m for m in imported if m.startswith("providers.launchers."))
    assert launchers == ["providers.launchers.torchrun"], launchers


@pytest.mark.slow  # one fresh interpreter
def test_a_service_and_its_first_requests_import_no_training_stack(tmp_path):
    """The service's app, built with every add-on, and a request's checks of a model directory and an FSDP
    mesh import neither torch, transformers nor the tinker SDK (whose types import torch): 2-4 s of CPU
    each, in every service start and first request, for a service that may never train here."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    code = f"""
import sys
from providers.remote_fsdp.service.app import create_app
from providers.remote_fsdp.service.config import ServiceConfig
from providers.api.paths import check_model_path
from providers.launchers.base import check_mesh
from providers.launchers.torchrun import TorchRunOptions
from providers.training.spec import FsdpSpec
create_app(ServiceConfig(data_dir={str(tmp_path / "data")!r}))
check_model_path({str(model)!r}, "model")
check_mesh(FsdpSpec(), TorchRunOptions(nproc_per_node=2))
print(sorted(m for m in ("torch", "transformers", "tinker", "peft") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_the_service_core_imports_no_add_on():
    """Add-ons (pipelines, workflows, operator tools, openai_ft) mount themselves on the core; only app.py
    lists them."""
    add_ons = ("providers.pipelines", "providers.workflows", "providers.operator_tools", "providers.openai_ft")
    wrong = []
    for path in sorted((PROVIDERS / "remote_fsdp" / "service").rglob("*.py")):
        if path.name == "app.py":
            continue
        for line, name in imported_modules(path):
            if name.startswith(add_ons):
                wrong.append(f"{path.relative_to(REPO_ROOT)}:{line}: {name}")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles_even_inside_functions():
    """No two modules import each other, directly or around a loop, counting imports inside functions (a
    lazy import hides a circle at start-up, not from a reader)."""
    names = set(modules())
    graph = {}
    for m in names:
        path = REPO_ROOT / (m.replace(".", "/") + ".py")
        path = path if path.exists() else REPO_ROOT / m.replace(".", "/") / "__init__.py"
        graph[m] = set()
        for _, name in imported_modules(path):
            while name and name not in names:  # `from pkg.mod import function` -> pkg.mod
                name = name.rpartition(".")[0]
            if name and name != m and not m.startswith(name + "."):  # a module's own packages load first anyway
                graph[m].add(name)
    circles = [c for c in _strongly_connected(graph) if len(c) > 1]
    assert not circles, circles


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the groups of modules that reach each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups
