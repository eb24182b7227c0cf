"""The fused decode-matmul's fast path for a 4-bit window code (lossless bf16, AVX-512BW).

A weight compressed with ``widths=(4,)`` (``codec.WINDOW4``) has one coded exponent level of
4-bit codes (codes 0..14 name the 15 most frequent exponents, code 15 escapes) and, when more
exponents occur, a raw level of exponent bytes for the escapes. Per 64 weights at flat index
i (a multiple of 64) the streams are:
  * ``sm[i : i+64]``: uint8, ``sign << 7 | mantissa`` (lossless bf16: 8 bits a value);
  * ``level0[i/2 : i/2+32]``: uint8, two codes a byte, weight i+2m in the low nibble of byte m,
    weight i+2m+1 in the high one;
  * ``level1``: uint8 exponents of the escapes in value order, tile t's from byte
    ``offsets[t, 0] * 8``.
So bf16 bits = ``(sm & 0x80) << 8 | exp << 7 | sm & 0x7f``: byte-wise, low byte
``(exp & 1) << 7 | sm & 0x7f`` and high byte ``sm & 0x80 | exp >> 1``. ``_w4_dot`` builds both
bytes of 64 weights with two 16-entry table lookups (VPSHUFB), takes the escapes' exponents with
one masked expand-load (VPEXPANDB where VBMI2 is present), widens to float32 in registers and adds
the products into the 64 lanes, exactly as ``cpu_fused`` does: the same arithmetic
(``fused_reference``), the same bits, without a tile buffer or the cascade's prefix counts.
``cpu_fused.FusedWeight`` takes this path when ``eligible`` says so, else its general one.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import spec
from .cpu_common import _OPTS, ERR_CODE, ERR_ESCAPES
from .cpu_fused import _emit, _inputs
from .cpu_intrinsics import _elem_ptr, _host_has, _prefetch

LANES = 64
HAS_AVX512BW = _host_has("avx512bw")
_RP_BITS = 48  # _w4_dot returns the raw cursor in its low bits and "a code named nothing" above


def _make_w4_dot(G):
    """An intrinsic for G x rows: decode the ``ng`` groups of 64 window-coded bf16 weights at
    flat index ``i0`` (``sm``, ``L0`` from their first byte; escapes from ``raw[rp:]``) and do
    ``acc[ao+64q : +64] += x[xo+q*xs+64b : +64] * w[64b : +64]`` for q < G, b < ng, lane by lane
    in float32 (fmul then fadd: never an FMA). ``tabs``: uint8[128], the low-byte table then the
    high-byte table, each a 16-entry table repeated in the four 128-bit lanes (entry 15: 0).
    Returns the raw cursor after the groups, plus ``1 << 48`` if a code above ``maxc`` occurred.
    ``raw`` must hold 64 readable bytes past any cursor the groups reach."""
    @intrinsic
    def w4_dot(typingctx, acc, ao, x, xo, xs, sm, L0, i0, raw, rp, tabs, maxc, ng):
        sig = types.int64(acc, ao, x, xo, xs, sm, L0, i0, raw, rp, tabs, maxc, ng)

        def codegen(context, builder, sig, args):
            i1, i8, i16, i32, i64 = (ir.IntType(b) for b in (1, 8, 16, 32, 64))
            v64b, v32b, v32w = ir.VectorType(i8, 64), ir.VectorType(i8, 32), ir.VectorType(i16, 32)
            v64d, v64m = ir.VectorType(i32, 64), ir.VectorType(i1, 64)
            vf = ir.VectorType(ir.FloatType(), LANES)
            c8 = lambda v: ir.Constant(v64b, [v] * 64)  # noqa: E731
            mod = builder.module
            pshufb = cgutils.get_or_insert_function(mod, ir.FunctionType(v64b, [v64b, v64b]),
                                                    "llvm.x86.avx512.pshuf.b.512")
            expand = cgutils.get_or_insert_function(
                mod, ir.FunctionType(v64b, [i8.as_pointer(), v64m, v64b]), "llvm.masked.expandload.v64i8")
            ctpop = cgutils.get_or_insert_function(mod, ir.FunctionType(i64, [i64]), "llvm.ctpop.i64")
            a = args
            pa = _elem_ptr(context, builder, sig.args[0], a[0], a[1], sig.args[1])
            px = _elem_ptr(context, builder, sig.args[2], a[2], a[3], sig.args[3])
            psm = _elem_ptr(context, builder, sig.args[5], a[5], a[7], sig.args[7])
            i0 = context.cast(builder, a[7], sig.args[7], types.intp)
            pl0 = _elem_ptr(context, builder, sig.args[6], a[6], builder.ashr(i0, ir.Constant(i0.type, 1)),
                            types.intp)
            praw = _elem_ptr(context, builder, sig.args[8], a[8], ir.Constant(i64, 0), types.intp)
            ptab = _elem_ptr(context, builder, sig.args[10], a[10], ir.Constant(i64, 0), types.intp)
            lot = builder.load(builder.bitcast(ptab, v64b.as_pointer()), align=1)
            hit = builder.load(builder.bitcast(builder.gep(ptab, [ir.Constant(i64, 64)]), v64b.as_pointer()),
                               align=1)
            maxc = builder.trunc(a[11], i8)
            maxv = builder.shuffle_vector(builder.insert_element(ir.Constant(v64b, None), maxc,
                                                                 ir.Constant(i32, 0)),
                                          ir.Constant(v64b, None), ir.Constant(v64d, [0] * 64))
            xs = context.cast(builder, a[4], sig.args[4], types.intp)
            n = context.cast(builder, a[12], sig.args[12], types.intp)
            pas = [builder.bitcast(builder.gep(pa, [ir.Constant(n.type, LANES * q)]), vf.as_pointer())
                   for q in range(G)]
            pxs = [builder.gep(px, [builder.mul(xs, ir.Constant(n.type, q))]) for q in range(G)]
            slots = []
            for q in range(G):
                slot = cgutils.alloca_once(builder, vf)
                builder.store(builder.load(pas[q], align=4), slot)
                slots.append(slot)
            rps = cgutils.alloca_once(builder, i64)
            builder.store(context.cast(builder, a[9], sig.args[9], types.int64), rps)
            bad = cgutils.alloca_once(builder, i1)
            builder.store(ir.Constant(i1, 0), bad)
            tlos = cgutils.alloca_once(builder, v64b)
            this = cgutils.alloca_once(builder, v64b)
            with cgutils.for_range(builder, n) as loop:
                o = builder.mul(loop.index, ir.Constant(n.type, LANES))
                s = builder.load(builder.bitcast(builder.gep(psm, [o]), v64b.as_pointer()), align=1)
                half = builder.ashr(o, ir.Constant(o.type, 1))
                c = builder.zext(builder.load(builder.bitcast(builder.gep(pl0, [half]), v32b.as_pointer()),
                                              align=1), v32w)
                # byte 2m = low nibble of code byte m, byte 2m+1 = its high nibble
                c = builder.or_(builder.and_(c, ir.Constant(v32w, [0x0F] * 32)),
                                builder.and_(builder.shl(c, ir.Constant(v32w, [4] * 32)),
                                             ir.Constant(v32w, [0x0F00] * 32)))
                codes = builder.bitcast(c, v64b)
                builder.store(builder.call(pshufb, [lot, codes]), tlos)
                builder.store(builder.call(pshufb, [hit, codes]), this)
                over = builder.bitcast(builder.icmp_unsigned(">", codes, maxv), i64)
                builder.store(builder.or_(builder.load(bad), builder.icmp_unsigned("!=", over, ir.Constant(i64, 0))),
                              bad)
                esc = builder.icmp_unsigned("==", codes, c8(15))
                escm = builder.bitcast(esc, i64)
                with builder.if_then(builder.icmp_unsigned("!=", escm, ir.Constant(i64, 0)), likely=False):
                    rp = builder.load(rps)
                    ex = builder.call(expand, [builder.gep(praw, [rp]), esc, c8(0)])
                    builder.store(builder.or_(builder.load(tlos), builder.shl(ex, c8(7))), tlos)
                    builder.store(builder.or_(builder.load(this), builder.lshr(ex, c8(1))), this)
                    builder.store(builder.add(rp, builder.call(ctpop, [escm])), rps)
                lo = builder.or_(builder.and_(s, c8(0x7F)), builder.load(tlos))
                hi = builder.or_(builder.and_(s, c8(0x80)), builder.load(this))
                w = builder.or_(builder.shl(builder.zext(hi, v64d), ir.Constant(v64d, [24] * 64)),
                                builder.shl(builder.zext(lo, v64d), ir.Constant(v64d, [16] * 64)))
                wv = builder.bitcast(w, vf)
                for q in range(G):
                    xv = builder.load(builder.bitcast(builder.gep(pxs[q], [o]), vf.as_pointer()), align=4)
                    builder.store(builder.fadd(builder.load(slots[q]), builder.fmul(xv, wv)), slots[q])
            for q in range(G):
                builder.store(builder.load(slots[q]), pas[q], align=4)
            flag = builder.shl(builder.zext(builder.load(bad), i64), ir.Constant(i64, _RP_BITS))
            return builder.or_(builder.load(rps), flag)
        return sig, codegen
    return w4_dot


_w4_dot1 = _make_w4_dot(1)
_w4_dot2 = _make_w4_dot(2)
_w4_dot4 = _make_w4_dot(4)


@njit(**_OPTS)
def _escapes_before(L0, a, e):
    """Escape codes (15) among entries [a, e) of the 4-bit level (a, e even)."""
    c = 0
    for b in range(a >> 1, e >> 1):
        v = np.int64(L0[b])
        c += np.int64((v & 15) == 15) + np.int64((v >> 4) == 15)
    return c


@njit(**_OPTS)
def _dot_piece(acc, xf, R, K, kpos, sm, L0, s, raw, rp, tabs, maxc, ng):
    """All R x rows against ``ng`` groups at flat index s (row position kpos); returns _w4_dot's
    value for the last call (every call starts from the same cursor)."""
    res = rp
    r = 0
    while r + 4 <= R:
        res = _w4_dot4(acc, 64 * r, xf, r * K + kpos, K, sm, L0, s, raw, rp, tabs, maxc, ng)
        r += 4
    if r + 2 <= R:
        res = _w4_dot2(acc, 64 * r, xf, r * K + kpos, K, sm, L0, s, raw, rp, tabs, maxc, ng)
        r += 2
    if r < R:
        res = _w4_dot1(acc, 64 * r, xf, r * K + kpos, K, sm, L0, s, raw, rp, tabs, maxc, ng)
    return res


@njit(**_OPTS)
def _prefetch_range(st, b0, nb):
    for b in range(b0, b0 + nb, 64):
        _prefetch(st, b)


@njit(**_OPTS)
def chunk_w4(r0, r1, K, okind, xf, bias, has_bias, y, acc, tmp, tmpu, n, tile, sm, L0, raw, off,
             has_raw, tabs, maxc):
    """Output rows [r0, r1) (K and tile multiples of 64). Returns error flags."""
    R = len(acc) // 64
    for i in range(len(acc)):
        acc[i] = -0.0
    e0 = r0 * K
    e1 = r1 * K
    row = r0
    kpos = np.int64(0)
    err = 0
    tiles = (n + tile - 1) // tile
    for t in range(e0 // tile, (e1 - 1) // tile + 1):
        a = t * tile
        cnt = min(tile, n - a)
        if t + 2 < tiles:  # the streams of the tile after next, from DRAM while this one runs
            b = (t + 2) * tile
            _prefetch_range(sm, b, tile)
            _prefetch_range(L0, b >> 1, tile >> 1)
        s = max(a, e0)
        e = min(a + cnt, e1)
        rp = np.int64(off[t, 0]) * 8 if has_raw else np.int64(0)
        rend = np.int64(off[t + 1, 0]) * 8 if has_raw else np.int64(0)
        if s > a:
            rp += _escapes_before(L0, a, s)
        while s < e:
            take = min(e - s, K - kpos)
            res = _dot_piece(acc, xf, R, K, kpos, sm, L0, s, raw, rp, tabs, maxc, take >> 6)
            if res >> 48:
                err |= ERR_CODE
            rp = res & ((np.int64(1) << 48) - 1)
            kpos += take
            s += take
            if kpos == K:
                _emit(acc, R, row, okind, bias, has_bias, y, tmp, tmpu)
                row += 1
                kpos = 0
        if rp > rend:
            err |= ERR_ESCAPES
            break
    return err


@njit(parallel=True, **_OPTS)
def fused_par(bounds, errs, K, okind, xkind, xbits, xf, xfu, bkind, bbits, bf, bfu, y, accs, tmps, tmpus,
              n, tile, sm, L0, raw, off, has_raw, tabs, maxc):
    _inputs(xkind, xbits, xf, xfu, bkind, bbits, bf, bfu)
    for c in prange(len(bounds) - 1):
        errs[c] = chunk_w4(bounds[c], bounds[c + 1], K, okind, xf, bf, len(bf) > 0, y, accs[c], tmps[c],
                           tmpus[c], n, tile, sm, L0, raw, off, has_raw, tabs, maxc)


@njit(**_OPTS)
def fused_ser(bounds, errs, K, okind, xkind, xbits, xf, xfu, bkind, bbits, bf, bfu, y, accs, tmps, tmpus,
              n, tile, sm, L0, raw, off, has_raw, tabs, maxc):
    _inputs(xkind, xbits, xf, xfu, bkind, bbits, bf, bfu)
    for c in range(len(bounds) - 1):
        errs[c] = chunk_w4(bounds[c], bounds[c + 1], K, okind, xf, bf, len(bf) > 0, y, accs[c], tmps[c],
                           tmpus[c], n, tile, sm, L0, raw, off, has_raw, tabs, maxc)


def eligible(ct) -> bool:
    """Whether ``ct`` (2-D, non-empty) takes this path: lossless bf16, one 4-bit coded level
    (with or without the raw one), no patches, rows and tiles of whole 64-weight groups, and a
    CPU with AVX-512BW."""
    h = ct.header
    if not HAS_AVX512BW or h.dtype != "bfloat16" or h.mantissa_bits != 7 or tuple(h.widths) != (4,):
        return False
    N, K = ct.shape
    return K % 64 == 0 and h.tile % 64 == 0 and N * K > 0


def prepare(ct) -> tuple:
    """(sm, level0, raw padded, offsets, has_raw, tabs, maxc) for ``chunk_w4``: the streams as
    numpy views, the raw level copied with ``tile + 64`` zero bytes after it (every cursor a valid
    or corrupted tile can reach, plus one expand-load), and the two lookup tables."""
    h = ct.header
    sec = ct.np_sections()
    n = h.numel
    if len(sec["sm"]) < n + 8 or len(sec["level0"]) < n // 2 + 8:
        raise spec.FormatError("a stream is shorter than the header implies")
    sym = [int(v) for v in h.symbols]
    ncode = min(len(sym), 15)
    lo = np.zeros(16, np.uint8)
    hi = np.zeros(16, np.uint8)
    for c in range(ncode):
        lo[c] = (sym[c] & 1) << 7
        hi[c] = sym[c] >> 1
    tabs = np.concatenate([np.tile(lo, 4), np.tile(hi, 4)])
    raw_src = sec["level1"] if h.has_raw else np.zeros(0, np.uint8)
    raw = np.zeros(len(raw_src) + h.tile + 64, np.uint8)
    raw[:len(raw_src)] = raw_src
    off = sec["offsets"]
    if h.has_raw and (off.shape[1] < 1 or int(off[-1, 0]) * 8 > len(raw_src)):
        raise spec.FormatError("the raw level's offsets point past its stream")
    if not h.has_raw:
        off = np.zeros((spec.n_tiles(n, h.tile) + 1, 1), np.uint32)
    maxc = 15 if h.has_raw else ncode - 1
    return sec["sm"], sec["level0"], raw, off, bool(h.has_raw), tabs, maxc
