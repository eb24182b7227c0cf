"""numba fused decode-matmul: ``linear(ct, x, bias)`` = ``x @ W.T (+ bias)`` straight from the
compressed W, bits identical to ``fused_reference.linear`` (whose docstring defines the
arithmetic: 64 float32 lanes in increasing k, a pairwise tree, + bias, one rounding).

W is never written densely. The output rows are split into chunks, run in parallel; a chunk
walks the tiles that hold its rows' weights (tiles run over the flattened row-major W, so a tile
may hold several rows and a row may span several tiles), and for each tile:
  1. decodes it with ``decode._decode_tile`` into a chunk-local buffer of ``tile`` values
     (the streams are passed from the tile's first byte, so the tile decodes as tile 0 of a
     ``cnt``-value tensor), then writes the tile's NaN patches into it;
  2. widens the bits to float32 (exact), in a second chunk-local buffer;
  3. for each piece of a row in the tile, adds the products into that row's 64 lane
     accumulators for every x row (a lane is ``k % 64`` of the row's own k, so a row split
     across tiles continues where it stopped); when a row is complete its lanes are reduced by
     the fixed tree, the bias added, rounded to the output dtype and stored.
A tile shared by two chunks is decoded by both (at most one extra tile per chunk). Each output
is computed by exactly one chunk in the defined order, so the result does not depend on the
chunking or the thread count.
"""
from __future__ import annotations

import threading

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import fused_reference, spec
from .common import _ERRORS, _OPTS
from .decode import _decode_tile, tile_args
from . import fused_w4
from .fused_common import _inputs, _prefetch_bytes, _round_bits, _widen
from .intrinsics import _elem_ptr
from ..spec import FormatError

LANES = fused_reference.LANES  # 64: the kernels below hard-code it (k % 64, the 6-level tree)

_KIND = {"bfloat16": 0, "float16": 1, "float32": 2}
_TKIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_INT = {2: torch.int16, 4: torch.int32}
ROW_ID_DTYPES = fused_reference.ROW_ID_DTYPES


def _make_lane_dot(G, bf16_bits=False):
    """An intrinsic for G x rows at once: ``acc[ao+64q : +64] += x[xo+q*xs+64b : +64] *
    w[wo+64b : +64]`` for q < G and b = 0 .. nb-1 in order, lane by lane, in float32. Each row's
    64 lanes are one vector (four zmm with AVX-512) held in registers across the blocks (``fmul`` then ``fadd``, no
    contraction flag, so never an FMA); G independent chains hide the add latency and share each
    load of w. ``bf16_bits``: w holds bf16 bit patterns (uint16), widened in the register
    (zero-extend, shift left 16: exact), so the weights never pass through a float32 buffer.
    Unaligned loads; LLVM splits the vectors to what the CPU has (zmm with AVX-512, ymm with
    AVX2, ...). Per row the sums are exactly those of G = 1."""
    @intrinsic
    def lane_dot(typingctx, acc, ao, x, xo, xs, w, wo, nb):
        sig = types.void(acc, ao, x, xo, xs, w, wo, nb)

        def codegen(context, builder, sig, args):
            vt = ir.VectorType(ir.FloatType(), LANES)
            vp = vt.as_pointer()
            wt = ir.VectorType(ir.IntType(16), LANES)
            it = ir.VectorType(ir.IntType(32), LANES)
            sh16 = ir.Constant(it, [16] * LANES)
            pa = _elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
            px = _elem_ptr(context, builder, sig.args[2], args[2], args[3], sig.args[3])
            pw = _elem_ptr(context, builder, sig.args[5], args[5], args[6], sig.args[6])
            xs_ = context.cast(builder, args[4], sig.args[4], types.intp)
            n = context.cast(builder, args[7], sig.args[7], types.intp)
            step = ir.Constant(n.type, LANES)
            pas = [builder.bitcast(builder.gep(pa, [ir.Constant(n.type, LANES * q)]), vp) for q in range(G)]
            pxs = [builder.gep(px, [builder.mul(xs_, ir.Constant(n.type, q))]) for q in range(G)]
            slots = []
            for q in range(G):
                slot = cgutils.alloca_once(builder, vt)
                builder.store(builder.load(pas[q], align=4), slot)
                slots.append(slot)
            with cgutils.for_range(builder, n) as loop:
                o = builder.mul(loop.index, step)
                if bf16_bits:
                    raw = builder.load(builder.bitcast(builder.gep(pw, [o]), wt.as_pointer()), align=2)
                    wv = builder.bitcast(builder.shl(builder.zext(raw, it), sh16), vt)
                else:
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
_lane_dot1_bf16 = _make_lane_dot(1, True)
_lane_dot4_bf16 = _make_lane_dot(4, True)


@njit(**_OPTS)
def _weight_at(kind, buf, wf, i, tmp, tmpu):
    """Weight i of the tile as float32: bf16 bits widened here, other dtypes from ``_widen``'s wf."""
    if kind == 0:
        tmpu[1] = np.uint32(buf[i]) << np.uint32(16)
        return tmp[1]
    return wf[i]


@njit(**_OPTS)
def _accum(acc, xf, R, K, kpos, kind, buf, wf, s, take, tmp, tmpu):
    """Products of x[:, kpos:kpos+take] with the tile's weights s:s+take into the lanes (k % 64)
    of acc (acc[64 r + l]: lane l of x row r; xf: x rows of K values, flat). bf16 weights are read
    as bits from buf (widened in the registers), others as float32 from wf."""
    j = 0
    while j < take and ((kpos + j) & 63) != 0:  # up to the next lane-0 k
        w = _weight_at(kind, buf, wf, s + j, tmp, tmpu)
        for r in range(R):
            acc[64 * r + ((kpos + j) & 63)] += xf[r * K + kpos + j] * w
        j += 1
    nb = (take - j) >> 6
    if nb:
        r = 0
        while r + 4 <= R:
            if kind == 0:
                _lane_dot4_bf16(acc, 64 * r, xf, r * K + kpos + j, K, buf, s + j, nb)
            else:
                _lane_dot4(acc, 64 * r, xf, r * K + kpos + j, K, wf, s + j, nb)
            r += 4
        while r < R:
            if kind == 0:
                _lane_dot1_bf16(acc, 64 * r, xf, r * K + kpos + j, K, buf, s + j, nb)
            else:
                _lane_dot1(acc, 64 * r, xf, r * K + kpos + j, K, wf, s + j, nb)
            r += 1
    j += nb << 6
    while j < take:
        w = _weight_at(kind, buf, wf, s + j, tmp, tmpu)
        for r in range(R):
            acc[64 * r + ((kpos + j) & 63)] += xf[r * K + kpos + j] * w
        j += 1


@intrinsic
def _tree_reset(typingctx, acc, ao):
    """Step 3 on the 64 lanes at acc[ao:]: lane l + lane l+h for l < h, h = 32, 16, .. 1, each
    sum one float32 rounding (the halves of a vector added elementwise, so the pairs are the
    reference's); returns lane 0 and sets the 64 lanes back to -0.0."""
    sig = types.float32(acc, ao)

    def codegen(context, builder, sig, args):
        ft = ir.FloatType()
        vt = ir.VectorType(ft, LANES)
        p = builder.bitcast(_elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1]),
                            vt.as_pointer())
        v = builder.load(p, align=4)
        h = LANES // 2
        while h >= 1:
            lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), h), list(range(h))))
            hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), h),
                                                          list(range(h, 2 * h))))
            v = builder.fadd(lo, hi)
            h //= 2
        z = builder.extract_element(v, ir.Constant(ir.IntType(32), 0))
        builder.store(ir.Constant(vt, [-0.0] * LANES), p, align=4)
        return z
    return sig, codegen


@njit(**_OPTS)
def _emit(acc, R, row, okind, bias, has_bias, y, tmp, tmpu):
    """The lane tree, + bias, rounding: row ``row`` of every output row; acc reset to -0.0."""
    for q in range(R):
        z = _tree_reset(acc, 64 * q)
        if has_bias:
            z = z + bias[row]
        y[q, row] = _round_bits(z, okind, tmp, tmpu)


@njit(**_OPTS)
def _prefetch_tile(t, tiles, tile, L, W, smw, sm, L0, L1, L2, L3, L4, off):
    """Ask for tile t's streams while the tile before it decodes: weights stream from DRAM
    once per token, and the decoder alone cannot keep enough reads in flight to hide them."""
    if t >= tiles:
        return
    a = t * tile
    _prefetch_bytes(sm, (a * smw) >> 3, (tile * smw) >> 3)
    _prefetch_bytes(L0, (a * W[0]) >> 3, (tile * W[0]) >> 3)
    if L > 1:
        _prefetch_bytes(L1, np.int64(off[t, 0]) * W[1], np.int64(off[t + 1, 0] - off[t, 0]) * W[1])
    if L > 2:
        _prefetch_bytes(L2, np.int64(off[t, 1]) * W[2], np.int64(off[t + 1, 1] - off[t, 1]) * W[2])


@njit(**_OPTS)
def _chunk(r0, r1, K, kind, okind, xf, bias, has_bias, y, pidx, pval, pstart, buf, wf, wu, acc,
           tmp, tmpu, n, tile, L, W, ESC, VALID, tab, TT, G, sm, smw, keep, drop, tbm1, lanemask,
           L0, L1, L2, L3, L4, off):
    """Output rows [r0, r1): decode their tiles one at a time and multiply. Returns error flags."""
    R = len(acc) // 64
    for i in range(len(acc)):
        acc[i] = -0.0
    e0 = r0 * K
    e1 = r1 * K
    row = r0
    kpos = np.int64(0)
    err = 0
    w0 = W[0]
    tiles = (n + tile - 1) // tile
    _prefetch_tile(e0 // tile, tiles, tile, L, W, smw, sm, L0, L1, L2, L3, L4, off)
    _prefetch_tile(e0 // tile + 1, tiles, tile, L, W, smw, sm, L0, L1, L2, L3, L4, off)
    for t in range(e0 // tile, (e1 - 1) // tile + 1):
        a = t * tile
        cnt = min(tile, n - a)
        _prefetch_tile(t + 2, tiles, tile, L, W, smw, sm, L0, L1, L2, L3, L4, off)
        # tile t's streams from its first byte: it decodes as tile 0 of a cnt-value tensor
        err |= _decode_tile(0, cnt, tile, L, W, ESC, VALID, tab, TT, G, sm[(a * smw) >> 3:], smw,
                            keep, drop, tbm1, lanemask, L0[(a * w0) >> 3:], L1[0:], L2[0:], L3[0:],
                            L4[0:], off[t:t + 2], buf)
        for p in range(pstart[t], pstart[t + 1]):
            buf[pidx[p] - a] = pval[p]
        if kind != 0:  # bf16 is widened in the multiply's registers
            _widen(kind, buf, cnt, wf, wu)
        s = max(a, e0) - a
        e = min(a + cnt, e1) - a
        while s < e:
            take = min(e - s, K - kpos)
            _accum(acc, xf, R, K, kpos, kind, buf, wf, s, take, tmp, tmpu)
            kpos += take
            s += take
            if kpos == K:
                _emit(acc, R, row, okind, bias, has_bias, y, tmp, tmpu)
                row += 1
                kpos = 0
    return err


@njit(parallel=True, **_OPTS)
def _fused_par(bounds, errs, K, kind, okind, xkind, xbits, xf, xfu, bkind, bbits, bf, bfu, y, pidx,
               pval, pstart, bufs, wfs, wus, accs, tmps, tmpus, n, tile, L, W, ESC, VALID, tab, TT, G,
               sm, smw, keep, drop, tbm1, lanemask, L0, L1, L2, L3, L4, off):
    _inputs(xkind, xbits, xf, xfu, bkind, bbits, bf, bfu)
    for c in prange(len(bounds) - 1):
        errs[c] = _chunk(bounds[c], bounds[c + 1], K, kind, okind, xf, bf, len(bf) > 0, y, pidx, pval,
                         pstart, bufs[c], wfs[c], wus[c], accs[c], tmps[c], tmpus[c], n, tile, L, W,
                         ESC, VALID, tab, TT, G, sm, smw, keep, drop, tbm1, lanemask,
                         L0, L1, L2, L3, L4, off)


@njit(**_OPTS)
def _fused_ser(bounds, errs, K, kind, okind, xkind, xbits, xf, xfu, bkind, bbits, bf, bfu, y, pidx,
               pval, pstart, bufs, wfs, wus, accs, tmps, tmpus, n, tile, L, W, ESC, VALID, tab, TT, G,
               sm, smw, keep, drop, tbm1, lanemask, L0, L1, L2, L3, L4, off):
    _inputs(xkind, xbits, xf, xfu, bkind, bbits, bf, bfu)
    for c in range(len(bounds) - 1):
        errs[c] = _chunk(bounds[c], bounds[c + 1], K, kind, okind, xf, bf, len(bf) > 0, y, pidx, pval,
                         pstart, bufs[c], wfs[c], wus[c], accs[c], tmps[c], tmpus[c], n, tile, L, W,
                         ESC, VALID, tab, TT, G, sm, smw, keep, drop, tbm1, lanemask,
                         L0, L1, L2, L3, L4, off)


@njit(**_OPTS)
def _gather(ids, K, out, pidx, pval, pstart, buf, n, tile, L, W, ESC, VALID, tab, TT, G, sm, smw,
            keep, drop, tbm1, lanemask, L0, L1, L2, L3, L4, off):
    """out[i*K : (i+1)*K] = row ids[i] of W: each tile that holds part of the row decoded into
    buf (as in ``_chunk``), its patches applied, the row's piece copied. Returns error flags."""
    err = 0
    w0 = W[0]
    for i in range(len(ids)):
        e0 = ids[i] * K
        e1 = e0 + K
        for t in range(e0 // tile, (e1 - 1) // tile + 1):
            a = t * tile
            cnt = min(tile, n - a)
            err |= _decode_tile(0, cnt, tile, L, W, ESC, VALID, tab, TT, G, sm[(a * smw) >> 3:], smw,
                                keep, drop, tbm1, lanemask, L0[(a * w0) >> 3:], L1[0:], L2[0:], L3[0:],
                                L4[0:], off[t:t + 2], buf)
            for p in range(pstart[t], pstart[t + 1]):
                buf[pidx[p] - a] = pval[p]
            s = max(a, e0)
            e = min(a + cnt, e1)
            for j in range(s, e):
                out[i * K + j - e0] = buf[j - a]
    return err


# A parallel region costs ~50-75 us to wake numba's threads under OMP_WAIT_POLICY=PASSIVE (and a
# serial decode-multiply runs ~0.5-0.9 cycles a weight): smaller weights run on the calling thread.
PARALLEL_MIN_WEIGHTS = 1 << 19


def chunk_bounds(N: int, K: int, tile: int, threads: int) -> np.ndarray:
    """Output-row boundaries of the parallel chunks: about 2 per thread, each at least ~4 tiles
    of weights (a tile shared by two chunks is decoded twice); one chunk for weights under
    ``PARALLEL_MIN_WEIGHTS``. Any split gives the same bits."""
    tiles = spec.n_tiles(N * K, tile)
    nch = 1
    if threads > 1 and N * K >= PARALLEL_MIN_WEIGHTS:
        nch = max(1, min(N, 2 * threads, tiles // 4))
    return np.array([(c * N) // nch for c in range(nch + 1)], np.int64)


def _bits(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU float tensor's bit patterns as a flat numpy array of its uint type."""
    lay = spec.LAYOUTS[str(t.dtype).removeprefix("torch.")]
    return t.reshape(-1).view(_INT[lay.itemsize]).numpy().view(lay.uint)


class FusedWeight:
    """A CPU CompressedTensor W [N, K] prepared for repeated use straight from its compressed
    bytes: ``linear(x, bias)`` = ``x @ W.T (+ bias)`` (bits identical to
    ``fused_reference.linear``) and ``rows(ids)`` = ``W[ids]`` (an embedding lookup: bits identical
    to the decoded W's rows). The checks, decode tables and per-tile patch ranges are done once,
    so a call costs one numba dispatch and a few small allocations (the runtime keeps one per
    weight). Calls may run from several threads at once (each has its own scratch)."""

    def __init__(self, ct):
        if len(ct.shape) != 2:
            raise ValueError(f"linear needs a 2-D weight, got shape {tuple(ct.shape)}")
        if ct.device.type != "cpu":
            raise ValueError("the numba fused kernel runs on CPU tensors")
        self.ct = ct
        self.nbytes = ct.nbytes  # what a linear() reads (ct.nbytes serialises the header each time)
        self.N, self.K = ct.shape
        self.dtype = ct.header.dtype
        self.kind = _KIND[self.dtype]
        self._uint = spec.LAYOUTS[self.dtype].uint
        self.window = False  # whether linear() takes the window code's fast path (fused_w4)
        if self.N * self.K == 0:
            return
        ct.verify()
        self._args, (self._pidx, self._pval) = tile_args(ct)
        n, tile = self._args[0], self._args[1]
        self.tile = tile
        tiles = spec.n_tiles(n, tile)
        self._pstart = np.searchsorted(self._pidx, np.arange(tiles + 1, dtype=np.int64) * tile).astype(np.int64)
        self._bounds: dict = {}
        self._local = threading.local()  # per-thread scratch (_scratch)
        self._w4 = fused_w4.prepare(ct) if fused_w4.eligible(ct) else None
        self.window = self._w4 is not None
        self._w4_kernels = (fused_w4.fused_par, fused_w4.fused_ser)

    def _scratch(self, nch: int, R: int) -> tuple:
        """This thread's scratch for ``nch`` chunks and ``R`` x rows, kept between calls (every
        buffer is written before it is read in a call, so reuse changes nothing)."""
        cache = getattr(self._local, "scratch", None)
        if cache is None:
            cache = self._local.scratch = {}
        sc = cache.get((nch, R))
        if sc is None:
            if len(cache) > 8:
                cache.clear()
            xf = np.empty(R * self.K, np.float32)
            bufs = np.empty((nch, self.tile + 16), self._uint)
            wfs = np.empty((nch, self.tile + 16) if self.kind else (nch, 16), np.float32)  # bf16: unused
            tmps = np.empty((nch, 2), np.float32)
            sc = cache[(nch, R)] = (xf, xf.view(np.uint32), bufs, wfs, wfs.view(np.uint32),
                                    np.empty((nch, LANES * R), np.float32), tmps, tmps.view(np.uint32),
                                    np.zeros(nch, np.int64))
        return sc

    def _xperm(self, n: int) -> np.ndarray:
        """This thread's buffer for x in the window path's order (``fused_w4.permute_x``)."""
        xp = getattr(self._local, "xperm", None)
        if xp is None or len(xp) != n:
            xp = self._local.xperm = np.empty(n, np.float32)
        return xp

    def _bias_f32(self) -> tuple:
        """This thread's float32 bias buffer and its bits view."""
        bf = getattr(self._local, "bias", None)
        if bf is None:
            b = np.empty(self.N, np.float32)
            bf = self._local.bias = (b, b.view(np.uint32))
        return bf

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """``W[ids]`` for an integer tensor of row indices (any shape): [*ids.shape, K] of W's
        dtype; only the tiles that hold those rows are decoded. IndexError for ids out of range."""
        flat = ids.reshape(-1)
        if flat.dtype not in ROW_ID_DTYPES:
            raise TypeError(f"row ids must be an integer tensor, got {flat.dtype}")
        out = torch.empty((flat.numel(), self.K), dtype=getattr(torch, self.dtype))
        if flat.numel() and (bool((flat < 0).any()) or bool((flat >= self.N).any())):
            raise IndexError("index out of range in self")
        if flat.numel() and self.K:
            bits = out.view(_INT[out.element_size()]).numpy().view(self._uint).reshape(-1)
            buf = np.empty(self.tile + 16, self._uint)
            err = _gather(flat.to(torch.int64).numpy(), self.K, bits, self._pidx, self._pval, self._pstart,
                          buf, *self._args)
            if err:
                msgs = [m for bit, m in _ERRORS if err & bit]
                raise FormatError(f"{self.ct.label}: corrupted compressed tensor: " + "; ".join(msgs))
        return out.view(*ids.shape, self.K)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None, *,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W.T (+ bias)``: x [rows, K] of W's dtype or float32, the output of x's dtype
        (into ``out`` if given: contiguous [rows, N])."""
        N, K = self.N, self.K
        _, _, odt = fused_reference.check_args(self.ct, x, bias)
        if x.device.type != "cpu" or (bias is not None and bias.device.type != "cpu"):
            raise ValueError("the numba fused kernel runs on CPU tensors")
        R = x.shape[0]
        if out is None:
            out = torch.empty((R, N), dtype=x.dtype)
        elif out.dtype != x.dtype or tuple(out.shape) != (R, N) or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape {(R, N)}")
        if R == 0 or N == 0:
            return out
        if K == 0:
            return out.copy_(fused_reference.linear(self.ct, x, bias))
        xb = _bits(x.detach().contiguous())
        y = out.view(_INT[out.element_size()]).numpy().view(spec.LAYOUTS[odt].uint)
        threads = numba.get_num_threads()
        bounds = self._bounds.get(threads)
        if bounds is None:
            bounds = self._bounds[threads] = chunk_bounds(N, K, self.tile, threads)
        nch = len(bounds) - 1
        xf, xfu, bufs, wfs, wfu, accs, tmps, tmpu, errs = self._scratch(nch, R)
        if bias is not None:
            bb = _bits(bias.detach().contiguous())
            bkind = _TKIND[bias.dtype]
            bf, bfu = self._bias_f32()
        else:
            bb, bkind, bf, bfu = _NO_BITS, 0, _NO_F32, _NO_F32U
        if self._w4 is not None:  # the window code's path (fused_w4): the same bits
            kern = self._w4_kernels[0 if nch > 1 else 1]
            xp = self._xperm(len(xf))
            kern(bounds, errs, K, _TKIND[out.dtype], _TKIND[x.dtype], xb, xf, xfu, xp, bkind, bb, bf,
                 bfu, y, accs, tmps, tmpu, self._args[0], self.tile, *self._w4)
        else:
            kern = _fused_par if nch > 1 else _fused_ser
            kern(bounds, errs, K, self.kind, _TKIND[out.dtype], _TKIND[x.dtype], xb, xf, xfu, bkind, bb, bf,
                 bfu, y, self._pidx, self._pval, self._pstart, bufs, wfs, wfu, accs, tmps, tmpu,
                 *self._args)
        err = int(np.bitwise_or.reduce(errs)) if nch > 1 else int(errs[0])
        if err:
            msgs = [m for bit, m in _ERRORS if err & bit]
            raise FormatError(f"{self.ct.label}: corrupted compressed tensor: " + "; ".join(msgs))
        return out


_NO_BITS = np.zeros(1, np.uint16)
_NO_F32 = np.zeros(0, np.float32)
_NO_F32U = _NO_F32.view(np.uint32)


def linear(ct, x: torch.Tensor, bias: torch.Tensor | None = None, *,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for W = ``ct`` (a CPU CompressedTensor [N, K]) and x [rows, K] of W's
    dtype or float32; the output has x's dtype (written into ``out`` if given: contiguous
    [rows, N]). Bits identical to ``fused_reference.linear``. (For repeated calls on one weight,
    ``FusedWeight(ct)`` does the preparation once.)"""
    fused_reference.check_args(ct, x, bias)
    return FusedWeight(ct).linear(x, bias, out=out)


@njit(**_OPTS)
def round_bits_array(z, okind, out):
    """``_round_bits`` over a float32 array (for tests: the output rounding on its own)."""
    tmp = np.empty(2, np.float32)
    tmpu = tmp.view(np.uint32)
    for i in range(len(z)):
        out[i] = _round_bits(z[i], okind, tmp, tmpu)
