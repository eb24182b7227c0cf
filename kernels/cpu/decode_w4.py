"""numba decoder for the 4-bit window code (``codec.WINDOW4``) of lossless bf16: what
``decode.decode_into`` runs for such a tensor, bits identical to ``reference.decode``.

The general decoder merges levels one entry at a time for a one-level code (it is built for the
cascade's narrow levels): ~0.4 G values/s on two cores, where the cascade decodes at ~3.2, so a
prompt read from a ``nzrt compress --fused`` file decoded 8x slower than from the default file.
The window code needs no merge: per value, in spec's terms (the layout ``cpu.fused_w4`` states),
  * ``sm[i]``: uint8, ``sign << 7 | mantissa`` (lossless bf16: 8 bits a value);
  * ``level0[i >> 1]``: two 4-bit codes a byte, value i in the low nibble when i is even; codes
    below ``ncode`` (at most 15) name ``symbols[code]``, code 15 escapes (only with a raw level);
  * ``level1`` (the raw level): the escapes' exponent bytes in value order, tile t's from byte
    ``offsets[t, 0] * 8``, padded to whole groups of 8;
so bf16 bits = ``(sm & 0x80) << 8 | exponent << 7 | sm & 0x7f``. A tile whose escapes do not fill
exactly its groups, or a code that names nothing, is an error flag (``common.ERR_*``), as in the
general decoder; lossless bf16 has no patches, and any there are still go through ``patches._finish``.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .. import spec
from .common import _OPTS, ERR_CODE, ERR_ESCAPES, ERR_OFFSETS, _parallel
from .patches import _finish


def applies(header) -> bool:
    """Whether ``decode_into`` takes this path: lossless bf16 in the ``WINDOW4`` code."""
    return header.dtype == "bfloat16" and header.mantissa_bits == 7 and tuple(header.widths) == spec.WINDOW4


@njit(**_OPTS)
def _tile(t, n, tile, sm, L0, raw, off, has_raw, sym, ncode, out):
    """Tile ``t``: a branch-free pass that writes every value as if its code named a symbol
    (``tab[code]``: the exponent in place, 0 for codes that name none) and counts the others;
    then, only where there were any, a second pass puts the escapes' raw exponents in and
    checks every code and the tile's raw groups."""
    a = t * tile
    b = min(n, a + tile)
    tab = np.zeros(16, np.uint16)          # code -> the exponent in place (0: names none)
    for c in range(ncode):
        tab[c] = np.uint16(sym[c] << 7)
    hs = np.empty(256, np.uint16)          # sign/mantissa byte -> its bits in place
    for v in range(256):
        hs[v] = np.uint16(((v & 0x80) << 8) | (v & 0x7f))
    others = 0
    for m in range(a >> 1, b >> 1):        # a is even (tiles are whole 64-value groups)
        byte = L0[m]
        c0 = byte & 15
        c1 = byte >> 4
        out[2 * m] = hs[sm[2 * m]] | tab[c0]
        out[2 * m + 1] = hs[sm[2 * m + 1]] | tab[c1]
        others += (c0 >= ncode) + (c1 >= ncode)
    if b & 1:                              # an odd last value (the tensor's, in its last tile)
        c0 = L0[b >> 1] & 15
        out[b - 1] = hs[sm[b - 1]] | tab[c0]
        others += c0 >= ncode
    rp = 0
    rend = 0
    if has_raw:
        rp = np.int64(off[t, 0]) * 8
        rend = np.int64(off[t + 1, 0]) * 8
        if rend < rp or rend > len(raw):
            return ERR_OFFSETS
    start = rp
    if others:
        for i in range(a, b):
            code = (np.int64(L0[i >> 1]) >> ((i & 1) << 2)) & 15
            if code < ncode:
                continue
            if code != 15 or not has_raw:
                return ERR_CODE
            if rp >= rend:
                return ERR_ESCAPES
            out[i] |= np.uint16(np.int64(raw[rp]) << 7)
            rp += 1
    if has_raw and (rp - start + 7) // 8 != (rend - start) // 8:
        return ERR_ESCAPES
    return 0


@njit(parallel=True, **_OPTS)
def _decode_par(n, tile, sm, L0, raw, off, has_raw, sym, ncode, out, pidx, pval):
    e_esc = 0
    e_code = 0
    e_off = 0
    for t in prange((n + tile - 1) // tile):
        f = _tile(t, n, tile, sm, L0, raw, off, has_raw, sym, ncode, out)
        e_esc += f == ERR_ESCAPES
        e_code += f == ERR_CODE
        e_off += f == ERR_OFFSETS
    return _finish(n, out, pidx, pval, e_esc, e_code, e_off)


@njit(**_OPTS)
def _decode_ser(n, tile, sm, L0, raw, off, has_raw, sym, ncode, out, pidx, pval):
    e_esc = 0
    e_code = 0
    e_off = 0
    for t in range((n + tile - 1) // tile):
        f = _tile(t, n, tile, sm, L0, raw, off, has_raw, sym, ncode, out)
        e_esc += f == ERR_ESCAPES
        e_code += f == ERR_CODE
        e_off += f == ERR_OFFSETS
    return _finish(n, out, pidx, pval, e_esc, e_code, e_off)


def decode_into(ct, out_bits: np.ndarray) -> int:
    """``ct``'s bf16 bit patterns into ``out_bits`` (checked by the caller: uint16, 1-D, >= numel,
    ``n`` > 0); returns the error flags. Every stream is checked long enough first."""
    h = ct.header
    n = h.numel
    sec = ct.np_sections()
    sm, L0 = sec["sm"], sec["level0"]
    raw = sec["level1"] if h.has_raw else np.zeros(0, np.uint8)
    off = sec["offsets"]
    tiles = spec.n_tiles(n, h.tile)
    if len(sm) < n or len(L0) < (n + 1) // 2 or off.shape[0] != tiles + 1 or \
            (h.has_raw and off.shape[1] < 1):
        return ERR_OFFSETS
    if not h.has_raw:
        off = np.zeros((tiles + 1, 1), np.uint32)
    sym = np.asarray([int(v) for v in h.symbols][:15] or [0], np.uint16)
    ncode = min(len(h.symbols), 15)
    kern = _decode_par if _parallel(tiles) else _decode_ser
    return int(kern(n, h.tile, sm, L0, raw, off, bool(h.has_raw), sym, ncode, out_bits,
                    sec["patch_idx"], sec["patch_val"]))
