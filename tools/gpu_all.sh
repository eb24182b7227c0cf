#!/usr/bin/env bash
# Every GPU figure in one call: tools/bench_gpu.py --record, tools/bench_fused_gpu.py (the Triton
# fused decode-matmul: exactness and speed beside cuBLAS), then tools/bench_e2e_gpu.py --record.
#
#     bash tools/gpu_all.sh            # both
#     bash tools/gpu_all.sh e2e        # only the end-to-end table (or: gpu)
#     bash tools/gpu_all.sh train      # only tools/bench_train.py --device cuda (not in the default;
#                                      # `gpu train e2e` runs all three, train under GPU_TRAIN_TIMEOUT=150)
#     bash tools/gpu_all.sh fsdp       # only FSDP2 on CUDA over NCCL with one rank (tests/_fsdp_child.py
#                                      # adamw: nzrt's compressed shards against plain FSDP2), under
#                                      # GPU_FSDP_TIMEOUT (150); not in the default
#     bash tools/gpu_all.sh offload    # only tools/bench_offload.py --device cuda (not in the default):
#                                      # accelerate's cpu_offload against nzrt's host tier, a small
#                                      # Llama, under GPU_OFFLOAD_TIMEOUT (150)
#
# Python: .venv's if its torch sees a GPU; else the system python3 if its torch does (the lent GPU
# machines start bare, with no network, and a python3 that holds CUDA torch, triton, transformers,
# accelerate and numba: nzrt is put on its path through links, nothing is installed); else
# tools/setup.sh builds .venv (a GPU machine with network). Both benchmarks run even if the first
# fails; the exit status is the worse of the two. The whole run stays under GPU_ALL_BUDGET seconds
# (default 560: one device call may run 600), bench_gpu.py under GPU_BENCH_TIMEOUT (240). Where $OUT
# is set (the device tool), BENCHMARKS.md and the full log are copied there: only $OUT comes back.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
unset TRITON_INTERPRET
BUDGET=${GPU_ALL_BUDGET:-560}
GPU_TIMEOUT=${GPU_BENCH_TIMEOUT:-240}
GPU_TRAIN_TIMEOUT=${GPU_TRAIN_TIMEOUT:-150}
WHAT=" ${*:-gpu fused e2e} "

pyc() { (cd / && "$PY" -c "$@"); }   # never from the root: ./nzrt there lacks its subpackages

main() {
    if [ -x .venv/bin/python ] && PY=$ROOT/.venv/bin/python pyc "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
        PY=$ROOT/.venv/bin/python
    elif command -v python3 >/dev/null && PY=python3 pyc "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
        PY=python3
        if ! pyc "import nzrt.runtime" >/dev/null 2>&1; then
            # nzrt's import name maps the root folders scheduler/, kernels/, policies/ into the
            # package (pyproject.toml): mirror that with links instead of installing
            local shim
            shim=$(mktemp -d)/nzrt_path
            mkdir -p "$shim/nzrt"
            for f in nzrt/*; do ln -s "$ROOT/$f" "$shim/nzrt/"; done
            for sub in scheduler kernels policies; do ln -s "$ROOT/$sub" "$shim/nzrt/$sub"; done
            export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
        fi
    else
        echo "gpu_all: no python with CUDA torch found; running tools/setup.sh"
        bash tools/setup.sh || { echo "gpu_all: tools/setup.sh failed"; return 2; }
        PY=$ROOT/.venv/bin/python
    fi
    pyc "import sys, nzrt.runtime, nzrt.kernels.triton, torch, triton, transformers, accelerate
print('gpu_all:', sys.executable, '· nzrt from', nzrt.__file__, '· torch', torch.__version__, '· triton',
      triton.__version__, '· transformers', transformers.__version__, '· accelerate', accelerate.__version__,
      '·', torch.cuda.get_device_name())" || { echo "gpu_all: nzrt or a dependency does not import with $PY"; return 2; }
    nvidia-smi -L 2>/dev/null || true

    # compile numba's CPU codec (nzrt restores a model with it) while the first benchmark runs
    pyc "import torch, nzrt
x = torch.randn(100_000).mul(0.02).to(torch.bfloat16)
assert torch.equal(nzrt.decompress(nzrt.compress(x)).view(torch.int16), x.view(torch.int16))" >/dev/null 2>&1 &
    local warm=$! rc=0 r left

    if [[ $WHAT == *" gpu "* ]]; then
        echo "== tools/bench_gpu.py --record ($SECONDS s in)"
        timeout -s TERM "$GPU_TIMEOUT" "$PY" tools/bench_gpu.py --record
        r=$?; [ $r -gt $rc ] && rc=$r
        [ $r -eq 124 ] && echo "gpu_all: bench_gpu.py stopped after $GPU_TIMEOUT s (nothing recorded by it)"
    fi
    if [[ $WHAT == *" fused "* ]]; then
        echo "== tools/bench_fused_gpu.py ($SECONDS s in)"
        timeout -s TERM "${GPU_FUSED_TIMEOUT:-90}" "$PY" tools/bench_fused_gpu.py
        r=$?; [ $r -gt $rc ] && rc=$r
    fi
    wait $warm || echo "gpu_all: numba warm-up failed (the first restore compiles it instead)"
    if [[ $WHAT == *" train "* ]]; then
        # training rows on a Llama-3-8B shape built on the GPU (2 steps); its --deadline stops a row
        # that runs past it and skips the rest, so the table still prints before the timeout
        echo "== tools/bench_train.py --device cuda ($SECONDS s in)"
        timeout -s TERM "$GPU_TRAIN_TIMEOUT" "$PY" tools/bench_train.py --device cuda --steps 2 \
            --rows adamw,nzrt_adamw,nzrt_sgd,adamw_bwd,lora,nzrt_lora,nzrt_adamw_ds --no-overhead-row \
            --deadline $(( GPU_TRAIN_TIMEOUT > 30 ? GPU_TRAIN_TIMEOUT - 10 : 20 )) --row-timeout 90 \
            ${OUT:+--json "$OUT/bench_train_gpu.json"}
        r=$?; [ $r -gt $rc ] && rc=$r
        [ $r -eq 124 ] && echo "gpu_all: bench_train.py stopped after $GPU_TRAIN_TIMEOUT s"
    fi
    if [[ $WHAT == *" offload "* ]]; then
        echo "== tools/bench_offload.py --device cuda ($SECONDS s in)"
        (cd / && timeout -s TERM "${GPU_OFFLOAD_TIMEOUT:-150}" "$PY" "$ROOT/tools/bench_offload.py" --device cuda \
            --shape small --modes plain,accelerate,nzrt_disk,nzrt_mem --budget 40MiB --rounds 1 --gen 8 \
            ${OUT:+--json "$OUT/bench_offload_gpu.json"})
        r=$?; [ $r -gt $rc ] && rc=$r
    fi
    if [[ $WHAT == *" fsdp "* ]]; then
        # FSDP2 over NCCL, one rank (a second GPU would be needed for two): compressed shards,
        # compressed all-gathers, Triton decodes; losses and final shards against plain FSDP2
        echo "== tests/_fsdp_child.py adamw on cuda, NCCL, 1 rank ($SECONDS s in)"
        local fd
        fd=$(mktemp -d)
        (cd "$fd" && NZRT_FSDP_DEVICE=cuda timeout -s TERM "${GPU_FSDP_TIMEOUT:-150}" "$PY" "$ROOT/tests/_fsdp_child.py" \
            0 1 29517 adamw "$fd")
        r=$?; [ $r -gt $rc ] && rc=$r
        pyc "import json, sys
d = json.load(open('$fd/rank0.json')); p, n = d['plain'], d['nzrt']
ok = p['losses'] == n['losses'] and p['shards'] == n['shards'] and p['eval_before'] == n['eval_before']
print('fsdp cuda: compressed', len(n['compressed']), '|', n['report'], '| losses and shards identical:', ok)
sys.exit(0 if ok else 1)" || rc=$(( rc > 1 ? rc : 1 ))
    fi
    if [[ $WHAT == *" e2e "* ]]; then
        left=$(( BUDGET - SECONDS ))
        echo "== tools/bench_e2e_gpu.py --record ($SECONDS s in, $left s left)"
        # rows that would start in the last 100 s are skipped; on SIGTERM it still prints and records
        timeout -s TERM $(( left > 30 ? left - 5 : 25 )) "$PY" tools/bench_e2e_gpu.py --record \
            --deadline $(( left > 160 ? left - 100 : 60 ))
        r=$?; [ $r -gt $rc ] && rc=$r
    fi
    echo "gpu_all: done in $SECONDS s, exit status $rc"
    return $rc
}

LOG=$(mktemp)
main 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
if [ -n "${OUT:-}" ]; then
    cp BENCHMARKS.md "$OUT/" 2>/dev/null
    cp "$LOG" "$OUT/gpu_all.log"
fi
exit "$rc"
