#!/usr/bin/env bash
# The CUDA path in one command, to check a GPU node (docs/GPU.md):
#
#   bash tools/gpu_check.sh OUTDIR            on a GPU node
#   bash tools/gpu_check.sh OUTDIR --dry-run  anywhere (CPU): the same steps at tiny sizes, ~2 min
#
# Steps, most valuable first; each one's figures are on disk before the next starts:
#   1. the wheel kit (tools/gpu_kit.sh install) if torchtune is not importable, then an import
#      check of pmss_dist                                                     -> env.json
#   2. pytest -m cuda tests/cuda: bf16 layers against fp64, FSDP2 + NCCL + compile per AC mode
#      against the CPU fp32 run, checkpoints across CUDA and CPU, merged export -> cuda_tests.xml
#   3. bench/bench_gpu.py: tokens/s, PEFT-MFU against the measured bf16 peak, peak memory; PMSS,
#      LoRA r8, frozen base; SmolLM2-135M and Llama-3.1-8B shapes; per AC mode; then layer ratios
#      while time remains                                                      -> bench_gpu.json
#   4. the JSON of all figures and a one-screen summary         -> gpu_check.json, summary.txt
# Everything printed also goes to OUTDIR/gpu_check.log: six files in all (the device returns 8).
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 510: seconds until the
# bench stops starting work; the device allows 600 per command), GPU_CHECK_KIT (the kit's folder,
# default .gpu_kit), GPU_KIT_TARGET (where the kit is unpacked, default /tmp/pmss_gpu_kit). Exit status: 0 when every CUDA test passed (or, in a
# dry run, was skipped) and the summary was written; 1 otherwise.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

OUT="" DRY_RUN=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    -*) echo "gpu_check: unknown option $arg" >&2; exit 2 ;;
    *) [ -z "$OUT" ] || { echo "gpu_check: one output folder only" >&2; exit 2; }; OUT="$arg" ;;
  esac
done
[ -n "$OUT" ] || { echo "usage: tools/gpu_check.sh OUTDIR [--dry-run]" >&2; exit 2; }
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
TEE_PID=$!

PYTHON="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET_S:-510}"
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
stamp() { echo; echo "=== [gpu_check +$(($(date +%s) - START))s] $*"; }
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # CPU reference runs beside the GPU ones
STATUS=0

stamp "1/4 environment ($([ $DRY_RUN = 1 ] && echo dry run || echo full run); budget ${BUDGET}s)"
if "$PYTHON" -c "import torchtune" 2>/dev/null; then
  export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
  echo "torchtune importable already: the kit is not installed"
else
  target="${GPU_KIT_TARGET:-/tmp/pmss_gpu_kit}"
  if PYTHON="$PYTHON" bash tools/gpu_kit.sh install --kit "${GPU_CHECK_KIT:-$REPO/.gpu_kit}" --target "$target"; then
    # shellcheck disable=SC1091
    source "$target/env.sh"
  else
    echo "gpu_check: the kit did not install (was .gpu_kit carried? see docs/GPU.md)"; STATUS=1
  fi
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
"$PYTHON" - "$OUT/env.json" <<'EOF' || STATUS=1
import importlib, json, platform, subprocess, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.machine()})",
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None}
for name in ("torchtune", "torchao", "omegaconf", "datasets", "transformers", "peft", "safetensors", "tokenizers", "numpy"):
    try:
        info[name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception as err:  # recorded, and the import check below says what breaks
        info[name] = f"not importable: {type(err).__name__}: {err}"[:200]
try:
    info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or None
except OSError:
    info["git"] = None
# What training needs, imported the way launch/train.py does.
import pmss_dist.train.trainer, pmss_dist.build, pmss_dist.hf.export  # noqa: E401,F401
info["pmss_dist_import"] = "ok"
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info, indent=1))
EOF

stamp "2/4 CUDA tests (pytest -m cuda tests/cuda)"
# At most 300 s: the bench after them holds the second most valuable figures.
t=$(( $(left) - 200 )); [ $t -gt 300 ] && t=300; [ $t -lt 60 ] && t=60
timeout --signal=INT --kill-after=15 "$t" "$PYTHON" -m pytest -m cuda tests/cuda -q -rs -p no:cacheprovider \
  --junitxml="$OUT/cuda_tests.xml" -o junit_family=xunit1
rc=$?
if [ $rc -ne 0 ]; then echo "gpu_check: pytest exited $rc"; STATUS=1; fi

stamp "3/4 bench/bench_gpu.py ($(left)s left)"
BENCH_ARGS=(--out "$OUT/bench_gpu.json" --budget-s $(( $(left) - 20 )))
if [ $DRY_RUN = 1 ]; then
  BENCH_ARGS+=(--tiny --ac selective)  # every step of the path once, on CPU
fi
"$PYTHON" bench/bench_gpu.py "${BENCH_ARGS[@]}" || { echo "gpu_check: bench_gpu.py failed"; STATUS=1; }

stamp "4/4 summary"
"$PYTHON" bench/bench_gpu.py summarize "$OUT" || STATUS=1
if [ -f "$OUT/gpu_check.json" ]; then
  "$PYTHON" - "$OUT/gpu_check.json" <<'EOF' || STATUS=1
import json, sys
tests = json.load(open(sys.argv[1]))["cuda_tests"]
sys.exit(0 if tests["ran"] and tests["counts"]["failed"] + tests["counts"]["error"] == 0 else 1)
EOF
fi
stamp "done, status $STATUS; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null  # the log complete on disk before the files go back
exit $STATUS
