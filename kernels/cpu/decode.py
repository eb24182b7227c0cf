"""numba decoder: ``decode_into`` writes a CompressedTensor's bit patterns, bits identical to
``reference.decode``; the per-codebook tables (``_decode_tables``), the tile decode and the NaN
patches.

What it reads, in spec's terms: ``sm`` (``1 + k`` bits a value: the kept mantissa bits low,
the sign above them; put back at bits ``man_bits - k ..`` and ``total_bits - 1``), ``level0``
(an entry for every value, tile ``t`` from entry ``t * tile``), the deeper levels from
``offsets[t, l - 1]`` groups of 8 entries, and ``patch_idx`` / ``patch_val`` written over the
result last. Every stream read is an unaligned 64-bit load within its ``STREAM_PAD`` bytes.

Decoding a tile, in three steps and without any scratch memory:
  1. top-down, count the escapes of every level within the tile (popcounts for 1- and 2-bit
     levels), which gives each deeper level's entry count; check it against the tile's offsets;
  2. bottom-up, decode the deepest level into the *tail* of the tile's own output slots, then
     merge each shallower level with the list below it (a code picks its symbol, an escape takes
     the next list entry: a branchless cursor), again into the tail;
  3. level 0 merges with the level-1 list and the sign/mantissa stream into the final bits.
A list of ``k`` entries lives in the last ``k`` slots of the tile; the merge reads slot
``end - (escapes left)`` and writes slot ``end - (entries left)``, so it never overwrites an
entry it still has to read. Levels whose codes for one 64-bit word of output (4 values of
bf16/fp16, 2 of fp32) fit in a byte are decoded a word at a time: the chunk of codes selects
the symbols of its non-escape lanes, its escape lanes and their count from a small table, and
PDEP drops the next list entries into the escape lanes (and, on level 0, the sign/mantissa bits
into place); the rest go one entry at a time with a branchless cursor (a real CMOV). With
AVX-512 VBMI2, 2-bit levels of 16-bit floats go 32 entries a step (``_codes2_x32``, and
``_bf16_level0_x32`` for level 0 of lossless bf16 with its sign/mantissa bytes: the codes spread
to 16-bit lanes, the escapes filled from the list by one VPEXPANDW).
Errors (more escapes than the offsets allow, a code that names no symbol, offsets past a stream,
a patch index out of range) come back as flags (``common.ERR_*``) and raise ``FormatError``.
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from .. import spec
from .common import (_ERRORS, _NCODE, _NLEV, _OPTS, ERR_CODE, ERR_ESCAPES, ERR_OFFSETS,
                         _parallel)
from .intrinsics import (_HAS_VBMI2, _bf16_level0_x32, _codes2_x32, _cmov, _ld32, _ld64, _ldel, _pdep, _popc,
                             _st64, _stel)
from ..spec import FormatError
from . import decode_w4
from .patches import _finish


@njit(**_OPTS)
def _count_esc(st, start, k, w):
    """Escapes (all-ones codes) among entries [start, start + k) of a w-bit stream; start % 8 == 0."""
    if k <= 0:
        return np.int64(0)
    tot = np.int64(0)
    if w == 1 or w == 2:
        per = 64 // w
        byte0 = (start * w) >> 3
        nfull = k // per
        for q in range(nfull):
            x = _ld64(st, byte0 + 8 * q)
            if w == 2:
                x = x & (x >> 1) & 0x5555555555555555
            tot += _popc(x)
        r = k - nfull * per
        if r:
            x = _ld64(st, byte0 + 8 * nfull) & ((np.int64(1) << (r * w)) - 1)
            if w == 2:
                x = x & (x >> 1) & 0x5555555555555555
            tot += _popc(x)
        return tot
    mask = (np.int64(1) << w) - 1
    for j in range(start, start + k):
        b = j * w
        tot += ((_ld64(st, b >> 3) >> (b & 7)) & mask) == mask
    return tot


@njit(**_OPTS)
def _ldwin(out, q, lim, G):
    """The G output slots from q as one little-endian 64-bit word (zeros past the array)."""
    if q + G <= lim:
        return _ld64(out, q)
    X = np.int64(0)
    sh = 64 // G
    for j in range(G):
        if q + j < lim:
            X |= _ldel(out, q + j) << (sh * j)
    return X


@njit(**_OPTS)
def _merge_chunks(st, start, k, w, G, TT, row, out, P, Pn, lim, valid):
    """The table path of ``_merge``: G entries (one chunk of G * w <= 8 bits) per step. A chunk
    selects from TT the symbols of its non-escape lanes (B), its escape lanes (M) and their count
    (N, negative if a code names no symbol); PDEP drops the next list entries into the escape
    lanes. Returns (entries done, list entries taken, bad)."""
    c = np.int64(0)
    bad = np.int64(0)
    j = 0
    if valid and P + k + 8 <= lim:
        # every code valid, no read can pass the array: no checks
        cm = (np.int64(1) << (G * w)) - 1
        while j + G <= k:
            b = (start + j) * w
            r = (row + ((_ld64(st, b >> 3) >> (b & 7)) & cm)) * 4
            _st64(out, P + j, _ldel(TT, r) | _pdep(_ld64(out, Pn + c), _ldel(TT, r + 1)))
            c += _ldel(TT, r + 2)
            j += G
    if G == 4 and w == 2:
        base = (start * 2) >> 3
        while j + 4 <= k:
            r = (row + _ldel(st, base + (j >> 2))) * 4
            q = Pn + c
            if q + 4 <= lim:
                X = _ld64(out, q)
            else:
                X = _ldwin(out, q, lim, 4)
            nn = _ldel(TT, r + 2)
            _st64(out, P + j, _ldel(TT, r) | _pdep(X, _ldel(TT, r + 1)))
            c += nn & 7
            bad |= nn
            j += 4
    elif G == 4 and w == 1:
        base = start >> 3
        while j + 4 <= k:
            r = (row + ((_ldel(st, base + (j >> 3)) >> (j & 4)) & 15)) * 4
            q = Pn + c
            if q + 4 <= lim:
                X = _ld64(out, q)
            else:
                X = _ldwin(out, q, lim, 4)
            nn = _ldel(TT, r + 2)
            _st64(out, P + j, _ldel(TT, r) | _pdep(X, _ldel(TT, r + 1)))
            c += nn & 7
            bad |= nn
            j += 4
    else:
        cmask = (np.int64(1) << (G * w)) - 1
        while j + G <= k:
            b = (start + j) * w
            r = (row + ((_ld64(st, b >> 3) >> (b & 7)) & cmask)) * 4
            q = Pn + c
            if q + G <= lim:
                X = _ld64(out, q)
            else:
                X = _ldwin(out, q, lim, G)
            nn = _ldel(TT, r + 2)
            _st64(out, P + j, _ldel(TT, r) | _pdep(X, _ldel(TT, r + 1)))
            c += nn & 7
            bad |= nn
            j += G
    return j, c, bad


@njit(**_OPTS)
def _merge(st, start, k, w, escv, tab, TT, G, lv, out, P, Pn, lim, valid):
    """Decode k entries of a level (from entry ``start``) into out[P:P+k], escapes taking the
    next entries of the list at out[Pn:]. Returns a negative number if a code names no symbol."""
    j = 0
    c = np.int64(0)
    bad = np.int64(0)
    if _HAS_VBMI2 and G == 4 and w == 2 and valid and _ldel(TT, lv * 1024 + 14) == 1:
        # 16-bit values, a 2-bit level whose code 3 escapes, every code valid: 32 entries a step
        t0 = _ldel(TT, lv * 1024) & 0xFFFF
        t1 = _ldel(TT, lv * 1024 + 4) & 0xFFFF
        t2 = _ldel(TT, lv * 1024 + 8) & 0xFFFF
        byte0 = (start * 2) >> 3
        while j + 32 <= k:
            c += _codes2_x32(st, byte0 + (j >> 2), out, P + j, Pn + c, t0, t1, t2)
            j += 32
    if G * w <= 8:
        j2, c2, bad = _merge_chunks(st, start + j, k - j, w, G, TT, lv * 256, out, P + j, Pn + c,
                                    lim, valid)
        j += j2
        c += c2
    mask = (np.int64(1) << w) - 1
    last = lim - 1
    row = lv * _NCODE
    while j < k:
        b = (start + j) * w
        code = (_ld64(st, b >> 3) >> (b & 7)) & mask
        v = _ldel(tab, row + code)
        bad |= v
        x = _ldel(out, min(Pn + c, last))
        e = np.int64(code == escv)
        _stel(out, P + j, _cmov(e, x, v))
        c += e
        j += 1
    return bad


_BF16_LANES = 0x807F807F807F807F - (1 << 64)  # lossless bf16's sign/mantissa lanes, as an int64


@njit(**_OPTS)
def _level0_chunks(L0, sm, out, a, end, w0, smw, G, TT, lanemask, P1, lim, valid):
    """Level 0 and the sign/mantissa stream, G values per step (see ``_merge_chunks``).
    Returns (next value, list entries taken, bad)."""
    c = np.int64(0)
    bad = np.int64(0)
    i = a
    if (_HAS_VBMI2 and G == 4 and w0 == 2 and smw == 8 and lanemask == _BF16_LANES and valid
            and _ldel(TT, 14) == 1):
        # lossless bf16 (not fp16 with 7 kept bits: the lane mask says where the sm bits go)
        # whose code 3 escapes (TT row 3: one escape), every code valid:
        # 32 values a step, the escapes filled by VPEXPANDW
        t0 = _ldel(TT, 0) & 0xFFFF
        t1 = _ldel(TT, 4) & 0xFFFF
        t2 = _ldel(TT, 8) & 0xFFFF
        while i + 32 <= end:
            c += _bf16_level0_x32(L0, sm, out, i, P1 + c, t0, t1, t2)
            i += 32
    if G == 4 and w0 == 2 and smw == 8 and valid and end + 8 <= lim:
        # lossless bf16, every code valid, reads of the list cannot pass the array: no checks
        while i + 8 <= end:
            r = _ldel(L0, i >> 2) * 4
            r2 = _ldel(L0, (i >> 2) + 1) * 4
            s8 = _ld64(sm, i)
            word = _pdep(s8, lanemask) | _ldel(TT, r) | _pdep(_ld64(out, P1 + c), _ldel(TT, r + 1))
            c += _ldel(TT, r + 2)
            word2 = (_pdep(s8 >> 32, lanemask) | _ldel(TT, r2)
                     | _pdep(_ld64(out, P1 + c), _ldel(TT, r2 + 1)))
            c += _ldel(TT, r2 + 2)
            _st64(out, i, word)
            _st64(out, i + 4, word2)
            i += 8
    if valid and end + 8 <= lim:  # any layout, every code valid: no checks
        cmask = (np.int64(1) << (G * w0)) - 1
        smaskg = (np.int64(1) << (G * smw)) - 1
        while i + G <= end:
            b = i * w0
            r = ((_ld64(L0, b >> 3) >> (b & 7)) & cmask) * 4
            bpos = i * smw
            sg = (_ld64(sm, bpos >> 3) >> (bpos & 7)) & smaskg
            _st64(out, i, _pdep(sg, lanemask) | _ldel(TT, r) | _pdep(_ld64(out, P1 + c), _ldel(TT, r + 1)))
            c += _ldel(TT, r + 2)
            i += G
    if G == 4 and w0 == 2 and smw == 8:  # lossless bf16
        while i + 4 <= end:
            r = _ldel(L0, i >> 2) * 4
            q = P1 + c
            if q + 4 <= lim:
                X = _ld64(out, q)
            else:
                X = _ldwin(out, q, lim, 4)
            nn = _ldel(TT, r + 2)
            word = _pdep(_ld32(sm, i), lanemask) | _ldel(TT, r) | _pdep(X, _ldel(TT, r + 1))
            _st64(out, i, word)
            c += nn & 7
            bad |= nn
            i += 4
    else:
        cmask = (np.int64(1) << (G * w0)) - 1
        smaskg = (np.int64(1) << (G * smw)) - 1
        while i + G <= end:
            b = i * w0
            r = ((_ld64(L0, b >> 3) >> (b & 7)) & cmask) * 4
            bpos = i * smw
            sg = (_ld64(sm, bpos >> 3) >> (bpos & 7)) & smaskg
            q = P1 + c
            if q + G <= lim:
                X = _ld64(out, q)
            else:
                X = _ldwin(out, q, lim, G)
            nn = _ldel(TT, r + 2)
            word = _pdep(sg, lanemask) | _ldel(TT, r) | _pdep(X, _ldel(TT, r + 1))
            _st64(out, i, word)
            c += nn & 7
            bad |= nn
            i += G
    return i, c, bad


@njit(**_OPTS)
def _decode_tile(t, n, tile, L, W, ESC, VALID, tab, TT, G, sm, smw, keep, drop, tbm1, lanemask,
                 L0, L1, L2, L3, L4, off, out):
    a = t * tile
    end = min(a + tile, n)
    cnt = end - a
    lim = len(out)
    streams = (L0, L1, L2, L3, L4)
    # 1. top-down: entries of each deeper level in this tile
    k1 = np.int64(0)
    k2 = np.int64(0)
    k3 = np.int64(0)
    k4 = np.int64(0)
    k = cnt
    s = a
    for l in range(L - 1):
        e = _count_esc(streams[l], s, k, W[l])
        o0 = np.int64(off[t, l])
        o1 = np.int64(off[t + 1, l])
        if o1 < o0 or o1 * W[l + 1] + 8 > len(streams[l + 1]):
            return ERR_OFFSETS
        if (o1 - o0) * 8 < e:
            return ERR_ESCAPES
        if l == 0:
            k1 = e
        elif l == 1:
            k2 = e
        elif l == 2:
            k3 = e
        else:
            k4 = e
        k = e
        s = o0 * 8
    # 2. bottom-up: deeper levels into the tile's tail
    bad = np.int64(0)
    kn = np.int64(0)
    for l in range(L - 1, 0, -1):
        kl = k1 if l == 1 else (k2 if l == 2 else (k3 if l == 3 else k4))
        if kl:
            bad |= _merge(streams[l], np.int64(off[t, l - 1]) * 8, kl, W[l], ESC[l], tab, TT, G, l,
                          out, end - kl, end - kn, lim, VALID[l])
        kn = kl
    # 3. level 0 + sign/mantissa
    w0 = W[0]
    P1 = end - k1
    i = a
    c = np.int64(0)
    if G * w0 <= 8:
        i, c, bad0 = _level0_chunks(L0, sm, out, a, end, w0, smw, G, TT, lanemask, P1, lim, VALID[0])
        bad |= bad0
    esc0 = ESC[0]
    last = lim - 1
    kmask = (np.int64(1) << keep) - 1
    mask0 = (np.int64(1) << w0) - 1
    smmask = (np.int64(1) << smw) - 1
    while i < end:
        b = i * w0
        code = (_ld64(L0, b >> 3) >> (b & 7)) & mask0
        v = _ldel(tab, code)
        bad |= v
        x = _ldel(out, min(P1 + c, last))
        e = np.int64(code == esc0)
        c += e
        bs = i * smw
        smv = (_ld64(sm, bs >> 3) >> (bs & 7)) & smmask
        _stel(out, i, ((smv >> keep) << tbm1) | ((smv & kmask) << drop) | _cmov(e, x, v))
        i += 1
    return ERR_CODE if bad < 0 else 0


@njit(parallel=True, **_OPTS)
def _decode_par(n, tile, L, W, ESC, VALID, tab, TT, G, sm, smw, keep, drop, tbm1, lanemask,
                L0, L1, L2, L3, L4, off, out, pidx, pval):
    tiles = (n + tile - 1) // tile
    e_esc = 0
    e_code = 0
    e_off = 0
    for t in prange(tiles):
        f = _decode_tile(t, n, tile, L, W, ESC, VALID, tab, TT, G, sm, smw, keep, drop, tbm1,
                         lanemask, L0, L1, L2, L3, L4, off, out)
        e_esc += f == ERR_ESCAPES
        e_code += f == ERR_CODE
        e_off += f == ERR_OFFSETS
    return _finish(n, out, pidx, pval, e_esc, e_code, e_off)


@njit(**_OPTS)
def _decode_ser(n, tile, L, W, ESC, VALID, tab, TT, G, sm, smw, keep, drop, tbm1, lanemask,
                L0, L1, L2, L3, L4, off, out, pidx, pval):
    tiles = (n + tile - 1) // tile
    e_esc = 0
    e_code = 0
    e_off = 0
    for t in range(tiles):
        f = _decode_tile(t, n, tile, L, W, ESC, VALID, tab, TT, G, sm, smw, keep, drop, tbm1,
                         lanemask, L0, L1, L2, L3, L4, off, out)
        e_esc += f == ERR_ESCAPES
        e_code += f == ERR_CODE
        e_off += f == ERR_OFFSETS
    return _finish(n, out, pidx, pval, e_esc, e_code, e_off)


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


@functools.lru_cache(maxsize=512)  # ~50 KB of tables each
def _decode_tables(dtype: str, keep: int, widths: tuple, has_raw: bool, symbols: tuple):
    """Per-codebook decode tables (built once per distinct codebook, then reused)."""
    layout = spec.LAYOUTS[dtype]
    mb = layout.man_bits
    all_widths = spec.level_widths(widths, has_raw, layout.exp_bits)
    L = len(all_widths)
    # tab[level, code]: the exponent (shifted into place) a code names; -1: names nothing;
    # 0 for the escape code of a level that has a next one
    tab = np.full((_NLEV, _NCODE), -1, np.int64)
    W = np.zeros(_NLEV, np.int64)
    ESC = np.full(_NLEV, -1, np.int64)
    first = 0
    for level, w in enumerate(all_widths):
        W[level] = w
        if has_raw and level == L - 1:
            tab[level, : 1 << w] = np.arange(1 << w) << mb
            continue
        cap = (1 << w) - 1
        for c in range(cap):
            if first + c < len(symbols):
                tab[level, c] = symbols[first + c] << mb
        if level < L - 1:
            ESC[level] = cap
            tab[level, cap] = 0
        first += cap
    # G = values per 64-bit word of output. A level with G * w <= 8 decodes G entries per step:
    # TT[level, chunk] = (symbols of the non-escape lanes, escape lanes (all ones), escape
    # count or a negative number when a code names no symbol, 0)
    G = 8 // layout.itemsize
    lanebits = 8 * layout.itemsize
    TT = np.zeros((_NLEV, 256, 4), np.uint64)  # built with numpy: ~4 ms a codebook in Python loops
    ones = np.uint64((1 << lanebits) - 1)
    for level, w in enumerate(all_widths):
        if G * w > 8:
            continue
        chunk = np.arange(1 << (G * w), dtype=np.int64)
        sym, esc_lanes = TT[level, : len(chunk), 0], TT[level, : len(chunk), 1]
        n_esc = np.zeros(len(chunk), np.int64)
        bad = np.zeros(len(chunk), bool)
        for j in range(G):
            code = (chunk >> (w * j)) & ((1 << w) - 1)
            is_esc = code == ESC[level]
            named = tab[level, code]
            bad |= (named < 0) & ~is_esc
            shift = np.uint64(lanebits * j)
            sym |= np.where(is_esc | (named < 0), 0, named).astype(np.uint64) << shift
            esc_lanes |= np.where(is_esc, ones << shift, np.uint64(0))
            n_esc += is_esc
        TT[level, : len(chunk), 2] = np.where(bad, -(1 << 40), n_esc).astype(np.int64).view(np.uint64)
    TT = TT.reshape(-1).view(np.int64)
    drop = mb - keep
    lane = (1 << (lanebits - 1)) | (((1 << keep) - 1) << drop)
    lanemask = 0
    for j in range(G):
        lanemask |= lane << (lanebits * j)
    lanemask = _signed64(lanemask)
    # VALID[level]: no code of the level can name nothing (its fast loops skip the check)
    VALID = np.array([int((tab[level, : 1 << int(W[level])] >= 0).all()) if level < L else 0
                      for level in range(_NLEV)], np.int64)
    tab = tab.reshape(-1)
    for arr in (tab, W, ESC, VALID, TT):
        arr.setflags(write=False)
    return L, W, ESC, VALID, tab, TT, G, drop, lanemask


_EMPTY_U8 = np.zeros(16, np.uint8)


def tile_args(ct):
    """The arguments ``_decode_tile`` takes after ``t`` (``n .. off``, streams checked long
    enough for every read), and (patch_idx, patch_val); for callers that decode tile by tile
    (``fused``). ``ct`` holds at least one value."""
    h = ct.header
    layout = spec.LAYOUTS[h.dtype]
    n = h.numel
    sec = ct.np_sections()
    L, W, ESC, VALID, tab, TT, G, drop, lanemask = _decode_tables(
        h.dtype, h.mantissa_bits, h.widths, h.has_raw, h.symbols)
    smw = spec.sm_width(h.mantissa_bits)
    lv = [sec[f"level{i}"] for i in range(L)] + [_EMPTY_U8] * (_NLEV - L)
    # the reads of a stream stay within ((count - 1) * width >> 3) + 8 bytes
    if (len(sec["sm"]) < (((n - 1) * smw) >> 3) + 8
            or L == 0 or len(lv[0]) < (((n - 1) * int(W[0])) >> 3) + 8):
        raise FormatError("a stream is shorter than the header implies")
    off = sec["offsets"]
    if off.shape[0] != spec.n_tiles(n, h.tile) + 1 or off.shape[1] != max(L - 1, 0):
        raise FormatError(f"offsets table has shape {off.shape}")
    args = (n, h.tile, L, W, ESC, VALID, tab, TT, G, sec["sm"], smw, h.mantissa_bits, drop,
            layout.total_bits - 1, lanemask, lv[0], lv[1], lv[2], lv[3], lv[4], off)
    return args, (sec["patch_idx"], sec["patch_val"])


def decode_into(ct, out_bits: np.ndarray) -> None:
    """Write the bit patterns of ``ct`` into ``out_bits`` (1-D, the dtype's uint, >= numel)."""
    h = ct.header
    layout = spec.LAYOUTS[h.dtype]
    n = h.numel
    if (out_bits.dtype != layout.uint or out_bits.ndim != 1 or len(out_bits) < n
            or not out_bits.flags.c_contiguous or not out_bits.flags.writeable):
        raise ValueError(f"out_bits must be a writeable contiguous 1-D {np.dtype(layout.uint).name} "
                         f"array of >= {n} values")
    if n == 0:
        return
    if decode_w4.applies(h):  # one 4-bit level: no merge to do (decode_w4's docstring)
        err = decode_w4.decode_into(ct, out_bits)
    else:
        args, (pidx, pval) = tile_args(ct)
        kern = _decode_par if _parallel(spec.n_tiles(n, h.tile)) else _decode_ser
        err = kern(*args, out_bits, pidx, pval)
    if err:
        msgs = [m for bit, m in _ERRORS if err & bit]
        raise FormatError("corrupted compressed tensor: " + "; ".join(msgs))
