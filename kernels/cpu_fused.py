"""numba fused decode-matmul: ``linear(ct, x, bias)`` = ``x @ W.T (+ bias)`` straight from the
compressed W, bits identical to ``fused_reference.linear`` (whose docstring defines the
arithmetic: 16 float32 lanes in increasing k, a pairwise tree, + bias, one rounding).

W is never written densely. The output rows are split into chunks, run in parallel; a chunk
walks the tiles that hold its rows' weights (tiles run over the flattened row-major W, so a tile
may hold several rows and a row may span several tiles), and for each tile:
  1. decodes it with ``cpu_decode._decode_tile`` into a chunk-local buffer of ``tile`` values
     (the streams are passed from the tile's first byte, so the tile decodes as tile 0 of a
     ``cnt``-value tensor), then writes the tile's NaN patches into it;
  2. widens the bits to float32 (exact), in a second chunk-local buffer;
  3. for each piece of a row in the tile, adds the products into that row's 16 lane
     accumulators for every x row (a lane is ``k % 16`` of the row's own k, so a row split
     across tiles continues where it stopped); when a row is complete its lanes are reduced by
     the fixed tree, the bias added, rounded to the output dtype and stored.
A tile shared by two chunks is decoded by both (at most one extra tile per chunk). Each output
is computed by exactly one chunk in the defined order, so the result does not depend on the
chunking or the thread count.
"""
from __future__ import annotations

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import fused_reference, spec
from .cpu_common import _ERRORS, _OPTS
from .cpu_decode import _decode_tile, tile_args
from .cpu_intrinsics import _elem_ptr
from .spec import FormatError

_KIND = {"bfloat16": 0, "float16": 1, "float32": 2}
_INT = {2: torch.int16, 4: torch.int32}
_F16_SUB = np.float32(2.0 ** -24)


@njit(**_OPTS)
def _widen(kind, buf, cnt, wf, wu):
    """Bits buf[:cnt] of the weight dtype as float32 values in wf[:cnt] (wu: wf's bits)."""
    if kind == 0:
        for i in range(cnt):
            wu[i] = np.uint32(buf[i]) << np.uint32(16)
    elif kind == 2:
        for i in range(cnt):
            wu[i] = np.uint32(buf[i])
    else:
        for i in range(cnt):
            h = np.int64(buf[i])
            s = (h & 0x8000) << 16
            e = (h >> 10) & 31
            m = h & 0x3FF
            if e == 0:  # zero or subnormal: m * 2**-24, exact in float32
                v = np.float32(m) * _F16_SUB
                wf[i] = -v if s else v
            elif e == 31:
                wu[i] = np.uint32(s | 0x7F800000 | (m << 13))
            else:
                wu[i] = np.uint32(s | ((e + 112) << 23) | (m << 13))


def _make_lane_dot(G):
    """An intrinsic for G x rows at once: ``acc[ao+16q : +16] += x[xo+q*xs+16b : +16] *
    w[wo+16b : +16]`` for q < G and b = 0 .. nb-1 in order, lane by lane, in float32. Each row's
    16 lanes are one vector held in registers across the blocks (``fmul`` then ``fadd``, no
    contraction flag, so never an FMA); G independent chains hide the add latency and share each
    load of w. Unaligned loads; LLVM splits the vectors to what the CPU has (zmm with AVX-512,
    ymm with AVX2, ...). Per row the sums are exactly those of G = 1."""
    @intrinsic
    def lane_dot(typingctx, acc, ao, x, xo, xs, w, wo, nb):
        sig = types.void(acc, ao, x, xo, xs, w, wo, nb)

        def codegen(context, builder, sig, args):
            vt = ir.VectorType(ir.FloatType(), 16)
            vp = vt.as_pointer()
            pa = _elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
            px = _elem_ptr(context, builder, sig.args[2], args[2], args[3], sig.args[3])
            pw = _elem_ptr(context, builder, sig.args[5], args[5], args[6], sig.args[6])
            xs_ = context.cast(builder, args[4], sig.args[4], types.intp)
            n = context.cast(builder, args[7], sig.args[7], types.intp)
            i16 = ir.Constant(n.type, 16)
            pas = [builder.bitcast(builder.gep(pa, [ir.Constant(n.type, 16 * q)]), vp) for q in range(G)]
            pxs = [builder.gep(px, [builder.mul(xs_, ir.Constant(n.type, q))]) for q in range(G)]
            slots = []
            for q in range(G):
                slot = cgutils.alloca_once(builder, vt)
                builder.store(builder.load(pas[q], align=4), slot)
                slots.append(slot)
            with cgutils.for_range(builder, n) as loop:
                o = builder.mul(loop.index, i16)
                wv = builder.load(builder.bitcast(builder.gep(pw, [o]), vp), align=4)
                for q in range(G):
                    xv = builder.load(builder.bitcast(builder.gep(pxs[q], [o]), vp), align=4)
                    builder.store(builder.fadd(builder.load(slots[q]), builder.fmul(xv, wv)), slots[q])
            for q in range(G):
                builder.store(builder.load(slots[q]), pas[q], align=4)
            return context.get_dummy_value()
        return sig, codegen
    return lane_dot


_lane_dot1 = _make_lane_dot(1)
_lane_dot4 = _make_lane_dot(4)
_lane_dot8 = _make_lane_dot(8)


@njit(**_OPTS)
def _accum(acc, xf, R, K, kpos, wf, s, take):
    """Products of x[:, kpos:kpos+take] with wf[s:s+take] into the lanes (k % 16) of acc
    (acc[16 r + l]: lane l of x row r; xf: x rows of K values, flat)."""
    j = 0
    while j < take and ((kpos + j) & 15) != 0:  # up to the next lane-0 k
        l = (kpos + j) & 15
        for r in range(R):
            acc[16 * r + l] += xf[r * K + kpos + j] * wf[s + j]
        j += 1
    nb = (take - j) >> 4
    if nb:
        r = 0
        while r + 8 <= R:
            _lane_dot8(acc, 16 * r, xf, r * K + kpos + j, K, wf, s + j, nb)
            r += 8
        if r + 4 <= R:
            _lane_dot4(acc, 16 * r, xf, r * K + kpos + j, K, wf, s + j, nb)
            r += 4
        while r < R:
            _lane_dot1(acc, 16 * r, xf, r * K + kpos + j, K, wf, s + j, nb)
            r += 1
    j += nb << 4
    while j < take:
        l = (kpos + j) & 15
        for r in range(R):
            acc[16 * r + l] += xf[r * K + kpos + j] * wf[s + j]
        j += 1


@njit(**_OPTS)
def _round_bits(z, okind, tmp, tmpu):
    """Step 5: a float32 to the output dtype's bits, nearest even, NaN canonical."""
    tmp[0] = z
    u = np.int64(tmpu[0])
    a = u & 0x7FFFFFFF
    if okind == 2:
        return np.int64(0x7FC00000) if a > 0x7F800000 else u
    if okind == 0:
        if a > 0x7F800000:
            return np.int64(0x7FC0)
        return (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    # float16
    if a > 0x7F800000:
        return np.int64(0x7E00)
    s = (u >> 16) & 0x8000
    if a >= 0x477FF000:  # >= 65520 rounds to inf
        return s | 0x7C00
    if a >= 0x38800000:  # a normal half: rebias the exponent, round off 13 bits
        r = a - 0x38000000
        return s | ((r + 0xFFF + ((r >> 13) & 1)) >> 13)
    e = a >> 23
    if e < 102:  # below 2**-25: rounds to zero (2**-25 itself is a tie, to even zero)
        return s
    m = (a & 0x7FFFFF) | 0x800000
    sh = 126 - e  # the value in units of 2**-24 is m >> sh
    q = m >> sh
    rem = m & ((np.int64(1) << sh) - 1)
    half = np.int64(1) << (sh - 1)
    q += np.int64(rem > half) | (np.int64(rem == half) & (q & 1))
    return s | q


@njit(**_OPTS)
def _emit(acc, R, row, okind, bias, has_bias, y, tmp, tmpu):
    """The lane tree, + bias, rounding: row ``row`` of every output row; acc reset to -0.0."""
    for q in range(R):
        r = 16 * q
        s0 = acc[r + 0] + acc[r + 8]
        s1 = acc[r + 1] + acc[r + 9]
        s2 = acc[r + 2] + acc[r + 10]
        s3 = acc[r + 3] + acc[r + 11]
        s4 = acc[r + 4] + acc[r + 12]
        s5 = acc[r + 5] + acc[r + 13]
        s6 = acc[r + 6] + acc[r + 14]
        s7 = acc[r + 7] + acc[r + 15]
        u0 = s0 + s4
        u1 = s1 + s5
        u2 = s2 + s6
        u3 = s3 + s7
        v0 = u0 + u2
        v1 = u1 + u3
        z = v0 + v1
        if has_bias:
            z = z + bias[row]
        y[q, row] = _round_bits(z, okind, tmp, tmpu)
        for l in range(16):
            acc[r + l] = -0.0


@njit(**_OPTS)
def _chunk(r0, r1, K, kind, okind, xf, bias, has_bias, y, pidx, pval, pstart, buf, wf, wu, acc,
           tmp, tmpu, n, tile, L, W, ESC, VALID, tab, TT, G, sm, smw, keep, drop, tbm1, lanemask,
           L0, L1, L2, L3, L4, off):
    """Output rows [r0, r1): decode their tiles one at a time and multiply. Returns error flags."""
    R = len(acc) // 16
    for i in range(len(acc)):
        acc[i] = -0.0
    e0 = r0 * K
    e1 = r1 * K
    row = r0
    kpos = np.int64(0)
    err = 0
    w0 = W[0]
    for t in range(e0 // tile, (e1 - 1) // tile + 1):
        a = t * tile
        cnt = min(tile, n - a)
        # tile t's streams from its first byte: it decodes as tile 0 of a cnt-value tensor
        err |= _decode_tile(0, cnt, tile, L, W, ESC, VALID, tab, TT, G, sm[(a * smw) >> 3:], smw,
                            keep, drop, tbm1, lanemask, L0[(a * w0) >> 3:], L1[0:], L2[0:], L3[0:],
                            L4[0:], off[t:t + 2], buf)
        for p in range(pstart[t], pstart[t + 1]):
            buf[pidx[p] - a] = pval[p]
        _widen(kind, buf, cnt, wf, wu)
        s = max(a, e0) - a
        e = min(a + cnt, e1) - a
        while s < e:
            take = min(e - s, K - kpos)
            _accum(acc, xf, R, K, kpos, wf, s, take)
            kpos += take
            s += take
            if kpos == K:
                _emit(acc, R, row, okind, bias, has_bias, y, tmp, tmpu)
                row += 1
                kpos = 0
    return err


@njit(parallel=True, **_OPTS)
def _fused_par(bounds, errs, K, kind, okind, xf, bias, has_bias, y, pidx, pval, pstart, bufs, wfs,
               wus, accs, tmps, tmpus, n, tile, L, W, ESC, VALID, tab, TT, G, sm, smw, keep, drop,
               tbm1, lanemask, L0, L1, L2, L3, L4, off):
    for c in prange(len(bounds) - 1):
        errs[c] = _chunk(bounds[c], bounds[c + 1], K, kind, okind, xf, bias, has_bias, y, pidx, pval,
                         pstart, bufs[c], wfs[c], wus[c], accs[c], tmps[c], tmpus[c], n, tile, L, W,
                         ESC, VALID, tab, TT, G, sm, smw, keep, drop, tbm1, lanemask,
                         L0, L1, L2, L3, L4, off)


@njit(**_OPTS)
def _fused_ser(bounds, errs, K, kind, okind, xf, bias, has_bias, y, pidx, pval, pstart, bufs, wfs,
               wus, accs, tmps, tmpus, n, tile, L, W, ESC, VALID, tab, TT, G, sm, smw, keep, drop,
               tbm1, lanemask, L0, L1, L2, L3, L4, off):
    for c in range(len(bounds) - 1):
        errs[c] = _chunk(bounds[c], bounds[c + 1], K, kind, okind, xf, bias, has_bias, y, pidx, pval,
                         pstart, bufs[c], wfs[c], wus[c], accs[c], tmps[c], tmpus[c], n, tile, L, W,
                         ESC, VALID, tab, TT, G, sm, smw, keep, drop, tbm1, lanemask,
                         L0, L1, L2, L3, L4, off)


def chunk_bounds(N: int, K: int, tile: int, threads: int) -> np.ndarray:
    """Output-row boundaries of the parallel chunks: about 2 per thread, each at least ~4 tiles
    of weights (a tile shared by two chunks is decoded twice). Any split gives the same bits."""
    tiles = spec.n_tiles(N * K, tile)
    nch = max(1, min(N, 2 * threads, tiles // 4)) if threads > 1 else 1
    return np.array([(c * N) // nch for c in range(nch + 1)], np.int64)


def linear(ct, x: torch.Tensor, bias: torch.Tensor | None = None, *,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for W = ``ct`` (a CPU CompressedTensor [N, K]) and x [rows, K] of W's
    dtype or float32; the output has x's dtype (written into ``out`` if given: contiguous
    [rows, N]). Bits identical to ``fused_reference.linear``."""
    N, K, odt = fused_reference.check_args(ct, x, bias)
    if ct.device.type != "cpu" or x.device.type != "cpu":
        raise ValueError("the numba fused kernel runs on CPU tensors")
    R = x.shape[0]
    if out is None:
        out = torch.empty((R, N), dtype=x.dtype)
    elif out.dtype != x.dtype or tuple(out.shape) != (R, N) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {(R, N)}")
    if R == 0 or N == 0:
        return out
    if K == 0:
        return out.copy_(fused_reference.linear(ct, x, bias))
    ct.verify()
    olay = spec.LAYOUTS[odt]
    y = out.view(_INT[olay.itemsize]).numpy().view(olay.uint)
    xf = fused_reference.to_f32(x).reshape(-1)
    has_bias = bias is not None
    b = fused_reference.to_f32(bias) if has_bias else np.zeros(1, np.float32)
    args, (pidx, pval) = tile_args(ct)
    n, tile = args[0], args[1]
    tiles = spec.n_tiles(n, tile)
    pstart = np.searchsorted(pidx, np.arange(tiles + 1, dtype=np.int64) * tile).astype(np.int64)
    threads = numba.get_num_threads()
    bounds = chunk_bounds(N, K, tile, threads)
    nch = len(bounds) - 1
    lay = spec.LAYOUTS[ct.header.dtype]
    bufs = np.empty((nch, tile + 16), lay.uint)
    wfs = np.empty((nch, tile + 16), np.float32)
    accs = np.empty((nch, 16 * R), np.float32)
    tmps = np.empty((nch, 2), np.float32)
    errs = np.zeros(nch, np.int64)
    kern = _fused_par if nch > 1 else _fused_ser
    kern(bounds, errs, K, _KIND[ct.header.dtype], _KIND[odt], xf, b, has_bias, y, pidx, pval, pstart,
         bufs, wfs, wfs.view(np.uint32), accs, tmps, tmps.view(np.uint32), *args)
    err = int(np.bitwise_or.reduce(errs))
    if err:
        msgs = [m for bit, m in _ERRORS if err & bit]
        raise FormatError(f"{ct.label}: corrupted compressed tensor: " + "; ".join(msgs))
    return out


@njit(**_OPTS)
def round_bits_array(z, okind, out):
    """``_round_bits`` over a float32 array (for tests: the output rounding on its own)."""
    tmp = np.empty(2, np.float32)
    tmpu = tmp.view(np.uint32)
    for i in range(len(z)):
        out[i] = _round_bits(z[i], okind, tmp, tmpu)
