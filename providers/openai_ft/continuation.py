"""An `ft:` model that is a LoRA adapter, merged into its base as a full model to continue training from: in a
child process with limits, so that a large base never loads into the service (its memory, its CPU).

    python -m providers.openai_ft.continuation ADAPTER BASE DEST CPU_S ADDRESS_SPACE_BYTES

The child sets its own limits (RLIMIT_CPU, RLIMIT_AS) before it imports torch; the service sizes them from
the base model (`merged_bytes`) and claims the output against the quotas before it starts it.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path

from ..jobs.child_env import child_env

MERGE_CPU_S_BASE, MERGE_CPU_S_PER_GB = 300, 120  # CPU seconds the merge may use: a floor, and per GB of output
MERGE_AS_BASE = 16 << 30  # address space of the interpreter and its libraries (CUDA's included) before a model
MERGE_AS_PER_BYTE = 3  # the fp32 base, the adapter merged in, the buffers of the save: address space per output byte
REPO_ROOT = Path(__file__).resolve().parents[2]
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}


def merged_bytes(base: Path) -> int:
    """What the merged model takes on disk: the base's parameters in fp32 (read from the safetensors headers;
    else twice its weight files, as for 16-bit weights)."""
    params = pickled = small = 0
    for f in base.iterdir():
        if f.suffix == ".safetensors":
            with open(f, "rb") as fh:
                header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
            params += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
        elif f.suffix in (".bin", ".pt", ".pth"):
            pickled += f.stat().st_size
        elif f.is_file():
            small += f.stat().st_size  # its tokenizer and config files, copied as they are
    return params * 4 + pickled * 2 + small


def merge_in_child(adapter: Path, base: str, dest: Path, log_file: Path) -> None:
    """Run the merge in its own process with limits sized from the base; raises RuntimeError with its log tail
    when it fails (a limit reached, a bad checkpoint). `dest` is the child's to write (the caller removes it)."""
    size = merged_bytes(Path(base))
    cpu_s = MERGE_CPU_S_BASE + MERGE_CPU_S_PER_GB * math.ceil(size / (1 << 30))
    address_space = MERGE_AS_BASE + MERGE_AS_PER_BYTE * size
    env = child_env(extra={"CUDA_VISIBLE_DEVICES": "",  # on the CPU: the service's GPUs are its jobs'
                           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])})
    with open(log_file, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "providers.openai_ft.continuation", str(adapter), base,
                                 str(dest), str(cpu_s), str(address_space)], cwd=str(REPO_ROOT), env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        rc = proc.wait(timeout=2 * cpu_s)  # wall clock too: a child stuck in I/O uses no CPU
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    if rc != 0:
        tail = " | ".join(log_file.read_text(errors="replace").splitlines()[-3:])
        raise RuntimeError(f"merging {adapter} into {base} failed (exit {rc}; limits: {cpu_s} CPU s, "
                           f"{address_space} bytes of address space): {tail[-1000:]}")


if __name__ == "__main__":
    adapter_dir, base_dir, dest_dir, cpu_limit, as_limit = sys.argv[1:6]
    resource.setrlimit(resource.RLIMIT_CPU, (int(cpu_limit), int(cpu_limit)))
    resource.setrlimit(resource.RLIMIT_AS, (int(as_limit), int(as_limit)))
    from ..training.components import save_merged  # after the limits: it imports torch

    save_merged(Path(adapter_dir), base_dir, Path(dest_dir))
