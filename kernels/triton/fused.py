"""Triton fused decode-matmul for window-coded weights: ``y = x @ W.T (+ b)`` straight from a
CompressedTensor W of lossless bf16 in the 4-bit window code (``widths=(4,)``), bits identical
to ``fused_reference.linear``. GPU first; the tests run it under ``TRITON_INTERPRET=1``.

Bit layout read (``spec``; the same streams ``cpu.fused_w4`` reads): for weight i of the
flattened row-major W [N, K],
  * ``sm[i]``: uint8, ``sign << 7 | mantissa`` (8 bits a value for lossless bf16);
  * ``level0[i >> 1] >> 4 * (i & 1) & 15``: its code; codes 0..14 name ``symbols[code]``, code 15
    escapes to the raw level;
  * raw level: uint8 exponents of the escapes in value order, tile t's from byte
    ``offsets[t, 0] * 8``.
The float32 value of the weight is ``(sm & 0x80) << 24 | exp << 23 | (sm & 0x7f) << 16``.

One program per block of ``BLOCK_N`` output rows and one x row. It walks K in groups of 64: a
[BLOCK_N, 64] block of weights decoded with integer loads, shifts and a 16-entry table gather,
the escapes' slots by an exclusive ``tl.cumsum`` along the group plus a running cursor per row
(reset to the tile's first raw entry where a group starts a tile; the cursor of each row's first
group comes from the host, counted once per weight), and ``acc[:, l] += x[64g + l] * w[:, l]``
in float32, a multiply then an add: the launch passes ``enable_fp_fusion=False``, so no FMA. The
64 lanes are then added by the reference's tree (lane l + lane l+h, h = 32 .. 1: a reshape to
[BLOCK_N, 2, h] and a split), the bias added, and the float32 rounded to bf16 on its bits
(nearest even, NaN canonical 0x7FC0) or stored as float32 (NaN 0x7FC00000). The rounding is
integer work because the interpreter truncates float32 -> bf16.

Only this code and shape take the kernel (``eligible``); weights in the smallest code keep the
decode-then-matmul path on a GPU.
"""
from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl

from .. import fused_reference, spec
from .common import INTERPRET


BLOCK_N = 64 if INTERPRET else 32


@triton.jit
def _tree_step(acc, BN: tl.constexpr, H: tl.constexpr):
    """[BN, 2H] -> [BN, H]: lane l + lane l + H."""
    a = tl.permute(tl.reshape(acc, [BN, 2, H]), (0, 2, 1))
    lo, hi = tl.split(a)
    return lo + hi


@triton.jit
def _fused_w4_kernel(sm_ptr, l0_ptr, raw_ptr, off_ptr, cur0_ptr, tab_ptr, x_ptr, b_ptr, y_ptr,
                     N, K, tile, HAS_RAW: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_F32: tl.constexpr,
                     BN: tl.constexpr):
    pid = tl.program_id(0)
    q = tl.program_id(1)  # the x row
    rows = pid * BN + tl.arange(0, BN)
    rmask = rows < N
    lane = tl.arange(0, 64)
    acc = tl.full([BN, 64], -0.0, tl.float32)
    cur = tl.load(cur0_ptr + rows, mask=rmask, other=0)  # int64: raw cursor at each row's start
    row0 = rows.to(tl.int64) * K
    for g in range(0, K // 64):
        base = row0 + g * 64  # [BN]
        i = base[:, None] + lane[None, :]  # [BN, 64] flat weight index
        m2 = rmask[:, None]
        s = tl.load(sm_ptr + i, mask=m2, other=0).to(tl.int32)
        cb = tl.load(l0_ptr + (i >> 1), mask=m2, other=0).to(tl.int32)
        code = (cb >> ((i & 1) * 4).to(tl.int32)) & 15
        e = tl.load(tab_ptr + code)  # int32 exponent; entry 15: 0
        if HAS_RAW:
            starts = (base % tile) == 0  # this group starts a tile: its first raw entry
            toff = tl.load(off_ptr + base // tile, mask=rmask & starts, other=0).to(tl.int64) * 8
            cur = tl.where(starts, toff, cur)
            esc = (code == 15).to(tl.int32)
            slot = (tl.cumsum(esc, axis=1) - esc).to(tl.int64) + cur[:, None]
            rv = tl.load(raw_ptr + slot, mask=m2 & (esc == 1), other=0).to(tl.int32)
            e = tl.where(esc == 1, rv, e)
            cur = cur + tl.sum(esc, axis=1).to(tl.int64)
        bits = ((s & 0x80) << 24) | (e << 23) | ((s & 0x7F) << 16)
        w = bits.to(tl.float32, bitcast=True)
        xv = tl.load(x_ptr + q * K + g * 64 + lane)  # float32
        acc = acc + xv[None, :] * w
    acc = _tree_step(acc, BN, 32)
    acc = _tree_step(acc, BN, 16)
    acc = _tree_step(acc, BN, 8)
    acc = _tree_step(acc, BN, 4)
    acc = _tree_step(acc, BN, 2)
    z = tl.reshape(_tree_step(acc, BN, 1), [BN])
    if HAS_BIAS:
        z = z + tl.load(b_ptr + rows, mask=rmask, other=0.0)
    u = z.to(tl.uint32, bitcast=True)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    if OUT_F32:
        out = tl.where(nan, 0x7FC00000, u)
        tl.store(y_ptr + q * N + rows, out.to(tl.int32, bitcast=True), mask=rmask)
    else:
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        out = tl.where(nan, 0x7FC0, r) & 0xFFFF
        tl.store(y_ptr + q * N + rows, out.to(tl.int32).to(tl.int16), mask=rmask)


def eligible(ct) -> bool:
    """``spec.window_fusable``: lossless bf16 in the window code, K and the tile multiples of 64."""
    return spec.window_fusable(ct.header, ct.shape)


def _row_cursors(ct) -> np.ndarray:
    """int64[N]: each row's first raw slot (its tile's first entry plus the escapes before it
    in the tile), counted once on the host from the level-0 codes."""
    h = ct.header
    N, K = ct.shape
    sec = ct.np_sections()
    if not h.has_raw:
        return np.zeros(N, np.int64)
    n = h.numel
    b = sec["level0"][: (n + 1) // 2]
    esc = np.empty(2 * len(b), np.int64)
    esc[0::2] = (b & 15) == 15
    esc[1::2] = (b >> 4) == 15
    esc = esc[:n]
    start = np.arange(N, dtype=np.int64) * K
    t = start // h.tile
    before = np.concatenate([[0], np.cumsum(esc)])  # escapes before index i
    return sec["offsets"][t, 0].astype(np.int64) * 8 + before[start] - before[t * h.tile]


class FusedWeightW4:
    """A window-coded weight prepared for the Triton kernel on its device (the streams moved
    once, the row cursors and the exponent table built once)."""

    def __init__(self, ct, device):
        if not eligible(ct):
            raise ValueError("the Triton fused kernel takes lossless bf16 weights in the window code "
                             "(widths=(4,)) with K and the tile multiples of 64")
        ct.verify()
        h = ct.header
        self.ct = ct
        host = ct if ct.device.type == "cpu" else ct.to("cpu")
        self.N, self.K = ct.shape
        self.tile = h.tile
        self.has_raw = bool(h.has_raw)
        sec = host.np_sections()
        dev = torch.device(device)
        to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)  # noqa: E731
        self.sm = to(sec["sm"])
        self.l0 = to(sec["level0"])
        self.raw = to(sec["level1"] if self.has_raw else np.zeros(8, np.uint8))
        off = sec["offsets"]
        self.off = to(off[:, 0].astype(np.int64) if self.has_raw else np.zeros(1, np.int64))
        self.cur0 = to(_row_cursors(host))
        tab = np.zeros(16, np.int32)
        for c, sym in enumerate(list(h.symbols)[:15]):
            tab[c] = int(sym)
        self.tab = to(tab)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [rows, K] (bf16 or float32, on the weight's device) -> [rows, N] of x's dtype."""
        _, _, odt = fused_reference.check_args(self.ct, x, bias)
        R = x.shape[0]
        out = torch.empty((R, self.N), dtype=x.dtype, device=x.device)
        if R == 0:
            return out
        xf = x.detach().float().contiguous()
        bf = bias.detach().float().contiguous() if bias is not None else xf
        yb = out.view(torch.int32 if odt == "float32" else torch.int16)
        grid = (triton.cdiv(self.N, BLOCK_N), R)
        _fused_w4_kernel[grid](self.sm, self.l0, self.raw, self.off, self.cur0, self.tab, xf, bf, yb,
                               self.N, self.K, self.tile, HAS_RAW=self.has_raw, HAS_BIAS=bias is not None,
                               OUT_F32=odt == "float32", BN=BLOCK_N, enable_fp_fusion=False)
        return out


def linear(ct, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for a window-coded W (``eligible``), on x's device."""
    return FusedWeightW4(ct, x.device).linear(x, bias)
