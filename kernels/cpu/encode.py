"""numba encoder: bit patterns in, the blob ``CompressedTensor`` holds out, byte for byte what
``reference.encode`` gives (``encode``: the sections; ``encode_blob``: the blob, its section
table and CRC-32).

The blob, as ``CompressedTensor.from_sections`` lays it out: sections ``sm`` (``1 + k`` bits a
value), ``level0`` .. (``w_l`` bits an entry), ``offsets`` (uint32, ``[tiles + 1, levels - 1]``),
``patch_idx`` (int64) and ``patch_val`` (the dtype's uint: NaNs' original bits, lossy only), in
that order, each at a ``SECTION_ALIGN`` (16) byte boundary; every packed stream ends in
``STREAM_PAD`` zero bytes and every gap is zero. Every byte is written once.

Encoding is one compiled call on one thread (``_encode_ser``; four with threads) that writes
the blob, sections in place, and its CRC-32:
  1. the exponent histogram, per tile: exponents as bytes, then, 64 at a time, an AVX-512 byte
     compare and a popcount for each of 15 exponents guessed from a sample (the rare others
     one at a time; exact whatever the guess);
  2. the plan (``plan``): codebook, code tables, tile offsets, hence every section's size
     and the blob's layout (``_layout``);
  3. per tile: the sign/mantissa bits; a level of width 1 or 2 codes 64 entries at a time (byte
     compares give the masks of its <= 3 symbols, PDEP interleaves them into 2-bit codes,
     VPCOMPRESSB packs the escaping exponents for the next level); wider levels use a bit writer;
  4. zlib's CRC-32 of the blob (``crc``), ~30 GB/s.
Without AVX-512 (VBMI2) the same bytes come from portable loops (three compares per entry, PEXT
per 8 entries; a 4-way scalar histogram; 64-bit PCLMULQDQ).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .. import spec
from .common import _NLEV, _OPTS, _parallel
from .crc import _CRC_TAB, _crc32_any
from .intrinsics import (_HAS_VBMI2, _bf16_sm_bytes32, _compress64, _eqmask64, _exp_bytes16,
                             _exp_bytes32, _fp32_sm_bytes48, _ld64, _ldel, _pdep, _pext, _popc,
                             _st16, _st32, _st64, _stel)
from .plan import _plan
from ..spec import FloatLayout


@njit(**_OPTS)
def _exponent_bytes(src, a, cnt, mb, emask, dst):
    """dst[j] = exponent of src[a + j], j < cnt."""
    j = 0
    if emask == 255:  # bf16, fp32: the byte above the mantissa is the exponent
        if src.itemsize == 2:
            while j + 32 <= cnt:
                _exp_bytes32(src, a + j, dst, j, mb)
                j += 32
        else:
            while j + 16 <= cnt:
                _exp_bytes16(src, a + j, dst, j, mb)
                j += 16
    for j in range(j, cnt):
        _stel(dst, j, (_ldel(src, a + j) >> mb) & emask)


@njit(**_OPTS)
def _hist_tile(t, bits, n, tile, mb, emask, th):
    a = t * tile
    end = min(a + tile, n)
    nsym = emask + 1
    # four interleaved sub-histograms break the store-to-load chain of repeated exponents
    h4 = np.zeros(4 * nsym, np.int32)
    i = a
    if bits.itemsize == 2:
        while i + 4 <= end:
            x = _ld64(bits, i)
            e0 = (x >> mb) & emask
            e1 = (x >> (mb + 16)) & emask
            e2 = (x >> (mb + 32)) & emask
            e3 = (x >> (mb + 48)) & emask
            _stel(h4, e0, _ldel(h4, e0) + 1)
            _stel(h4, nsym + e1, _ldel(h4, nsym + e1) + 1)
            _stel(h4, 2 * nsym + e2, _ldel(h4, 2 * nsym + e2) + 1)
            _stel(h4, 3 * nsym + e3, _ldel(h4, 3 * nsym + e3) + 1)
            i += 4
    while i + 4 <= end:
        e0 = (_ldel(bits, i) >> mb) & emask
        e1 = (_ldel(bits, i + 1) >> mb) & emask
        e2 = (_ldel(bits, i + 2) >> mb) & emask
        e3 = (_ldel(bits, i + 3) >> mb) & emask
        _stel(h4, e0, _ldel(h4, e0) + 1)
        _stel(h4, nsym + e1, _ldel(h4, nsym + e1) + 1)
        _stel(h4, 2 * nsym + e2, _ldel(h4, 2 * nsym + e2) + 1)
        _stel(h4, 3 * nsym + e3, _ldel(h4, 3 * nsym + e3) + 1)
        i += 4
    while i < end:
        e = (_ldel(bits, i) >> mb) & emask
        _stel(h4, e, _ldel(h4, e) + 1)
        i += 1
    for e in range(nsym):
        th[t, e] = h4[e] + h4[nsym + e] + h4[2 * nsym + e] + h4[3 * nsym + e]


@njit(**_OPTS)
def _round_tile(t, bits, rb, n, tile, s, signbit, inf, maxfin):
    """spec.lossy_round on one tile; returns its NaN count."""
    a = t * tile
    end = min(a + tile, n)
    half = (np.int64(1) << (s - 1)) - 1
    keepmask = ~((np.int64(1) << s) - 1)
    nn = 0
    for i in range(a, end):
        b = np.int64(bits[i])
        sign = b & signbit
        mag = b ^ sign
        if mag > inf:
            r = inf
            nn += 1
        elif mag == inf:
            r = mag
        else:
            r = (mag + half + ((mag >> s) & 1)) & keepmask
            if r > maxfin:
                r = maxfin
        rb[i] = r | sign
    return nn


@njit(**_OPTS)
def _nan_fill_tile(t, bits, n, tile, inf, signbit, start, pidx, pval):
    a = t * tile
    end = min(a + tile, n)
    c = start
    for i in range(a, end):
        b = np.int64(bits[i])
        if (b & ~signbit) > inf:
            pidx[c] = i
            pval[c] = bits[i]
            c += 1


_NGUESS = 15  # top-15 exponents: 99.97% of MiniLM's values; a rare remainder keeps the
# one-at-a-time loop short and its branch predictable


@njit(**_OPTS)
def _guess_symbols(bits, n, mb, emask):
    """``_NGUESS`` distinct exponents, the most frequent in a strided sample of <= 4096 values:
    the ones ``_hist_tile_vec`` counts by compares (a guess: it decides speed, never counts)."""
    nsym = emask + 1
    h = np.zeros(nsym, np.int64)
    step = max(n // 4096, 1)
    for i in range(0, n, step):
        e = (_ldel(bits, i) >> mb) & emask
        h[e] += 1
    keys = np.empty(nsym, np.int64)
    for e in range(nsym):
        keys[e] = (n - h[e]) * 1024 + e
    keys.sort()
    return keys[:_NGUESS] & 1023


@njit(**_OPTS)
def _hist_tile_vec(t, bits, n, tile, mb, emask, th, g):
    """``_hist_tile`` with AVX-512: the tile's exponents as bytes (vectorisable), then per 64
    values a compare and a popcount for each guessed symbol g[q]; the values that match none
    are counted one at a time."""
    a = t * tile
    end = min(a + tile, n)
    cnt = end - a
    ex = np.empty(cnt + 64, np.uint8)  # 64 bytes of slack for the vector loads
    _exponent_bytes(bits, a, cnt, mb, emask, ex)
    for e in range(emask + 1):
        th[t, e] = 0
    counts = np.zeros(_NGUESS, np.int64)
    j = 0
    while j < cnt:
        rem = cnt - j
        valid = np.int64(-1) if rem >= 64 else (np.int64(1) << rem) - 1
        rest = valid
        for q in range(_NGUESS):
            m = _eqmask64(ex, j, g[q])
            counts[q] += _popc(m & valid)
            rest &= ~m
        while rest != 0:
            e = _ldel(ex, j + _popc((rest & -rest) - 1))  # the lowest set bit's value
            th[t, e] += 1
            rest &= rest - 1
        j += 64
    for q in range(_NGUESS):
        th[t, g[q]] += counts[q]


@njit(**_OPTS)
def _round_hist_tile(t, bits, rb, n, tile, lossy, s, signbit, inf, maxfin, mb, emask, th, nanc, g):
    src = bits
    if lossy:
        nanc[t] = _round_tile(t, bits, rb, n, tile, s, signbit, inf, maxfin)
        src = rb
    if _HAS_VBMI2 and emask + 1 >= _NGUESS:  # the guesses must be distinct exponents
        _hist_tile_vec(t, src, n, tile, mb, emask, th, g)
    else:
        _hist_tile(t, src, n, tile, mb, emask, th)


@njit(parallel=True, **_OPTS)
def _round_hist_par(bits, rb, n, tile, lossy, s, signbit, inf, maxfin, mb, emask, th, nanc):
    g = _guess_symbols(bits, n, mb, emask)
    for t in prange(th.shape[0]):
        _round_hist_tile(t, bits, rb, n, tile, lossy, s, signbit, inf, maxfin, mb, emask, th, nanc, g)


@njit(**_OPTS)
def _round_hist_ser(bits, rb, n, tile, lossy, s, signbit, inf, maxfin, mb, emask, th, nanc):
    g = _guess_symbols(bits, n, mb, emask)
    for t in range(th.shape[0]):
        _round_hist_tile(t, bits, rb, n, tile, lossy, s, signbit, inf, maxfin, mb, emask, th, nanc, g)


@njit(**_OPTS)
def _flush_bits(st, pos, acc, nb):
    while nb > 0:
        _stel(st, pos, acc & 0xFF)
        pos += 1
        acc >>= 8
        nb -= 8


@njit(**_OPTS)
def _enc_tile(t, src, n, tile, L, W, CT, SYM, mb, emask, keep, drop, tbm1, smw, sm,
              L0, L1, L2, L3, L4, off):
    """Write tile t of every stream. CT[l * 256 + e] = code of exponent e at level l, plus
    1 << 16 when e escapes past level l."""
    a = t * tile
    end = min(a + tile, n)
    cnt = end - a
    streams = (L0, L1, L2, L3, L4)
    manmask = (np.int64(1) << mb) - 1
    # sign + kept mantissa
    # the byte shortcuts are for LOSSLESS bf16/fp32 only (keep == mb): fp16 with keep == 7 also
    # has 8-bit sm entries in 16-bit values, but its kept bits are man >> 3, not man & 0x7f
    if smw == 8 and tbm1 == 15 and keep == 7 and mb == 7:  # lossless bf16: one byte per value
        i = a
        while i + 32 <= end:
            _bf16_sm_bytes32(src, i, sm, i, 0)
            i += 32
        for i in range(i, end):
            b = _ldel(src, i)
            _stel(sm, i, ((b >> 8) & 0x80) | (b & 0x7F))
    else:
        i0 = a
        if smw == 24 and tbm1 == 31 and keep == 23 and mb == 23:  # lossless fp32: three bytes per value
            while i0 + 16 <= end:
                _fp32_sm_bytes48(src, i0, sm, 3 * i0, 0)
                i0 += 16
        pos = (i0 * smw) >> 3  # i0 - a is a multiple of 8: a byte boundary
        acc = np.int64(0)
        nb = 0
        for i in range(i0, end):
            b = _ldel(src, i)
            acc |= (((b >> tbm1) << keep) | ((b & manmask) >> drop)) << nb
            nb += smw
            if nb >= 32:
                _st32(sm, pos, acc)
                pos += 4
                acc >>= 32
                nb -= 32
        _flush_bits(sm, pos, acc, nb)
    if L == 0:
        return
    # every level works on the exponents (as bytes) of the values that reach it, in order;
    # it writes its codes and compacts the escaping exponents for the next level
    cnt8 = (cnt + 7) & ~7
    cur = np.empty(cnt8 + 64, np.uint8)  # 64 bytes of slack for the vector loads and stores
    nxt = np.empty(cnt8 + 64, np.uint8)
    codes = np.empty(cnt8 + 8, np.uint8)
    _exponent_bytes(src, a, cnt, mb, emask, cur)
    k = cnt
    for l in range(L):
        w = W[l]
        st = streams[l]
        pos = (a * w) >> 3 if l == 0 else np.int64(off[t, l - 1]) * w
        if w <= 2 and _HAS_VBMI2:
            c = _code_vec(cur, k, SYM[3 * l], SYM[3 * l + 1], SYM[3 * l + 2], w, st, pos, nxt)
        elif w <= 2:
            c = _code_cmp(cur, k, SYM[3 * l], SYM[3 * l + 1], SYM[3 * l + 2], w, st, pos, codes, nxt)
        else:
            # the bit writer leaves the unused tail of the tile's last group unwritten
            for b in range(pos, pos + ((k + 7) >> 3) * w):
                _stel(st, b, 0)
            c = 0
            row = l * 256
            acc = np.int64(0)
            nb = 0
            for j in range(k):
                e = _ldel(cur, j)
                tt = _ldel(CT, row + e)
                acc |= (tt & 0xFFFF) << nb
                nb += w
                if nb >= 32:
                    _st32(st, pos, acc)
                    pos += 4
                    acc >>= 32
                    nb -= 32
                _stel(nxt, c, e)
                c += tt >> 16
            _flush_bits(st, pos, acc, nb)
        cur, nxt = nxt, cur
        k = c


@njit(**_OPTS)
def _code_cmp(ex, k, s0, s1, s2, w, st, pos, codes, nxt):
    """A level of width 1 or 2 (at most three symbols): (a) per entry, vectorisable: its code
    from three compares; (b) per 8 entries: PEXT packs the codes into w bytes at ``pos`` and the
    escaping exponents into consecutive bytes of ``nxt``. Returns the number of escapes."""
    for j in range(k):
        e = _ldel(ex, j)
        _stel(codes, j, 3 ^ (np.int64(e == s0) * 3) ^ (np.int64(e == s1) * 2) ^ np.int64(e == s2))
    k8 = (k + 7) & ~7
    for j in range(k, k8):
        _stel(codes, j, 0)  # the tile's padding entries are zero codes
    c = np.int64(0)
    if w == 2:
        for g in range(k8 >> 3):
            x = _ld64(codes, 8 * g)
            _st16(st, pos + 2 * g, _pext(x, 0x0303030303030303))
            m = x & (x >> 1) & 0x0101010101010101
            _st64(nxt, c, _pext(_ld64(ex, 8 * g), m * 0xFF))
            c += _popc(m)
    else:
        for g in range(k8 >> 3):
            m = _ld64(codes, 8 * g) & 0x0101010101010101
            _stel(st, pos + g, _pext(m, 0x0101010101010101))
            _st64(nxt, c, _pext(_ld64(ex, 8 * g), m * 0xFF))
            c += _popc(m)
    return c


@njit(**_OPTS)
def _code_vec(ex, k, s0, s1, s2, w, st, pos, nxt):
    """``_code_cmp``, 64 entries at a time (AVX-512). Byte compares give the masks k0, k1, k2 of
    the entries that are symbol 0, 1, 2 (0x100: no symbol, never equal). A code's bit 0 is set
    unless the entry is symbol 0 or 2, bit 1 unless it is symbol 0 or 1, so both are set for an
    escape; PDEP interleaves the two masks into 2-bit codes (w == 1: bit 0 is the code).
    VPCOMPRESSB packs the escaping exponents. ``ex`` and ``nxt`` need 64 bytes of slack."""
    c = np.int64(0)
    j = 0
    while j < k:
        rem = k - j
        valid = np.int64(-1) if rem >= 64 else (np.int64(1) << rem) - 1
        k0 = _eqmask64(ex, j, s0) if s0 < 256 else np.int64(0)
        if w == 2:
            k1 = _eqmask64(ex, j, s1) if s1 < 256 else np.int64(0)
            k2 = _eqmask64(ex, j, s2) if s2 < 256 else np.int64(0)
            b0 = ~(k0 | k2) & valid
            b1 = ~(k0 | k1) & valid
            lo = _pdep(b0 & 0xFFFFFFFF, 0x5555555555555555) | _pdep(b1 & 0xFFFFFFFF, -0x5555555555555556)
            hi = (_pdep((b0 >> 32) & 0xFFFFFFFF, 0x5555555555555555)
                  | _pdep((b1 >> 32) & 0xFFFFFFFF, -0x5555555555555556))
            esc = b0 & b1
            q = pos + (j >> 2)
            if rem >= 64:
                _st64(st, q, lo)
                _st64(st, q + 8, hi)
            else:  # the tile's last groups: 2 bytes per 8 entries, nothing past them
                for b in range(((rem + 7) >> 3) * 2):
                    _stel(st, q + b, (lo >> (8 * b)) if b < 8 else (hi >> (8 * (b - 8))))
        else:
            esc = ~k0 & valid
            q = pos + (j >> 3)
            if rem >= 64:
                _st64(st, q, esc)
            else:
                for b in range((rem + 7) >> 3):
                    _stel(st, q + b, esc >> (8 * b))
        _compress64(ex, j, esc, nxt, c)
        c += _popc(esc)
        j += 64
    return c


def _align(x: int) -> int:
    a = spec.SECTION_ALIGN
    return (x + a - 1) // a * a


def encode(bits: np.ndarray, layout: FloatLayout, keep: int, tile: int = spec.DEFAULT_TILE,
           widths: tuple | None = None):
    """Encode 1-D integer bit patterns. Returns (widths, has_raw, symbols, sections), byte for
    byte what ``reference.encode`` returns (the sections are views into one blob)."""
    widths, has_raw, symbols, blob, table, _ = encode_blob(bits, layout, keep, tile, widths)
    sections = {}
    for name, (off, nb, rows, cols) in table.items():
        dt = (np.uint32 if name == "offsets" else np.int64 if name == "patch_idx"
              else layout.uint if name == "patch_val" else np.uint8)
        arr = blob[off:off + nb].view(dt)
        sections[name] = arr.reshape(rows, cols) if name == "offsets" else arr
    return widths, has_raw, symbols, sections


@njit(**_OPTS)
def _al(x):
    return (x + spec.SECTION_ALIGN - 1) // spec.SECTION_ALIGN * spec.SECTION_ALIGN


@njit(**_OPTS)
def _layout(bits, th, nanc, tile, lossy, signbit, inf, exp_bits, smw, forced):
    """Between the histogram and the stream writes: the plan, the blob's layout (the one
    CompressedTensor.from_sections gives these sections, each 16-byte aligned), its zero
    padding, the offsets and the NaN patches. Returns (widths, has_raw, symbols, W, CT, SYM,
    off, blob, table); table row i = (byte offset, nbytes, rows, cols) of section i in the
    order sm, level0.., offsets, patch_idx, patch_val."""
    n = len(bits)
    tiles = th.shape[0]
    widths, has_raw, symbols, L, W, CT, SYM, off, sizes = _plan(
        th, n, tile, exp_bits, spec.MAX_LEVELS, spec.MAX_WIDTH, forced)
    nan_total = nanc.sum() if lossy else 0
    table = np.zeros((L + 4, 4), np.int64)
    table[0, 1] = (n * smw + 7) // 8 + spec.STREAM_PAD
    for l in range(L):
        table[1 + l, 1] = sizes[l]
    table[L + 1, 1] = off.size * 4
    table[L + 1, 2] = off.shape[0]
    table[L + 1, 3] = off.shape[1]
    table[L + 2, 1] = 8 * nan_total
    table[L + 3, 1] = bits.itemsize * nan_total
    pos = 0
    for i in range(L + 4):
        table[i, 0] = pos
        pos = _al(pos + table[i, 1])
    blob = np.empty(pos, np.uint8)
    # zero what no kernel writes: the STREAM_PAD tail of sm and of every level, alignment gaps
    for i in range(L + 4):
        o, nb = table[i, 0], table[i, 1]
        for j in range(o + nb - (spec.STREAM_PAD if i <= L else 0), _al(o + nb)):
            blob[j] = 0
    o = table[L + 1, 0]
    for r in range(off.shape[0]):
        for c in range(off.shape[1]):
            _st32(blob, o + 4 * (r * off.shape[1] + c), np.int64(off[r, c]))
    if nan_total:
        nstart = np.zeros(tiles + 1, np.int64)
        for t in range(tiles):
            nstart[t + 1] = nstart[t] + nanc[t]
        pidx = np.empty(nan_total, np.int64)
        pval = np.empty_like(bits[:nan_total])
        for t in range(tiles):
            if nanc[t]:
                _nan_fill_tile(t, bits, n, tile, inf, signbit, nstart[t], pidx, pval)
        oi, ov = table[L + 2, 0], table[L + 3, 0]
        for p in range(nan_total):
            _st64(blob, oi + 8 * p, pidx[p])
            v = np.int64(pval[p])
            for byte in range(bits.itemsize):
                blob[ov + bits.itemsize * p + byte] = (v >> (8 * byte)) & 0xFF
    return widths, has_raw, symbols, W, CT, SYM, off, blob, table


@njit(**_OPTS)
def _level(blob, table, l):
    """The stream of level l, a view into the blob (empty if there is no such level)."""
    if l >= table.shape[0] - 4:
        return blob[:0]
    return blob[table[1 + l, 0]:table[1 + l, 0] + table[1 + l, 1]]


@njit(**_OPTS)
def _streams_ser(src, tile, W, CT, SYM, mb, emask, keep, smw, off, blob, table):
    n = len(src)
    L = table.shape[0] - 4
    if L == 0:
        return
    sm = blob[table[0, 0]:table[0, 0] + table[0, 1]]
    lv0, lv1, lv2 = _level(blob, table, 0), _level(blob, table, 1), _level(blob, table, 2)
    lv3, lv4 = _level(blob, table, 3), _level(blob, table, 4)
    for t in range((n + tile - 1) // tile):
        _enc_tile(t, src, n, tile, L, W, CT, SYM, mb, emask, keep, mb - keep, src.itemsize * 8 - 1,
                  smw, sm, lv0, lv1, lv2, lv3, lv4, off)


@njit(parallel=True, **_OPTS)
def _streams_par(src, tile, W, CT, SYM, mb, emask, keep, smw, off, blob, table):
    n = len(src)
    L = table.shape[0] - 4
    if L == 0:
        return
    sm = blob[table[0, 0]:table[0, 0] + table[0, 1]]
    lv0, lv1, lv2 = _level(blob, table, 0), _level(blob, table, 1), _level(blob, table, 2)
    lv3, lv4 = _level(blob, table, 3), _level(blob, table, 4)
    for t in prange((n + tile - 1) // tile):
        _enc_tile(t, src, n, tile, L, W, CT, SYM, mb, emask, keep, mb - keep, src.itemsize * 8 - 1,
                  smw, sm, lv0, lv1, lv2, lv3, lv4, off)


@njit(**_OPTS)
def _encode_ser(bits, rb, tile, lossy, s, signbit, inf, maxfin, mb, emask, exp_bits, keep, smw, crctab, forced):
    """The whole one-thread encode in one compiled call: histogram, layout, streams, CRC-32.
    (Only serial callees: a cached function that calls a parallel one can crash when loaded
    from numba's cache, numba issues #4807 and #8578; the parallel encode goes through Python.)"""
    n = len(bits)
    th = np.empty(((n + tile - 1) // tile, emask + 1), np.int32)  # every row written below
    nanc = np.zeros(th.shape[0], np.int64)
    if n:
        _round_hist_ser(bits, rb, n, tile, lossy, s, signbit, inf, maxfin, mb, emask, th, nanc)
    widths, has_raw, symbols, W, CT, SYM, off, blob, table = _layout(
        bits, th, nanc, tile, lossy, signbit, inf, exp_bits, smw, forced)
    _streams_ser(rb if lossy else bits, tile, W, CT, SYM, mb, emask, keep, smw, off, blob, table)
    return widths, has_raw, symbols, blob, table, _crc32_any(blob, 0, crctab)


def encode_blob(bits: np.ndarray, layout: FloatLayout, keep: int, tile: int = spec.DEFAULT_TILE,
                widths: tuple | None = None):
    """``encode``, written straight into the blob that ``CompressedTensor.from_sections`` would
    build from its sections: (widths, has_raw, symbols, blob, table, crc32), table[name] =
    (byte offset, nbytes, rows, cols). Every byte of the blob is written once; padding is zero.
    ``widths``: the coded levels to use instead of the planner's (``spec.forced_cascade``)."""
    # forced[0]: 1 to use the widths forced[1:] (none: every exponent raw), 0 for the planner's
    forced = np.asarray((1, *spec.check_widths(widths, layout.exp_bits)) if widths is not None else (0,), np.int64)
    bits = np.ascontiguousarray(bits, dtype=layout.uint).reshape(-1)
    n = len(bits)
    s = layout.man_bits - keep
    lossy = s > 0
    rb = np.empty_like(bits) if lossy else bits  # the rounded values (lossy)
    signbit, inf, maxfin = 1 << (layout.total_bits - 1), layout.inf_bits, layout.inf_bits - (1 << s)
    mb, emask, smw = layout.man_bits, layout.exp_mask, spec.sm_width(keep)
    tiles = spec.n_tiles(n, tile)
    if not _parallel(tiles):
        widths, has_raw, symbols, blob, tab, crc = _encode_ser(
            bits, rb, tile, lossy, s, signbit, inf, maxfin, mb, emask, layout.exp_bits, keep, smw, _CRC_TAB, forced)
    else:
        th = np.empty((tiles, emask + 1), np.int32)
        nanc = np.zeros(tiles, np.int64)
        _round_hist_par(bits, rb, n, tile, lossy, s, signbit, inf, maxfin, mb, emask, th, nanc)
        widths, has_raw, symbols, W, CT, SYM, off, blob, tab = _layout(
            bits, th, nanc, tile, lossy, signbit, inf, layout.exp_bits, smw, forced)
        _streams_par(rb, tile, W, CT, SYM, mb, emask, keep, smw, off, blob, tab)
        crc = _crc32_any(blob, 0, _CRC_TAB)
    rows = tab.tolist()
    names = ["sm"] + _LEVEL_NAMES[:len(rows) - 4] + ["offsets", "patch_idx", "patch_val"]
    table = {name: tuple(row) for name, row in zip(names, rows)}
    return tuple(widths.tolist()), bool(has_raw), symbols.astype(np.uint8), blob, table, int(crc)


_LEVEL_NAMES = [f"level{level}" for level in range(_NLEV)]
