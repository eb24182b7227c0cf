"""A large output head multiplied in output-row blocks through a small reused slot.

A tied embedding + head (Gemma3: 262,144 x 640, 63% of the weights) decoded whole costs a dense
copy of the biggest tensor for every pass. Kept in row chunks instead, a lookup decodes only the
chunks its ids hit (``embedding.py``) and the head runs ``F.linear`` chunk by chunk, each chunk a
unit of the scheduler's trace, so the policy prefetches chunk i+1 while chunk i multiplies and
the pool reuses one chunk-sized slot.

**Exactness.** ``F.linear(x, W)[..., a:b] == F.linear(x, W[a:b])`` holds only where the library
kernel computes each output the same way whatever the split: measured here on an AMD EPYC
(AVX-512 BF16) for 262144x640 ... 128256x4096 under every ONEDNN_MAX_CPU_ISA cap, but not on Intel
Xeons with AMX (~0.01% of outputs differ). So nothing is assumed: before the blocked path runs
with a new (rows, K, block sizes, dtype, device, threads) it is *probed* -- the same shapes on
fresh random data, the whole product against the blocked one, compared bit for bit -- and the
answer is cached for the process. Where the probe differs, that call decodes the weight whole
into a transient buffer and multiplies once: plain's bits, at plain's memory for that call.
``NZRT_BLOCKED_MATMUL=never`` forces the whole path (the "differs" branch); ``probe`` is the default.
With autograd recording (an input that requires grad) the whole path runs too: the backward of a
blocked product would sum ``grad @ W`` in another order.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..kernels import env
from .fused import multiply

MODES = ("probe", "never")
_VERDICTS: dict = {}  # probe key -> bool


def mode() -> str:
    m = env.get("NZRT_BLOCKED_MATMUL").strip().lower() or "probe"
    if m not in MODES:
        raise ValueError(f"NZRT_BLOCKED_MATMUL={m!r}: use one of {', '.join(MODES)}")
    return m


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def blocked_equals_whole(rows: int, k: int, block: int, last: int, dtype, device, linear=F.linear) -> bool:
    """Whether ``linear`` over output-row blocks of ``block`` rows (then one of ``last`` rows)
    gives the bits of one ``linear`` over them all, for ``rows`` input rows of width ``k``: fresh
    random data of those shapes (std-0.02 weights, unit inputs), compared as integers."""
    g = torch.Generator().manual_seed(0x5EED + rows)
    n = block + last
    # drawn in the weight's dtype: no float32 copy (the probe runs inside a pass: it adds to its peak)
    w = torch.randn(n, k, generator=g, dtype=dtype).mul_(0.02).to(device)
    x = torch.randn(max(rows, 1), k, generator=g, dtype=dtype).to(device)
    whole = linear(x, w)
    parts = torch.cat([linear(x, w[:block]), linear(x, w[block:])], dim=-1)
    return whole.shape == parts.shape and torch.equal(_bits(whole), _bits(parts))


def blocked_exact(rows: int, k: int, block: int, last: int, dtype, device) -> bool:
    """The cached verdict for these shapes on this process's device, ISA cap and thread count."""
    if mode() == "never":
        return False
    dev = torch.device(device)
    key = (rows, k, block, last, str(dtype), str(dev), torch.get_num_threads(),
           os.environ.get("ONEDNN_MAX_CPU_ISA", ""))
    v = _VERDICTS.get(key)
    if v is None:
        v = _VERDICTS[key] = blocked_equals_whole(rows, k, block, last, dtype, dev)
    return v


def chunked_linear_forward(shared, mp, chunk_units, decode_whole):
    """The forward of a bias-free Linear whose weight ``mp`` is in row chunks.
    ``chunk_units``: [(unit, key, (first row, end row))] in row order; ``decode_whole()``: the
    weight dense (a transient buffer) for the calls that must multiply it at once."""
    n, k = mp.shape
    block = chunk_units[0][2][1] - chunk_units[0][2][0]
    last = chunk_units[-1][2][1] - chunk_units[-1][2][0]
    lock = shared.lock

    def forward(x):
        with lock:
            rows = x.numel() // k if k else 0
            if fused_chunks_apply(shared, x, rows, k, mp):
                return fused_chunks(shared, x, rows, n, k, chunk_units)
            whole = (torch.is_grad_enabled() and x.requires_grad) or len(chunk_units) < 2 or \
                not blocked_exact(rows, k, block, last, mp.dtype, x.device)
            if whole:
                shared.blocked_stats["whole"] += 1
                return F.linear(x, decode_whole())
            shared.blocked_stats["blocked"] += 1
            s = shared.scheduler
            out = None
            for unit, key, (a, b) in chunk_units:
                bufs = s.enter(unit)
                try:
                    y = F.linear(x, bufs[key].view(b - a, k))
                    if out is None:
                        out = torch.empty(y.shape[:-1] + (n,), dtype=y.dtype, device=y.device)
                    out[..., a:b] = y
                    del y
                finally:
                    s.exit(unit)
            return out
    return forward


def fused_chunks_apply(shared, x, rows, k, mp) -> bool:
    """Whether a fused pass multiplies this chunked head from its compressed chunks (the
    conditions of ``fused.linear_forward``: few rows, a CPU input of the weight's width and dtype
    or float32, no gradient needed)."""
    f = shared.fused
    return (f is not None and shared.fused_pass and rows <= f.max_rows and x.device.type == "cpu"
            and x.shape[-1] == k and x.dtype in (mp.dtype, torch.float32)
            and not (torch.is_grad_enabled() and (x.requires_grad or mp.param.requires_grad)))


def fused_chunks(shared, x, rows, n, k, chunk_units):
    """``x @ W.T`` for a head in row chunks, each chunk's output rows by the fused kernel straight
    from its compressed bytes. The fused kernel computes each output from its own weight row, in
    an order that does not depend on the other rows (tested: the same bits as the whole weight's)."""
    x2 = x.reshape(rows, k)
    out = None
    for _unit, key, (a, b) in chunk_units:
        y = multiply(shared, key, x2, None)
        if out is None:
            out = torch.empty((rows, n), dtype=y.dtype, device=y.device)
        out[:, a:b] = y
    shared.fused_stats.linear_calls += 1
    return out.view(*x.shape[:-1], n)
