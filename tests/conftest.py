"""Shared fixtures: tiny offline models, toy data, and Llama Stack servers started as subprocesses.

Nothing here reaches beyond 127.0.0.1 and nothing is fetched from a model hub.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import helpers` from any test module

from helpers import (  # noqa: E402
    free_port,
    kill_pids,
    log_tail,
    processes_mentioning,
    stop_process_group,
    wait_for_health,
)
# The operators' tools service: defined here, so every module that uses it (test_cli*, test_dashboard) shares
# one for the session; a module importing a fixture gets its own copy (another service).
from operator_fixtures import cli_env, ops_service  # noqa: E402, F401 - fixtures

REPO_ROOT = Path(__file__).resolve().parent.parent
RUN_YAML = REPO_ROOT / "run.yaml"
BUILDER_PATH = REPO_ROOT / "scripts" / "build_tiny_models.py"

# Never touch a model hub, from this process or from anything it starts.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "WANDB_MODE": "disabled",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}
os.environ.update(OFFLINE_ENV)
# One torch thread per process, in this process and in every service, job and rank it starts: two workers share
# two cores, and a tiny model's ops are too small to split, so torch's default (a thread per core) only spins
# its OpenMP threads against the other processes. A 10-step SFT job of the tiny student: 0.5 s of CPU with one
# thread, 0.8-4.4 s with two (more, the busier the machine). A test that needs a thread count sets its own.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def load_builder():
    """scripts/build_tiny_models.py as a module (scripts/ is not a package)."""
    mod = sys.modules.get("build_tiny_models")
    if mod is None:
        spec = importlib.util.spec_from_file_location("build_tiny_models", BUILDER_PATH)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["build_tiny_models"] = mod
        spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def tiny_builder():
    return load_builder()


def fast_tier(config: pytest.Config) -> bool:
    """True under `pytest -m "not slow"` (scripts/test-fast.sh)."""
    return " ".join(config.getoption("markexpr").split()) == "not slow"


@pytest.fixture(scope="session")
def tiny_models(request, tiny_builder, tmp_path_factory) -> dict[str, str]:
    """{"student", "teacher", "other_tokenizer_student"} -> model directories, built once per session.

    Set TRL_TEST_MODELS_DIR to reuse a build across sessions (the builder checks its version marker).
    The fast tier only reuses a build: its tests that need a model are skipped, saying so, where none is."""
    given = os.environ.get("TRL_TEST_MODELS_DIR")
    # under pytest-xdist, the workers share one build (the builder locks it) in the run's common temp dir
    shared = tmp_path_factory.getbasetemp().parent if os.environ.get("PYTEST_XDIST_WORKER") else None
    out = given or str(shared / "tiny_models" if shared else tmp_path_factory.mktemp("tiny_models"))
    if fast_tier(request.config) and not tiny_builder._is_built(Path(out), 0):
        # A cold build pretrains the teacher: minutes of CPU, far beyond the fast tier's budget.
        build = f"`python scripts/build_tiny_models.py --out {given or 'DIR'}` (minutes of CPU)"
        pytest.skip(f"fast tier: no tiny models in {given}; build them once: {build}" if given else
                    f"fast tier: TRL_TEST_MODELS_DIR is not set; build the tiny models once: {build}, "
                    "then set TRL_TEST_MODELS_DIR=DIR")
    models = tiny_builder.build_tiny_models(out)
    # Training services started by the tests (and their children) may read models from here: the service
    # refuses model directories outside its allowed roots.
    os.environ["TRL_FSDP_ALLOWED_MODEL_ROOTS"] = str(Path(out).resolve())
    return models


@pytest.fixture(scope="session")
def toy_data(tiny_builder) -> dict[str, list[dict]]:
    """instruct / dialog / preference / heldout_prompts rows of the 'reverse the letters' task."""
    return tiny_builder.make_toy_datasets()


# -- Llama Stack servers ---------------------------------------------------------------------------
class LlamaStackServer:
    """A `llama stack run` subprocess, leader of its own process group."""

    def __init__(self, proc: subprocess.Popen, port: int, data_dir: Path, log_path: Path):
        self.proc = proc
        self.port = port
        self.data_dir = Path(data_dir)
        self.log_path = log_path
        self.base_url = f"http://127.0.0.1:{port}"

    @property
    def pgid(self) -> int:
        return self.proc.pid

    def client(self, **kw):
        from llama_stack_client import LlamaStackClient

        # No retries: a 5xx must show up as one failure, not as five slow ones.
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 120)
        return LlamaStackClient(base_url=self.base_url, **kw)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM the server's process group (its shutdown stops running jobs), then SIGKILL."""
        stop_process_group(self.proc)

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)


def llama_cli() -> str:
    """The `llama` command of the environment running the tests."""
    beside = Path(sys.executable).parent / "llama"
    return str(beside) if beside.exists() else (shutil.which("llama") or "llama")


def start_llama_stack(
    run_yaml: str | Path,
    data_dir: str | Path,
    port: int | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 180.0,
) -> LlamaStackServer:
    """Start `llama stack run RUN_YAML --port PORT` with TRL_POST_TRAINING_DIR=data_dir in its own process
    group and wait for GET /v1/health. A port of None picks a free one (retrying if another process takes
    it first). The caller stops it (`server.stop()`), or use the `llama_stack_factory` fixture."""
    run_yaml = Path(run_yaml).resolve()
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    attempts = 1 if port is not None else 3
    last_error: Exception | None = None
    for attempt in range(attempts):
        chosen = port if port is not None else free_port()
        log_path = data_dir / f"server-{chosen}.log"
        full_env = {
            **os.environ,
            **OFFLINE_ENV,
            "TRL_POST_TRAINING_DIR": str(data_dir),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [llama_cli(), "stack", "run", str(run_yaml), "--port", str(chosen)],
                cwd=str(run_yaml.parent),  # run.yaml names ./providers.d relative to the repository root
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        server = LlamaStackServer(proc, chosen, data_dir, log_path)
        try:
            wait_for_health(server.base_url, timeout=timeout, proc=proc, log_file=log_path)
            if proc.poll() is not None:  # something else answered on that port and ours could not bind
                raise RuntimeError(f"llama stack exited with code {proc.returncode}" + server.log_tail())
            return server
        except Exception as e:  # noqa: BLE001 - retried with another port, then re-raised
            last_error = e
            server.stop()
    raise RuntimeError(f"llama stack did not start after {attempts} attempt(s): {last_error}")


def kill_leftover_processes(data_dir: str | Path) -> list[tuple[int, str]]:
    """SIGKILL processes (started by these tests) whose command line names `data_dir`; return them."""
    leftovers = processes_mentioning(str(data_dir))
    kill_pids([pid for pid, _ in leftovers])
    return leftovers


@pytest.fixture(scope="module")
def llama_stack_factory():
    """`factory(run_yaml, data_dir, port=None, env=None) -> LlamaStackServer`; every server it started
    is stopped (process group: SIGTERM, then SIGKILL) at the end of the module, and any training process
    still naming its data dir is killed."""
    servers: list[LlamaStackServer] = []

    def factory(run_yaml=RUN_YAML, data_dir=None, port=None, env=None, timeout=180.0) -> LlamaStackServer:
        server = start_llama_stack(run_yaml, data_dir, port=port, env=env, timeout=timeout)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop()
    for server in servers:
        kill_leftover_processes(server.data_dir)


@pytest.fixture(scope="session")
def run_yaml() -> Path:
    return RUN_YAML


# -- the fast tier ---------------------------------------------------------------------------------
# `pytest -m "not slow"` (scripts/test-fast.sh) is the fast tier: no server process, training, torchrun,
# browser, terminal, cluster or network namespace. An unmarked test slower than this is reported at the
# end of the run, never failed (the machine may be busy): it belongs in the slow tier, or should get faster.
SLOW_UNMARKED_S = 5.0
_unmarked_seconds: dict[str, float] = {}  # nodeid -> setup + call of tests without the slow mark


def pytest_runtest_logreport(report):
    # Not teardown: a module's last test tears down the module's fixtures, which slow tests may have started.
    if "slow" not in report.keywords and report.when != "teardown":
        _unmarked_seconds[report.nodeid] = _unmarked_seconds.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    slow = sorted(((s, n) for n, s in _unmarked_seconds.items() if s > SLOW_UNMARKED_S), reverse=True)
    if slow:
        terminalreporter.section(f"unmarked tests slower than {SLOW_UNMARKED_S:g} s (mark them slow, or speed them up)")
        for seconds, nodeid in slow:
            terminalreporter.write_line(f"{seconds:7.1f}s {nodeid}")


# The suite runs on two pytest-xdist workers (scripts/test.sh): each module is one unit of work (its
# module-scoped service and models are shared by its tests), and the modules that bring up clusters, network
# namespaces or fixed ports are one unit together, run first and in this order: on two cores, two clusters
# (and Ray's 2 GB) must never overlap, and they take the longest, so the other worker runs the rest meanwhile.
CLUSTER_MODULES = ("test_multinode.py", "test_faults_multinode.py", "test_security_rendezvous.py",
                   "test_slurm.py", "test_ray_e2e.py")
# Then the longest modules, longest first (measured: docs/testing.md), so that the last units handed out are
# short and neither worker idles long at the end; the rest keep their file order.
LONGEST_MODULES = ("test_faults.py", "test_fuzz_and_chaos.py", "test_fsdp_service.py", "test_faults_disk.py",
                   "test_inline_e2e.py", "test_demo.py", "test_serve_stack.py", "test_tinker_api.py",
                   "test_serve_inline_stack.py", "test_workflow.py", "test_upgrade.py", "test_pipelines.py")


def pytest_collection_modifyitems(session, config, items):
    order = {name: i for i, name in enumerate(CLUSTER_MODULES + LONGEST_MODULES)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # stable: the rest keep their order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    # pytest-xdist's own loadgroup cannot group under pytest 9 (it renames nodeids, which pytest 9 ignores):
    # its scope scheduler, with the unit chosen here
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # xdist would hand out the units with the most tests first: ours go in order

    class ModuleUnits(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "clusters" if Path(module).name in CLUSTER_MODULES else module

    return ModuleUnits(config, log)
