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
``(exp & 1) << 7 | sm & 0x7f`` and high byte ``sm & 0x80 | exp >> 1``. ``_w4_rows`` builds both
bytes of 64 weights with two 16-entry table lookups (VPSHUFB), takes the escapes' exponents with
one masked expand-load (VPEXPANDB where VBMI2 is present), widens to float32 in registers and adds
the products into the 64 lanes, exactly as ``fused`` does: the same arithmetic
(``fused_reference``), the same bits, without a tile buffer or the cascade's prefix counts.
``fused.FusedWeight`` takes this path when ``eligible`` says so, else its general one.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import fused_reference, spec
from .common import _OPTS, ERR_CODE, ERR_ESCAPES
from .fused_common import _inputs, _prefetch_bytes, _round_bits
from .intrinsics import _elem_ptr, _host_has

LANES = fused_reference.LANES  # 64: the unpack tables and the tree below hard-code it
HAS_AVX512BW = _host_has("avx512bw")
_RP_BITS = 48  # _w4_rows returns the raw cursor in its low bits and "a code named nothing" above


# The lanes a register holds after the unpacks: in each 128-bit lane L of the 64 bytes, the
# byte unpacks give words for weights 16L+m (low half, m < 8) and 16L+8+m (high half); the word
# unpacks split each into 4s. Register r (0..3), element 4L+m holds weight 16L + 4r + m.
PERM = [16 * L + 4 * r + m for r in range(4) for L in range(4) for m in range(4)]
UNPACK_BW = [[i for L in range(4) for m in range(8) for i in (16 * L + 8 * h + m, 64 + 16 * L + 8 * h + m)]
             for h in range(2)]  # lo, hi bytes -> words (VPUNPCKLBW h=0, VPUNPCKHBW h=1)
UNPACK_WD = [[i for L in range(4) for m in range(4) for i in (0, 32 + 8 * L + 4 * h + m)]
             for h in range(2)]  # (zeros, words) -> words << 16 as dwords (VPUNPCKLWD/HWD)


def _make_w4_rows(G):
    """An intrinsic for G x rows over ``ng`` groups of 64 window-coded bf16 weights from flat
    index ``i0`` (``sm``, ``L0`` read from there; the escapes' exponents from ``raw[rp:]``), the
    first at group ``g0`` of a W row of ``gpr`` groups. Per group, weights w[0..63] decoded in
    registers, ``acc_q[lane] += x_q[64g + lane] * w[lane]`` for q < G in float32 (fmul then fadd:
    never an FMA); when a W row's last group is in, its 64 lanes are reduced by the fixed tree
    (``fused_reference``: lane l + lane l+h, h = 32 .. 1) into ``z[zo + q*zs + k]`` (k: rows
    completed in this call) and the lanes start again at -0.0. The lanes live in the unpacks'
    order (``PERM``), and so do ``x`` (``permute_x``) and the carried partial sums ``acc[64q ..]``
    of a row that continues in the next call; the tree pairs the same lanes as the reference's.
    ``tabs``: uint8[128], the low-byte then the high-byte 16-entry table, each repeated in the four
    128-bit lanes (entry 15: 0). Returns the raw cursor after the groups, plus ``1 << 48`` if a
    code above ``maxc`` occurred. ``raw`` must hold 64 readable bytes past any cursor reached."""
    @intrinsic
    def w4_rows(typingctx, acc, x, xo, xs, z, zo, zs, sm, L0, i0, raw, rp, tabs, maxc, ng, g0, gpr):
        sig = types.int64(acc, x, xo, xs, z, zo, zs, sm, L0, i0, raw, rp, tabs, maxc, ng, g0, gpr)

        def codegen(context, builder, sig, args):
            i1, i8, i16, i32, i64 = (ir.IntType(b) for b in (1, 8, 16, 32, 64))
            v64b, v32b, v32w = ir.VectorType(i8, 64), ir.VectorType(i8, 32), ir.VectorType(i16, 32)
            v64m = ir.VectorType(i1, 64)
            f32 = ir.FloatType()
            vq = ir.VectorType(f32, 16)
            c8 = lambda v: ir.Constant(v64b, [v] * 64)  # noqa: E731
            mask = lambda idx: ir.Constant(ir.VectorType(i32, len(idx)), idx)  # noqa: E731
            mod = builder.module
            pshufb = cgutils.get_or_insert_function(mod, ir.FunctionType(v64b, [v64b, v64b]),
                                                    "llvm.x86.avx512.pshuf.b.512")
            expand = cgutils.get_or_insert_function(
                mod, ir.FunctionType(v64b, [i8.as_pointer(), v64m, v64b]), "llvm.masked.expandload.v64i8")
            ctpop = cgutils.get_or_insert_function(mod, ir.FunctionType(i64, [i64]), "llvm.ctpop.i64")
            a = args
            A = sig.args
            cast = lambda k: context.cast(builder, a[k], A[k], types.intp)  # noqa: E731
            zero = ir.Constant(i64, 0)
            pacc = _elem_ptr(context, builder, A[0], a[0], zero, types.intp)
            px = _elem_ptr(context, builder, A[1], a[1], a[2], A[2])
            pz = _elem_ptr(context, builder, A[4], a[4], a[5], A[5])
            psm = _elem_ptr(context, builder, A[7], a[7], a[9], A[9])
            i0 = cast(9)
            pl0 = _elem_ptr(context, builder, A[8], a[8], builder.ashr(i0, ir.Constant(i64, 1)), types.intp)
            praw = _elem_ptr(context, builder, A[10], a[10], zero, types.intp)
            ptab = _elem_ptr(context, builder, A[12], a[12], zero, types.intp)
            lot = builder.load(builder.bitcast(ptab, v64b.as_pointer()), align=1)
            hit = builder.load(builder.bitcast(builder.gep(ptab, [ir.Constant(i64, 64)]), v64b.as_pointer()), align=1)
            maxv = builder.shuffle_vector(builder.insert_element(ir.Constant(v64b, None), builder.trunc(a[13], i8),
                                                                 ir.Constant(i32, 0)),
                                          ir.Constant(v64b, None), mask([0] * 64))
            xs, zs, n, gpr = cast(3), cast(6), cast(14), cast(16)
            pxs = [builder.gep(px, [builder.mul(xs, ir.Constant(i64, q))]) for q in range(G)]
            slots = []  # 4 registers per x row: register r element 4L+m is lane 16L + 4r + m
            for q in range(G):
                for r in range(4):
                    slot = cgutils.alloca_once(builder, vq)
                    p = builder.bitcast(builder.gep(pacc, [ir.Constant(i64, 64 * q + 16 * r)]), vq.as_pointer())
                    builder.store(builder.load(p, align=4), slot)
                    slots.append(slot)
            gpos = cgutils.alloca_once(builder, i64)
            builder.store(cast(15), gpos)
            done = cgutils.alloca_once(builder, i64)
            builder.store(zero, done)
            rps = cgutils.alloca_once(builder, i64)
            builder.store(context.cast(builder, a[11], A[11], types.int64), rps)
            bad = cgutils.alloca_once(builder, i1)
            builder.store(ir.Constant(i1, 0), bad)
            tlos = cgutils.alloca_once(builder, v64b)
            this = cgutils.alloca_once(builder, v64b)
            z16 = ir.Constant(v32w, [0] * 32)
            negz = ir.Constant(vq, [-0.0] * 16)
            with cgutils.for_range(builder, n) as loop:
                o = builder.mul(loop.index, ir.Constant(i64, LANES))
                s = builder.load(builder.bitcast(builder.gep(psm, [o]), v64b.as_pointer()), align=1)
                c = builder.zext(builder.load(builder.bitcast(builder.gep(pl0, [builder.ashr(o, ir.Constant(i64, 1))]),
                                                              v32b.as_pointer()), align=1), v32w)
                # byte 2m = low nibble of code byte m, byte 2m+1 = its high nibble
                c = builder.or_(builder.and_(c, ir.Constant(v32w, [0x0F] * 32)),
                                builder.and_(builder.shl(c, ir.Constant(v32w, [4] * 32)),
                                             ir.Constant(v32w, [0x0F00] * 32)))
                codes = builder.bitcast(c, v64b)
                builder.store(builder.call(pshufb, [lot, codes]), tlos)
                builder.store(builder.call(pshufb, [hit, codes]), this)
                over = builder.bitcast(builder.icmp_unsigned(">", codes, maxv), i64)
                builder.store(builder.or_(builder.load(bad), builder.icmp_unsigned("!=", over, zero)), bad)
                esc = builder.icmp_unsigned("==", codes, c8(15))
                escm = builder.bitcast(esc, i64)
                with builder.if_then(builder.icmp_unsigned("!=", escm, zero), likely=False):
                    rp = builder.load(rps)
                    ex = builder.call(expand, [builder.gep(praw, [rp]), esc, c8(0)])
                    builder.store(builder.or_(builder.load(tlos), builder.shl(ex, c8(7))), tlos)
                    builder.store(builder.or_(builder.load(this), builder.lshr(ex, c8(1))), this)
                    builder.store(builder.add(rp, builder.call(ctpop, [escm])), rps)
                lo = builder.or_(builder.and_(s, c8(0x7F)), builder.load(tlos))
                hi = builder.or_(builder.and_(s, c8(0x80)), builder.load(this))
                # bf16 words by in-lane byte unpacks (VPUNPCKLBW/HBW), float32 by in-lane word
                # unpacks under zeros (VPUNPCKLWD/HWD): register r holds weights PERM[16r .. 16r+15]
                words = [builder.bitcast(builder.shuffle_vector(lo, hi, mask(UNPACK_BW[h])), v32w) for h in range(2)]
                wv = [builder.bitcast(builder.shuffle_vector(z16, words[r >> 1], mask(UNPACK_WD[r & 1])), vq)
                      for r in range(4)]
                g = builder.load(gpos)
                xg = builder.mul(g, ir.Constant(i64, LANES))
                for q in range(G):
                    for r in range(4):
                        xp = builder.gep(pxs[q], [builder.add(xg, ir.Constant(i64, 16 * r))])
                        xv = builder.load(builder.bitcast(xp, vq.as_pointer()), align=4)
                        sl = slots[4 * q + r]
                        builder.store(builder.fadd(builder.load(sl), builder.fmul(xv, wv[r])), sl)
                g1 = builder.add(g, ir.Constant(i64, 1))
                builder.store(g1, gpos)
                with builder.if_then(builder.icmp_signed("==", g1, gpr)):  # a W row is complete
                    k = builder.load(done)
                    for q in range(G):
                        regs = [builder.load(slots[4 * q + r]) for r in range(4)]
                        half = lambda v, lo_, n_: builder.shuffle_vector(v, v, mask(list(range(lo_, lo_ + n_))))  # noqa: E731
                        r8 = [builder.fadd(half(v, 0, 8), half(v, 8, 8)) for v in regs]  # h=32: L, L+2
                        r4 = [builder.fadd(half(v, 0, 4), half(v, 4, 4)) for v in r8]  # h=16: L=0, L=1
                        t = [builder.fadd(r4[0], r4[2]), builder.fadd(r4[1], r4[3])]  # h=8: r, r+2
                        d = builder.fadd(t[0], t[1])  # h=4: r=0, r=1; element m is lane m
                        e2 = builder.fadd(half(d, 0, 2), half(d, 2, 2))  # h=2
                        zf = builder.fadd(builder.extract_element(e2, ir.Constant(i32, 0)),
                                          builder.extract_element(e2, ir.Constant(i32, 1)))  # h=1
                        builder.store(zf, builder.gep(pz, [builder.add(builder.mul(zs, ir.Constant(i64, q)), k)]))
                        for r in range(4):
                            builder.store(negz, slots[4 * q + r])
                    builder.store(builder.add(k, ir.Constant(i64, 1)), done)
                    builder.store(zero, gpos)
            for q in range(G):
                for r in range(4):
                    p = builder.bitcast(builder.gep(pacc, [ir.Constant(i64, 64 * q + 16 * r)]), vq.as_pointer())
                    builder.store(builder.load(slots[4 * q + r]), p, align=4)
            flag = builder.shl(builder.zext(builder.load(bad), i64), ir.Constant(i64, _RP_BITS))
            return builder.or_(builder.load(rps), flag)
        return sig, codegen
    return w4_rows


_w4_rows1 = _make_w4_rows(1)
_w4_rows2 = _make_w4_rows(2)
_w4_rows4 = _make_w4_rows(4)


@njit(**_OPTS)
def permute_x(xf, xp, K):
    """xp = xf in the unpacks' order: per 64 values, xp[64g + i] = xf[64g + PERM[i]] (K % 64 == 0)."""
    for b in range(0, len(xf), 64):
        for r in range(4):
            for L in range(4):
                for m in range(4):
                    xp[b + 16 * r + 4 * L + m] = xf[b + 16 * L + 4 * r + m]


@njit(**_OPTS)
def _escapes_before(L0, a, e):
    """Escape codes (15) among entries [a, e) of the 4-bit level (a, e even)."""
    c = 0
    for b in range(a >> 1, e >> 1):
        v = np.int64(L0[b])
        c += np.int64((v & 15) == 15) + np.int64((v >> 4) == 15)
    return c


@njit(**_OPTS)
def _rows_piece(acc, xp, R, K, z, zs, sm, L0, s, raw, rp, tabs, maxc, ng, g0):
    """All R x rows against ``ng`` groups from flat index s (group g0 of its W row), in blocks
    of 4, 2, 1 x rows (each block decodes the groups again, from the same cursor); returns the
    last block's ``_w4_rows`` value."""
    res = rp
    gpr = K >> 6
    r = 0
    while r + 4 <= R:
        res = _w4_rows4(acc[64 * r:], xp, r * K, K, z, r * zs, zs, sm, L0, s, raw, rp, tabs, maxc, ng, g0, gpr)
        r += 4
    if r + 2 <= R:
        res = _w4_rows2(acc[64 * r:], xp, r * K, K, z, r * zs, zs, sm, L0, s, raw, rp, tabs, maxc, ng, g0, gpr)
        r += 2
    if r < R:
        res = _w4_rows1(acc[64 * r:], xp, r * K, K, z, r * zs, zs, sm, L0, s, raw, rp, tabs, maxc, ng, g0, gpr)
    return res


@njit(**_OPTS)
def chunk_w4(r0, r1, K, okind, xp, bias, has_bias, y, acc, tmp, tmpu, n, tile, sm, L0, raw, off,
             has_raw, tabs, maxc):
    """Output rows [r0, r1) (K and tile multiples of 64), tile by tile: the rows completed in a
    tile get + bias and the rounding (``fused_common._round_bits``). Returns error flags."""
    R = len(acc) // 64
    for i in range(len(acc)):
        acc[i] = -0.0
    zs = tile // K + 2  # rows a tile can complete
    z = np.empty(R * zs, np.float32)
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
            _prefetch_bytes(sm, b, tile)
            _prefetch_bytes(L0, b >> 1, tile >> 1)
        s = max(a, e0)
        e = min(a + cnt, e1)
        rp = np.int64(off[t, 0]) * 8 if has_raw else np.int64(0)
        rend = np.int64(off[t + 1, 0]) * 8 if has_raw else np.int64(0)
        if s > a:
            rp += _escapes_before(L0, a, s)
        res = _rows_piece(acc, xp, R, K, z, zs, sm, L0, s, raw, rp, tabs, maxc, (e - s) >> 6, kpos >> 6)
        if res >> _RP_BITS:
            err |= ERR_CODE
        rp = res & ((np.int64(1) << _RP_BITS) - 1)
        done = (kpos + e - s) // K
        kpos = (kpos + e - s) % K
        for j in range(done):
            for q in range(R):
                v = z[q * zs + j]
                if has_bias:
                    v = v + bias[row]
                y[q, row] = _round_bits(v, okind, tmp, tmpu)
            row += 1
        if rp > rend:
            err |= ERR_ESCAPES
            break
    return err


@njit(parallel=True, **_OPTS)
def fused_par(bounds, errs, K, okind, xkind, xbits, xf, xfu, xp, bkind, bbits, bf, bfu, y, accs, tmps, tmpus,
              n, tile, sm, L0, raw, off, has_raw, tabs, maxc):
    _inputs(xkind, xbits, xf, xfu, bkind, bbits, bf, bfu)
    permute_x(xf, xp, K)
    for c in prange(len(bounds) - 1):
        errs[c] = chunk_w4(bounds[c], bounds[c + 1], K, okind, xp, bf, len(bf) > 0, y, accs[c], tmps[c],
                           tmpus[c], n, tile, sm, L0, raw, off, has_raw, tabs, maxc)


@njit(**_OPTS)
def fused_ser(bounds, errs, K, okind, xkind, xbits, xf, xfu, xp, bkind, bbits, bf, bfu, y, accs, tmps, tmpus,
              n, tile, sm, L0, raw, off, has_raw, tabs, maxc):
    _inputs(xkind, xbits, xf, xfu, bkind, bbits, bf, bfu)
    permute_x(xf, xp, K)
    for c in range(len(bounds) - 1):
        errs[c] = chunk_w4(bounds[c], bounds[c + 1], K, okind, xp, bf, len(bf) > 0, y, accs[c], tmps[c],
                           tmpus[c], n, tile, sm, L0, raw, off, has_raw, tabs, maxc)


def eligible(ct) -> bool:
    """Whether ``ct`` takes this path: ``spec.window_fusable`` (lossless bf16 in the window code,
    rows and tiles of whole 64-weight groups) on a CPU with AVX-512BW."""
    return HAS_AVX512BW and spec.window_fusable(ct.header, ct.shape)


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
