#!/usr/bin/env bash
# The wheel kit for the GPU machine (docs/GPU.md): the few packages pmss_dist needs beyond what
# that machine has (Python 3.12, torch 2.11 + CUDA 13, transformers, peft, safetensors, pandas, ...,
# no network), carried there as wheels and put on PYTHONPATH without touching its torch.
#
#   tools/gpu_kit.sh fetch [--python-version 3.12] [--dest .gpu_kit]
#       here (PyPI reachable): download exactly the KIT wheels, --no-deps, for CPython X.Y on
#       manylinux x86-64, into DEST/wheels, and write DEST/MANIFEST (name, bytes, sha256)
#   tools/gpu_kit.sh install [--kit .gpu_kit] [--target DIR]
#       there: unpack the wheels into DIR (default /tmp/pmss_gpu_kit: outside the repository, so it
#       never travels back), refuse if that would shadow torch, and write DIR/env.sh, which puts
#       DIR and the repository's src/ on PYTHONPATH (`source DIR/env.sh`)
#   tools/gpu_kit.sh list            the pinned kit, one requirement a line
#   tools/gpu_kit.sh device-packages what the GPU machine already has that pmss_dist relies on
#   tools/gpu_kit.sh device-venv DIR [--kit DIR]
#       a venv that looks like the GPU machine (CPU torch $DEVICE_LIKE_TORCH, the machine's
#       packages, the kit unpacked on PYTHONPATH): tests/test_gpu_kit.py trains in it on CPU
#
# PYTHON (default python3) is the interpreter that runs pip and the checks.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

# What `import pmss_dist` needs and the GPU machine lacks. torchtune 0.6.1 imports torchao at
# import time; torchtune.training imports omegaconf; `import torchtune` imports its datasets
# package, which imports HF `datasets` (its own imports: dill, multiprocess; pandas, xxhash,
# fsspec, huggingface_hub, tqdm are on the machine). Checked module by module in a venv holding
# only the machine's packages: not needed are torchtune's other declared dependencies torchdata
# (import-guarded), kagglehub, blobfile and Pillow (never imported on our paths); tiktoken and
# psutil are imported but the machine has them. torchtune/torchao pins = pyproject.toml's.
KIT=(
  "torchtune==0.6.1"
  "torchao==0.15.0"
  "omegaconf==2.4.0"
  "datasets==5.2.0"
  "dill==0.4.1"
  "multiprocess==0.70.19"
)
# On the GPU machine already (docs/GPU.md; its image's package list), and what pmss_dist and the
# kit import from it. The device-like venv installs exactly these (with their own dependencies).
DEVICE_PACKAGES=(
  transformers peft safetensors sentencepiece tokenizers tensorboard pyarrow jinja2 pyyaml numpy pytest
  pandas xxhash tiktoken psutil huggingface_hub fsspec tqdm filelock
)
DEVICE_LIKE_TORCH="${DEVICE_LIKE_TORCH:-torch==2.13.0}"
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)

die() { echo "gpu_kit: $*" >&2; exit 1; }

fetch() {
  local pyver=3.12 dest="$REPO/.gpu_kit"
  while [ $# -gt 0 ]; do
    case "$1" in
      --python-version) pyver="$2"; shift 2 ;;
      --dest) dest="$2"; shift 2 ;;
      *) die "fetch: unknown argument $1" ;;
    esac
  done
  local tmp; tmp="$(mktemp -d)"
  trap "rm -rf '$tmp'" EXIT
  local plat=(); for p in "${PLATFORMS[@]}"; do plat+=(--platform "$p"); done
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    "${plat[@]}" -d "$tmp" "${KIT[@]}" 2> >(grep -v "is ignored: it is neither" >&2) \
    || die "pip download failed (PyPI reachable? the wheels exist for Python $pyver?)"
  local n; n=$(find "$tmp" -name '*.whl' | wc -l)
  [ "$n" -eq "${#KIT[@]}" ] || die "expected ${#KIT[@]} wheels, got $n: $(ls "$tmp")"
  # Replace the folder's wheels as a whole: two versions of one package would both be unpacked.
  mkdir -p "$dest"
  rm -rf "$dest/wheels"
  mv "$tmp" "$dest/wheels"
  trap - EXIT
  (cd "$dest/wheels" && for w in *.whl; do
     printf '%s %s %s\n' "$w" "$(stat -c %s "$w")" "$(sha256sum "$w" | cut -d' ' -f1)"
   done) > "$dest/MANIFEST"
  echo "python_version $pyver" >> "$dest/MANIFEST"
  local total; total=$(du -cb "$dest"/wheels/*.whl | tail -1 | cut -f1)
  echo "gpu_kit: ${#KIT[@]} wheels for CPython $pyver in $dest/wheels, $((total / 1024)) KiB:"
  awk 'NF == 3 {printf "  %-70s %8.2f MB\n", $1, $2 / 1e6}' "$dest/MANIFEST"
}

install_kit() {
  local kit="$REPO/.gpu_kit" target="${GPU_KIT_TARGET:-/tmp/pmss_gpu_kit}"
  while [ $# -gt 0 ]; do
    case "$1" in
      --kit) kit="$2"; shift 2 ;;
      --target) target="$2"; shift 2 ;;
      *) die "install: unknown argument $1" ;;
    esac
  done
  target="$(realpath -m "$target")"
  [ -f "$kit/MANIFEST" ] || die "no $kit/MANIFEST: run 'tools/gpu_kit.sh fetch' here first, and carry $kit"
  # Every wheel as fetched: a half-copied kit fails here, not at an import on the GPU.
  (cd "$kit/wheels" && awk 'NF == 3 {print $3 "  " $1}' ../MANIFEST | sha256sum --quiet -c -) \
    || die "a wheel in $kit/wheels does not match $kit/MANIFEST"
  local torch_before
  torch_before="$("$PYTHON" -c 'import torch; print(torch.__version__, torch.__file__)')" \
    || die "$PYTHON has no torch"
  rm -rf "$target"
  mkdir -p "$target"
  # pip checks each wheel's tags against this interpreter; --no-deps: nothing else is touched.
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$target" "$kit"/wheels/*.whl || die "pip install --target $target failed"
  [ ! -e "$target/torch" ] || die "the kit would shadow the machine's torch ($target/torch)"
  cat > "$target/env.sh" <<EOF
# written by tools/gpu_kit.sh install: pmss_dist from the repository, the kit beside the machine's packages
export PYTHONPATH="$REPO/src:$target\${PYTHONPATH:+:\$PYTHONPATH}"
EOF
  local torch_after
  torch_after="$(PYTHONPATH="$REPO/src:$target" "$PYTHON" -c 'import torch; print(torch.__version__, torch.__file__)')"
  [ "$torch_before" = "$torch_after" ] || die "torch changed: $torch_before -> $torch_after"
  echo "gpu_kit: installed $(awk 'NF == 3' "$kit/MANIFEST" | wc -l) wheels into $target (torch stays $torch_after)"
  echo "gpu_kit: now: source $target/env.sh"
}

device_venv() {
  [ $# -ge 1 ] || die "device-venv DIR [--kit KITDIR]"
  local venv="$1"; shift
  local kit="$venv/kit"
  while [ $# -gt 0 ]; do
    case "$1" in
      --kit) kit="$2"; shift 2 ;;
      *) die "device-venv: unknown argument $1" ;;
    esac
  done
  local spec; spec="$DEVICE_LIKE_TORCH ${DEVICE_PACKAGES[*]} | ${KIT[*]}"
  if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.spec" 2>/dev/null)" = "$spec" ]; then
    echo "gpu_kit: reusing $venv"
  else
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "$DEVICE_LIKE_TORCH" "${DEVICE_PACKAGES[@]}" \
      2> >(grep -v "is ignored: it is neither" >&2) || die "pip install into $venv failed"
    local pyver; pyver="$("$venv/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    # The same pins as the GPU kit, for this interpreter (multiprocess ships one wheel per Python).
    PYTHON="$venv/bin/python" fetch --python-version "$pyver" --dest "$kit"
    echo "$spec" > "$venv/.spec"
  fi
  PYTHON="$venv/bin/python" install_kit --kit "$kit" --target "$venv/kit-site"
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  fetch) fetch "$@" ;;
  install) install_kit "$@" ;;
  list) printf '%s\n' "${KIT[@]}" ;;
  device-packages) printf '%s\n' "${DEVICE_PACKAGES[@]}" ;;
  device-venv) device_venv "$@" ;;
  *) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; [ -z "$cmd" ] || [ "$cmd" = -h ] || [ "$cmd" = --help ] || exit 2 ;;
esac
