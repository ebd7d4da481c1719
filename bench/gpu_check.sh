#!/bin/bash
# Everything that needs a CUDA GPU, in one call of the device tool (about 5 minutes on an H200):
#   the GPU tests (int4 kernel layout, 2:4 sparse kernels), then bench/gpu_quant.py and bench/gpu_sparse.py.
# Logs and result files go to $OUT (default: /tmp/slimlm-gpu). Uses the machine's python3 (with a CUDA
# PyTorch) and this checkout's src/; the default model is replaced by its architecture with random weights
# where it does not load (see bench/gpu_common.py).
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/slimlm-gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/gpu.txt"
$PY -m pytest -q -p no:cacheprovider tests/test_quant_linear.py tests/test_semi_structured.py 2>&1 \
    | tee "$OUT/tests.log" || status=1
timeout 240 $PY bench/gpu_quant.py --runs 5 2>&1 | tee "$OUT/gpu_quant.log" || status=1
timeout 240 $PY bench/gpu_sparse.py --runs 5 2>&1 | tee "$OUT/gpu_sparse.log" || status=1
cp bench/results/quant_gpu.json bench/results/sparse_gpu.json "$OUT/" 2>/dev/null
exit $status
