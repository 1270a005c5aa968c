#!/usr/bin/env bash
# Does pmss_dist work on torch VERSION? Builds a venv of its own outside the repository
# (default: $PMSS_TORCH_VENVS/torch-VERSION, $PMSS_TORCH_VENVS defaulting to ~/.cache/pmss_dist),
# installs torch VERSION first and then this package as a user would (pip must keep that torch),
# and runs the fast tests (pytest -m "not slow") and the default run of README's first command.
#
#   bash tools/check_torch.sh 2.15.0
set -euo pipefail
version="${1:?usage: tools/check_torch.sh TORCH_VERSION [VENV_DIR]}"
venv="${2:-${PMSS_TORCH_VENVS:-$HOME/.cache/pmss_dist}/torch-$version}"
cd "$(dirname "$0")/.."
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q "torch==$version"
"$venv/bin/pip" install -q -e '.[test]'
installed="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
case "$installed" in
  "$version"|"$version"+*) ;;
  *) echo "check_torch: pip replaced torch $version with $installed (pyproject.toml's torch range)"; exit 1 ;;
esac
echo "check_torch: torch $installed, $("$venv/bin/python" -c 'import torchao, torchtune; print("torchao", torchao.__version__, "torchtune", torchtune.__version__)')"
out="$(mktemp -d)"
"$venv/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider tests
"$venv/bin/torchrun" --nproc_per_node 2 launch/train.py --config configs/tiny.yaml "output_dir=$out/tiny"
"$venv/bin/python" -c "import json, sys; s = json.load(open(sys.argv[1])); print('check_torch: default run', s['initial_loss'], '->', s['final_loss'], 'in', s['steps'], 'steps')" "$out/tiny/summary.json"
echo "check_torch: torch $installed passed"
