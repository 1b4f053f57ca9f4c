#!/usr/bin/env bash
# vlmkd's GPU checks in one call, for a lent GPU machine (nothing in CI needs it):
#   1. the Triton kernels' tests compiled for the GPU (not the interpreter) against the float64
#      references, and a training step's fused terms against the full-logits path, on CUDA;
#   2. tools/bench_kd_loss.py: naive / chunked / triton (default and other chunk sizes) / Liger FLCE,
#      time and peak memory (the full grid, or BENCH_ARGS), and where the triton path's time goes
#      (torch.profiler on PROFILE_SHAPE).
# Logs and JSON go to $OUT (default out/gpu). Packages the GPU image lacks travel as wheels in .whl/
# (webdataset, braceexpand, zstandard, liger-kernel for its Python 3.12; see docs/PERFORMANCE.md), made here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl webdataset==1.0.2 braceexpand==0.1.7 zstandard==0.25.0 liger-kernel==0.8.5
#
#     bash tools/gpu_check.sh
#     BENCH_ARGS="--shapes 4096,32000,896,64 --chunks 256,4096" bash tools/gpu_check.sh
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 VLMKD_TEST_THREADS=8
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'sms', torch.cuda.get_device_properties(0).multi_processor_count)" \
    | tee -a "$OUT/gpu.txt"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -rs tests/test_kernels.py \
    "tests/test_student.py::test_fused_logit_terms_equal_the_full_logits_path" 2>&1 | tee "$OUT/pytest_gpu.log"
timeout "${BENCH_TIMEOUT:-240}" python3 tools/bench_kd_loss.py --device cuda --repeats 5 ${BENCH_ARGS:-} \
    --json "$OUT/bench_kd_loss_gpu.json" 2>&1 | tee "$OUT/bench_kd_loss_gpu.log"
timeout 60 python3 tools/bench_kd_loss.py --profile "${PROFILE_SHAPE:-16384,151936,896,64}" 2>&1 \
    | tee "$OUT/profile_triton.log"
