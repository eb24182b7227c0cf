"""Readable numpy definition of the fused linear ``y = x @ W.T (+ bias)`` on a CompressedTensor W.

This is the arithmetic every fused kernel (numba ``cpu.fused``, later Triton) must reproduce bit
for bit. It lives beside ``reference`` rather than in it: ``reference`` defines the *format* (the
bytes and the decoded bits), this module defines an *operation* on the decoded values, and it may
change (a different lane count for a GPU, say) without touching the format.

Inputs: ``W`` of shape [N, K], any of the format's dtypes (bf16, fp16, fp32); ``x`` of shape
[rows, K], of W's dtype or float32; ``bias`` of shape [N] (any of the three dtypes), or None.
The output has x's dtype (torch's promotion of x and W: bf16/fp16 x with its own W, or fp32).

The arithmetic, for each output (r, n):
  1. x, W and bias are converted to float32 (exact: every bf16/fp16 value is a float32).
  2. 64 lanes, each a float32 accumulator starting at -0.0 (the exact additive identity, so an
     empty lane changes nothing). Lane l adds, for k = l, l + 64, l + 128, ... < K in increasing
     k, the product x[r, k] * W[n, k]: the product rounded to float32, then the sum rounded to
     float32 (two roundings, never a fused multiply-add). For bf16 x and bf16 W the product is
     exact (8 x 8 significand bits), so only the sums round (unless a product underflows).
  3. The lanes are summed by a fixed pairwise tree: lane l + lane l+32 (l < 32), then l + l+16
     (l < 16), then l + l+8, l + l+4, l + l+2, then lane 0 + lane 1; each sum rounded to float32.
     Why 64: a lane is one serial chain of additions, so a CPU row needs several chains in flight
     to hide the add latency; 64 lanes are four 16-wide vectors (AVX-512) per row.
  4. + bias[n] (in float32, one rounding), if there is a bias.
  5. One rounding to the output dtype, to nearest even (overflow to inf, subnormals kept). Any
     NaN becomes the canonical quiet NaN (bf16 0x7FC0, fp16 0x7E00, fp32 0x7FC00000), because
     which NaN a sum of NaNs yields depends on operand order, which compilers are free to swap.
Round to nearest even throughout, subnormals kept (no flush-to-zero / denormals-are-zero).

Error bound (against the exact sum; the tests check it against torch in float64): a lane sums
at most ceil(K/64) products, then 6 tree levels and the bias add, so each product passes through
at most m = ceil(K/64) + 7 roundings of float32 (unit roundoff u = 2**-24), and (Higham 3.1)
  |y32 - y_exact| <= gamma_m * (sum_k |x_k w_k| + |b|),   gamma_m = m u / (1 - m u),
with y32 the float32 value before step 5; step 5 adds at most half an ulp of the output dtype
of |y32|. Float32 x with float32 W adds one rounding per product (m + 1 instead of m).
"""
from __future__ import annotations

import numpy as np
import torch

from . import reference, spec

LANES = 64
CANONICAL_NAN = {"bfloat16": 0x7FC0, "float16": 0x7E00, "float32": 0x7FC00000}
_NP_INT = {2: np.int16, 4: np.int32}
ROW_ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)  # row ids a lookup takes


def to_f32(t: torch.Tensor) -> np.ndarray:
    """A float tensor's values as a float32 numpy array (exact for bf16, fp16, fp32)."""
    return t.detach().cpu().contiguous().to(torch.float32).numpy()


def bits_to_f32(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Decoded bit patterns (the dtype's uint) as float32 values, exactly."""
    if dtype == "bfloat16":
        return (bits.astype(np.uint32) << 16).view(np.float32)
    if dtype == "float16":
        return bits.view(np.float16).astype(np.float32)
    return bits.view(np.float32).copy()


def round_out(y32: np.ndarray, dtype: str) -> np.ndarray:
    """Step 5: float32 values to bit patterns of ``dtype`` (the dtype's uint), nearest even,
    NaN canonical."""
    y32 = np.asarray(y32, np.float32)
    u = y32.view(np.uint32).astype(np.int64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    if dtype == "bfloat16":
        out = (u + 0x7FFF + ((u >> 16) & 1)) >> 16  # carries into the exponent: overflow -> inf
    elif dtype == "float16":
        with np.errstate(over="ignore"):
            out = y32.astype(np.float16).view(np.uint16).astype(np.int64)  # IEEE nearest even
    else:
        out = u
    out = np.where(nan, CANONICAL_NAN[dtype], out)
    return out.astype(spec.LAYOUTS[dtype].uint)


def check_args(ct, x: torch.Tensor, bias: torch.Tensor | None) -> tuple[int, int, str]:
    """(N, K, output dtype name) after checking shapes and dtypes; the rules every backend shares."""
    if len(ct.shape) != 2:
        raise ValueError(f"linear needs a 2-D weight, got shape {tuple(ct.shape)}")
    N, K = ct.shape
    wdt = ct.header.dtype
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"x must have shape [rows, {K}], got {tuple(x.shape)}")
    xdt = str(x.dtype).removeprefix("torch.")
    if xdt not in (wdt, "float32"):
        raise ValueError(f"x must be {wdt} (the weight's dtype) or float32, got {xdt}")
    if bias is not None:
        bdt = str(bias.dtype).removeprefix("torch.")
        if bias.shape != (N,) or bdt not in spec.LAYOUTS:
            raise ValueError(f"bias must be a float tensor of shape [{N}], got {bdt} {tuple(bias.shape)}")
    return N, K, xdt


def linear_f32(W: np.ndarray, x: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """Steps 2-4 on float32 arrays W [N, K], x [rows, K], b [N] or None: y32 [rows, N]."""
    with np.errstate(all="ignore"):  # inf and NaN are values here, not errors
        return _linear_f32(W, x, b)


def _linear_f32(W, x, b):
    N, K = W.shape
    acc = np.full((x.shape[0], N, LANES), -0.0, np.float32)
    for k0 in range(0, K, LANES):  # lane l of block k0 is k = k0 + l
        blk = slice(k0, min(k0 + LANES, K))
        width = blk.stop - k0
        prod = x[:, None, blk] * W[None, :, blk]  # float32 product, rounded
        acc[:, :, :width] += prod  # float32 sum, rounded (numpy never fuses the two)
    s = acc
    while s.shape[-1] > 1:  # lanes l + l+8, then l + l+4, l + l+2, l + l+1
        h = s.shape[-1] // 2
        s = s[..., :h] + s[..., h:]
    y = s[..., 0]
    if b is not None:
        y = y + b[None, :]
    return y


def linear(ct, x: torch.Tensor, bias: torch.Tensor | None = None, *, decode=None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` with the arithmetic defined above; W = the decoded ``ct``.
    ``decode(ct, bits)`` decodes W (default: ``reference.decode_into``; a fast backend's decoder
    gives the same bits, for large tests)."""
    N, K, odt = check_args(ct, x, bias)
    lay = spec.LAYOUTS[ct.header.dtype]
    bits = np.zeros(ct.numel(), lay.uint)
    (decode or reference.decode_into)(ct, bits)
    W = bits_to_f32(bits, ct.header.dtype).reshape(N, K)
    b = None if bias is None else to_f32(bias)
    y32 = linear_f32(W, to_f32(x), b)
    ybits = round_out(y32, odt)
    return torch.from_numpy(ybits.view(_NP_INT[ybits.dtype.itemsize])).view(x.dtype)
