"""The demo as a new user runs it: no warnings they cannot act on, and training that visibly worked."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_output_is_clean_and_sft_beats_the_base(tmp_path, tiny_models):
    # The session's tiny models, with their build marker, are the demo's "built once, then reused" models: the
    # teacher's pretraining (a minute of CPU) is not repeated here.
    shutil.copytree(Path(tiny_models["student"]).parent, tmp_path / "models")
    # --skip-remote: the inline part has every method and its table rows; the FSDP part has its own tests.
    run = subprocess.run([sys.executable, "scripts/demo.py", "--workdir", str(tmp_path), "--skip-remote"],
                         cwd=ROOT, capture_output=True, text=True, timeout=1800)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    warned = [line for line in out.splitlines() if "warn" in line.lower()]
    assert not warned, "\n".join(warned)
    assert "it/s]" not in out, "a progress bar reached the demo's output"
    for log in (tmp_path / "stack.log", *(tmp_path / "stack" / "runs").glob("*/logs/train.log")):
        assert not re.search(r"UnsupportedFieldAttributeWarning|gemm_4bit_forward|FutureWarning", log.read_text()), log
    sft = re.search(r"^  SFT +demo_student +(\d+)% -> +(\d+)%", out, re.M)
    assert sft, out
    assert int(sft.group(2)) > int(sft.group(1)) + 30, sft.group(0)
