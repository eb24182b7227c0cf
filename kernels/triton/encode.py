"""Triton encode: tile histograms, the host's cascade choice, scatter of codes into slots and
byte packing; sections byte-identical to ``reference.encode``. The steps are in
``nzrt.kernels.triton``'s docstring."""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .. import spec
from ..reference import code_tables
from .common import _INT_DTYPES, ENCODE_BLOCK, PACK_BLOCK, _check_device

# ---- encode ---------------------------------------------------------------------------------

@triton.jit
def _load_rounded(bits_ptr, idx, mask, KEEP: tl.constexpr, MAN: tl.constexpr,
                  TOTAL: tl.constexpr, INF: tl.constexpr):
    """Bit patterns (int32; 16-bit ones zero-extended) rounded to KEEP mantissa bits, nearest
    even, exactly as ``spec.lossy_round`` (finite values saturate below inf; NaN -> inf)."""
    x = tl.load(bits_ptr + idx, mask=mask, other=0).to(tl.int32)
    if TOTAL == 16:
        x = x & 0xFFFF
    if KEEP < MAN:
        if TOTAL == 32:
            sign = x & -2147483648  # the int32 sign bit
        else:
            sign = x & (1 << (TOTAL - 1))
        mag = x & ((1 << (TOTAL - 1)) - 1)
        is_nan = mag > INF
        is_inf = mag == INF
        lsb = (mag >> (MAN - KEEP)) & 1
        rounded = (mag + ((1 << (MAN - KEEP - 1)) - 1) + lsb) & ~((1 << (MAN - KEEP)) - 1)
        rounded = tl.where(~is_nan & ~is_inf & (rounded > INF - (1 << (MAN - KEEP))),
                           INF - (1 << (MAN - KEEP)), rounded)
        rounded = tl.where(is_inf, mag, rounded)
        rounded = tl.where(is_nan, INF, rounded)
        x = rounded | sign
    return x


@triton.jit
def _hist_kernel(bits_ptr, hist_ptr, n, tile,
                 KEEP: tl.constexpr, MAN: tl.constexpr, TOTAL: tl.constexpr, INF: tl.constexpr,
                 NBINS: tl.constexpr, BLOCK: tl.constexpr):
    """hist[t, e] = how many values of tile t have (rounded) exponent e."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.zeros([NBINS], dtype=tl.int32)
    for start in range(0, tile, BLOCK):
        local = start + tl.arange(0, BLOCK)
        idx = t * tile + local.to(tl.int64)
        mask = (local < tile) & (idx < n)
        x = _load_rounded(bits_ptr, idx, mask, KEEP, MAN, TOTAL, INF)
        e = (x >> MAN) & (NBINS - 1)
        h += tl.histogram(e, NBINS, mask=mask)
    tl.store(hist_ptr + t * NBINS + tl.arange(0, NBINS), h)


@triton.jit
def _scatter_level(ent_ptr, base, count, lvl, code, mask, LEVEL: tl.constexpr, W: tl.constexpr):
    reach = mask & (lvl >= LEVEL)
    r = reach.to(tl.int32)
    slot = base + (count + tl.cumsum(r, axis=0) - r).to(tl.int64)
    v = tl.where(lvl == LEVEL, code, (1 << W) - 1)
    tl.store(ent_ptr + slot, v.to(tl.uint8), mask=reach)
    return count + tl.sum(r, axis=0)


@triton.jit
def _scatter_kernel(bits_ptr, lut_ptr, starts_ptr, sm_ptr, e0_ptr, e1_ptr, e2_ptr, e3_ptr, e4_ptr,
                    n, tile,
                    W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, W3: tl.constexpr,
                    W4: tl.constexpr, N_LEVELS: tl.constexpr,
                    KEEP: tl.constexpr, MAN: tl.constexpr, TOTAL: tl.constexpr, INF: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Per tile: sm fields and level codes, one entry per slot (entry arrays start zeroed)."""
    t = tl.program_id(0).to(tl.int64)
    zero = (tl.program_id(0) * 0).to(tl.int32)
    row = starts_ptr + t * (N_LEVELS - 1)
    b1 = zero.to(tl.int64)
    b2 = b1
    b3 = b1
    b4 = b1
    if N_LEVELS > 1:
        b1 = tl.load(row) * 8
    if N_LEVELS > 2:
        b2 = tl.load(row + 1) * 8
    if N_LEVELS > 3:
        b3 = tl.load(row + 2) * 8
    if N_LEVELS > 4:
        b4 = tl.load(row + 3) * 8
    c1 = zero
    c2 = zero
    c3 = zero
    c4 = zero
    for start in range(0, tile, BLOCK):
        local = start + tl.arange(0, BLOCK)
        idx = t * tile + local.to(tl.int64)
        mask = (local < tile) & (idx < n)
        x = _load_rounded(bits_ptr, idx, mask, KEEP, MAN, TOTAL, INF)
        sign = (x >> (TOTAL - 1)) & 1
        sm = (sign << KEEP) | ((x & ((1 << MAN) - 1)) >> (MAN - KEEP))
        tl.store(sm_ptr + idx, sm, mask=mask)
        e = (x >> MAN) & ((INF >> MAN))
        lc = tl.load(lut_ptr + e, mask=mask, other=0)
        lvl = lc & 0xFF
        code = lc >> 8
        v0 = tl.where(lvl == 0, code, (1 << W0) - 1)
        tl.store(e0_ptr + idx, v0.to(tl.uint8), mask=mask)
        if N_LEVELS > 1:
            c1 = _scatter_level(e1_ptr, b1, c1, lvl, code, mask, 1, W1)
        if N_LEVELS > 2:
            c2 = _scatter_level(e2_ptr, b2, c2, lvl, code, mask, 2, W2)
        if N_LEVELS > 3:
            c3 = _scatter_level(e3_ptr, b3, c3, lvl, code, mask, 3, W3)
        if N_LEVELS > 4:
            c4 = _scatter_level(e4_ptr, b4, c4, lvl, code, mask, 4, W4)


@triton.jit
def _pack_kernel(ent_ptr, out_ptr, n_ent, n_bytes, W: tl.constexpr, BLOCK: tl.constexpr):
    """out byte k = the bits 8k..8k+7 of the W-bit entries laid end to end (little-endian)."""
    k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = k < n_bytes
    bit0 = k * 8
    e0 = bit0 // W
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for j in tl.static_range((8 + W - 1) // W + 1):
        e = e0 + j
        sh = (e * W - bit0).to(tl.int32)
        ok = m & (e < n_ent) & (sh < 8)
        v = tl.load(ent_ptr + e, mask=ok, other=0).to(tl.int32)
        sl = tl.where(sh > 0, sh, 0)
        sr = tl.where(sh < 0, -sh, 0)
        acc = acc | ((v >> sr) << sl)
    tl.store(out_ptr + k, (acc & 0xFF).to(tl.uint8), mask=m)


# ---- encode ---------------------------------------------------------------------------------

def _pack(entries: torch.Tensor, n_ent: int, width: int) -> torch.Tensor:
    out = torch.zeros(spec.packed_nbytes(n_ent, width), dtype=torch.uint8, device=entries.device)
    n_bytes = (n_ent * width + 7) // 8
    if n_bytes:
        _pack_kernel[(triton.cdiv(n_bytes, PACK_BLOCK),)](entries, out, n_ent, n_bytes,
                                                          W=width, BLOCK=PACK_BLOCK)
    return out


def encode(bits, layout: spec.FloatLayout, keep: int, tile: int = spec.DEFAULT_TILE, *,
           widths: tuple | None = None):
    """Encode 1-D integer bit patterns (torch int16/int32 on any device the kernels run on, or a
    numpy array of the layout's uint). Returns (widths, has_raw, symbols, sections) equal to
    ``reference.encode``'s; sections are numpy arrays on the CPU.

    ``widths`` overrides the planner's cascade (for measuring the bits / decode-speed trade-off;
    a raw level is added when the coded levels cannot name every exponent present). The result
    is a valid stream that every decoder reads, but no longer the reference's bytes."""
    if isinstance(bits, np.ndarray):
        bits = torch.from_numpy(np.ascontiguousarray(bits, dtype=layout.uint).view(
            np.int16 if layout.itemsize == 2 else np.int32))
    want = _INT_DTYPES[layout.itemsize]
    if bits.dtype != want:
        bits = bits.view(want) if bits.element_size() == layout.itemsize else bits.to(want)
    bits = bits.contiguous().reshape(-1)
    device = bits.device
    _check_device(device)
    n = bits.numel()
    E, M, TOTAL = layout.exp_bits, layout.man_bits, layout.total_bits
    INF = layout.inf_bits
    consts = dict(KEEP=keep, MAN=M, TOTAL=TOTAL, INF=INF)
    sm_w = spec.sm_width(keep)
    tiles = spec.n_tiles(n, tile)
    blk = max(16, min(triton.next_power_of_2(tile), ENCODE_BLOCK))

    # NaN patches (lossy mode only): exact original bits
    if keep < M and n:
        mag = (bits.to(torch.int32) if TOTAL == 16 else bits) & ((1 << (TOTAL - 1)) - 1)
        patch_idx_t = torch.nonzero(mag > INF).reshape(-1)
        del mag
        patch_idx = patch_idx_t.cpu().numpy().astype(np.int64)
        patch_val = bits[patch_idx_t].cpu().numpy().view(layout.uint).copy()
    else:
        patch_idx = np.zeros(0, np.int64)
        patch_val = np.zeros(0, layout.uint)

    if n == 0:
        sections = {"sm": np.zeros(spec.packed_nbytes(0, sm_w), np.uint8),
                    "offsets": np.zeros((1, 0), np.uint32),
                    "patch_idx": patch_idx, "patch_val": patch_val}
        return (), False, np.zeros(0, np.uint8), sections

    # 1. per-tile exponent histograms
    nbins = 1 << E
    tile_hist = torch.empty((tiles, nbins), dtype=torch.int32, device=device)
    _hist_kernel[(tiles,)](bits, tile_hist, n, tile, **consts, NBINS=nbins, BLOCK=blk)
    hist = tile_hist.sum(0).cpu().numpy().astype(np.int64)  # sync 1

    # 2. plan on the host; per-tile level counts and offsets on the device
    if widths is None:
        widths, has_raw = spec.choose_cascade(hist, E, tile)
    else:
        widths, has_raw = spec.forced_cascade(hist, widths, E)
    symbols = spec.symbol_order(hist)[: sum((1 << w) - 1 for w in widths)]
    level_of, code_of = code_tables(symbols, widths, has_raw, E)
    all_w = spec.level_widths(widths, has_raw, E)
    L = len(all_w)
    lut = torch.from_numpy((level_of | (code_of << 8)).astype(np.int32)).to(device)
    if L > 1:
        ge = torch.from_numpy((level_of[:, None] >= np.arange(1, L)[None, :]).astype(np.float64))
        counts = (tile_hist.to(torch.float64) @ ge.to(device)).round().to(torch.int64)
        starts = torch.zeros((tiles + 1, L - 1), dtype=torch.int64, device=device)
        starts[1:] = torch.cumsum((counts + 7) // 8, dim=0)
        totals = [0] + (starts[-1] * 8).cpu().tolist()  # sync 2
    else:
        starts = torch.zeros((tiles + 1, 1), dtype=torch.int64, device=device)
        totals = [0]
    # level 0 holds every value; its tiles (all full but the last; tile % 8 == 0) are padded to
    # groups of 8 like any level's, so its stream has ceil8(n) entries
    totals[0] = (n + 7) // 8 * 8

    # 3. scatter sm fields and codes to one-entry-per-slot arrays
    sm_ent = torch.empty(n, dtype=torch.int32, device=device)
    ents = [torch.zeros(max(int(c), 1), dtype=torch.uint8, device=device) for c in totals]
    ents_p = ents + [ents[0]] * (5 - L)
    wp = list(all_w) + [1] * (5 - L)
    _scatter_kernel[(tiles,)](bits, lut, starts, sm_ent, *ents_p, n, tile,
                              W0=wp[0], W1=wp[1], W2=wp[2], W3=wp[3], W4=wp[4], N_LEVELS=L,
                              **consts, BLOCK=blk)

    # 4. pack
    sections = {"sm": _pack(sm_ent, n, sm_w).cpu().numpy()}
    for level, w in enumerate(all_w):
        sections[f"level{level}"] = _pack(ents[level], int(totals[level]), w).cpu().numpy()
    sections["offsets"] = (starts.cpu().numpy().astype(np.uint32) if L > 1
                           else np.zeros((tiles + 1, 0), np.uint32))
    sections["patch_idx"] = patch_idx
    sections["patch_val"] = patch_val
    return tuple(int(w) for w in widths), bool(has_raw), symbols.astype(np.uint8), sections
