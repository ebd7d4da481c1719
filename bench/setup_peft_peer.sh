#!/usr/bin/env bash
# Create the separate virtual environment that runs the training peer (PEFT + transformers + bitsandbytes).
#
#   bash bench/setup_peft_peer.sh              # venv at ${SLIMLM_PEFT_VENV:-bench/.venv-peft}
#   SLIMLM_PEFT_VENV=/tmp/pv bash bench/setup_peft_peer.sh
#
# torch is installed FIRST at 2.13.0, the CPU build (the local wheel in /opt/wheels or $PIP_FIND_LINKS when
# there is one, else the PyTorch CPU index), and then held there with a constraints file while the rest is
# resolved, so that no CUDA build of torch is pulled in. transformers is the version slimlm's own venv uses,
# so that both tools run the same model code. The peer venv never imports slimlm.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SLIMLM_PEFT_VENV:-$ROOT/bench/.venv-peft}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
TORCH_VERSION="2.13.0"
TRANSFORMERS_VERSION="${SLIMLM_PEFT_TRANSFORMERS_VERSION:-5.25.0}"
PEFT_VERSION="${SLIMLM_PEFT_VERSION:-0.21.2}"
TRL_VERSION="${SLIMLM_TRL_VERSION:-1.16.0}"          # the distillation peer (bench/peer_trl.py)
BNB_VERSION="${SLIMLM_PEFT_BNB_VERSION:-0.50.2}"

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)

# 1. torch first: the CPU wheel, from a local wheel folder when there is one.
local_wheel=""
for d in /opt/wheels ${PIP_FIND_LINKS:-}; do
    for f in "$d"/torch-"$TORCH_VERSION"+cpu-*.whl; do
        [ -f "$f" ] && local_wheel="$f" && break 2
    done
done
if "$VENV/bin/python" -c "import torch,sys; sys.exit(0 if torch.__version__=='${TORCH_VERSION}+cpu' else 1)" 2>/dev/null; then
    echo "torch ${TORCH_VERSION}+cpu already installed"
elif [ -n "$local_wheel" ]; then
    "${PIP[@]}" install "$local_wheel"
else
    # No local wheel: ask the PyTorch CPU index (PyPI's default Linux wheel is the CUDA build).
    "${PIP[@]}" install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple
fi

# 2. The rest, with torch held at the installed CPU build.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__)" >"$constraints"
PIP_CONSTRAINT="$constraints" "${PIP[@]}" install \
    "transformers==${TRANSFORMERS_VERSION}" "peft==${PEFT_VERSION}" "bitsandbytes==${BNB_VERSION}" \
    "trl==${TRL_VERSION}" accelerate safetensors numpy

"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import torch
assert torch.__version__.endswith("+cpu"), f"expected a CPU torch, got {torch.__version__}"
for name in ("torch", "transformers", "peft", "bitsandbytes", "trl", "accelerate", "safetensors", "numpy"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
EOF
echo "PEFT peer venv ready at $VENV in $(( $(date +%s) - start )) s"
echo "run: $VENV/bin/python bench/peer_peft.py --help"
