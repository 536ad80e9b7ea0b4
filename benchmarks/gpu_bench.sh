#!/usr/bin/env bash
# GPU benchmark, one prepared script (under 8 minutes on one H100): builds a ~0.5B Llama (random init, bf16)
# and reports, through the training core on 1 GPU, SFT tokens/s and MFU against the GPU's measured bf16
# peak with and without padding-free / Liger / torch.compile / flash-attention, full vs LoRA vs QLoRA
# memory, and 2-process FSDP2 when the machine has 2 GPUs (benchmarks/gpu_bench.py does the work).
#
#   benchmarks/gpu_bench.sh [OUT_DIR]     # prints the table; OUT_DIR/gpu_bench.md and the raw log
#
# Python: $PYTHON, else .venv/bin/python when its torch sees a GPU, else python3. It needs torch with
# CUDA, transformers, trl, peft, accelerate, datasets, tokenizers (bitsandbytes for QLoRA, liger-kernel,
# flash-attn optional: a missing one is reported in its row, never silently skipped). Nothing is
# downloaded: the model is built locally.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-/tmp/gpu_bench_out}}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

pick_python() {
  for py in "${PYTHON:-}" .venv/bin/python python3 python; do
    [ -n "$py" ] || continue
    command -v "$py" >/dev/null 2>&1 || [ -x "$py" ] || continue
    if "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  return 1
}
if ! PY=$(pick_python); then
  echo "gpu_bench: no Python here has torch with a visible CUDA GPU (set PYTHON=...)"; nvidia-smi -L || true; exit 2
fi
missing=$("$PY" - <<'PY'
import importlib.util
need = ["transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "pydantic"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
PY
)
if [ -n "$missing" ]; then
  echo "gpu_bench: $PY lacks: $missing (pip install -e . on this machine first)"; exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, transformers, trl, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| transformers', transformers.__version__, '| trl', trl.__version__, '| peft', peft.__version__)"
timeout 460 "$PY" benchmarks/gpu_bench.py --steps "${STEPS:-30}" --models-dir "$OUT/models" --work-dir "$OUT/work" \
  --out "$OUT/gpu_bench.md" 2>&1 | tee "$OUT/gpu_bench.log" | grep -v -e "^\s*$" -e Warning
echo "table: $OUT/gpu_bench.md"
