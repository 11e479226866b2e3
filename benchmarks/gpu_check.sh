#!/usr/bin/env bash
# The GPU check (issue 9, section 4): on one CUDA GPU host, within 8 minutes, everything that needs a GPU.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, on the GPU host
#
# The host has Python 3.12 with torch, transformers, peft and accelerate, and no package registry: the other
# packages come as wheels in ./.whl, built beforehand on a machine with one by `bash ../shared/gpu/wheelhouse.sh`
# and copied over; they are installed into /tmp/site, as that script's header says. Everything lands in one folder,
# ${OUT:-benchmarks/results/gpu}:
#   summary.txt       nvidia-smi, the Python packages' versions, the commit; then each step: ok, failed (exit
#                     code) or timed out, and its seconds
#   pytest-gpu.log    `pytest -m gpu` (bf16 compute, paged 8-bit AdamW, a real out-of-memory, the planner; and
#                     tests/test_gpu_distributed.py: torchrun with DDP and FSDP-QLoRA on the GPUs there are, the
#                     2-GPU FSDP test skipped on one GPU)
#   planner.log       benchmarks/planner_vs_measured.py --device cuda (its tables beside it)
#   vs_trl.log        benchmarks/vs_trl.py --device cuda (its JSON and table beside it)
# (four files: the device tool brings back eight at most, which leaves four to the two benchmarks)
# Each step runs under `timeout`; a failing step does not stop the next; the exit code is 0 only if every step
# passed. Without a GPU it stops at once and says so (exit 3). Step budgets (seconds) can be changed by
# GPU_CHECK_PYTEST_S, GPU_CHECK_PLANNER_S and GPU_CHECK_TRL_S; their sum with the install stays within 8 minutes.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-benchmarks/results/gpu}
PY=${PYTHON:-python3}
PYTEST_S=${GPU_CHECK_PYTEST_S:-200}  # the torchrun tests (tests/test_gpu_distributed.py) take about a minute
PLANNER_S=${GPU_CHECK_PLANNER_S:-60}
TRL_S=${GPU_CHECK_TRL_S:-180}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1
# The host's own torch / transformers / peft / accelerate may lie outside the ranges lora_sft is tested on (the
# check at start would refuse them); summary.txt records their versions, so the figures say what they ran on.
export LORA_SFT_SKIP_VERSION_CHECK=1
mkdir -p "$OUT"
started=$SECONDS

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi is missing or finds no device); run it on a CUDA GPU host" >&2
  exit 3
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: nvidia-smi sees a GPU but $PY's torch has no CUDA (torch.cuda.is_available() is False); use the Python that has CUDA torch (PYTHON=...)" >&2
  exit 3
fi

# The wheels, exactly as ../shared/gpu/wheelhouse.sh's header says; lora_sft itself from this checkout.
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
    { echo "gpu_check: installing the wheels in .whl failed (see above)" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  echo "gpu_check: no wheels in ./.whl (build them with: bash ../shared/gpu/wheelhouse.sh); using what is installed" >&2
  export PYTHONPATH=$PWD
fi

{
  echo "# gpu_check, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi
  "$PY" - <<'EOF'
import importlib, platform, sys
print("python", platform.python_version(), sys.executable)
for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets", "trl", "pydantic", "lora_sft"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), getattr(module, "__file__", ""))
    except Exception as e:  # a missing wheel: said here, and the step that needs it fails on its own
        print(name, "NOT IMPORTABLE:", type(e).__name__, e)
import torch
print("cuda", torch.version.cuda, torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
print("bf16 native", torch.cuda.is_bf16_supported(including_emulation=False))
EOF
} >"$OUT/summary.txt" 2>&1
cat "$OUT/summary.txt"

failed=()
step() {  # step NAME SECONDS COMMAND...: run it under timeout, log to $OUT/NAME.log, record how it ended
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "== $name (at most ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  local took=$((SECONDS - t0)) how=ok
  if ((rc == 124 || rc == 137)); then
    how="timed out after ${limit}s"
  elif ((rc != 0)); then
    how="failed (exit $rc)"
  fi
  [[ $how == ok ]] || failed+=("$name")
  printf '%-12s %-24s %4ss\n' "$name" "$how" "$took" | tee -a "$OUT/summary.txt"
}

step pytest-gpu "$PYTEST_S" "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests
step planner "$PLANNER_S" "$PY" benchmarks/planner_vs_measured.py --device cuda --out "$OUT"
# vs_trl starts no run after --budget-s, so it writes its results before the step's timeout
step vs_trl "$TRL_S" "$PY" benchmarks/vs_trl.py --device cuda --out "$OUT" --budget-s $((TRL_S - 70))

echo "total $((SECONDS - started))s" | tee -a "$OUT/summary.txt"
if ((${#failed[@]})); then
  echo "gpu_check: failed: ${failed[*]} (logs in $OUT)" >&2
  exit 1
fi
echo "gpu_check: every step passed (results in $OUT)"
