"""Triton decode: the kernels (one program per tile; ``decode_many``: one launch per header
signature for a block's tensors) and their launchers. The bit layout and the design are in
``nzrt.kernels.triton``'s docstring."""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .. import spec
from .common import (_INT_DTYPES, _RAW_BASE, DECODE_BLOCK, DECODE_WARPS, META_COLS, RAW_BASE,
                     SYM_TABLE, _check_device, _LRU, _to_device)

# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------

@triton.constexpr_function
def _span_bytes(w):
    """Bytes a ``w``-bit entry can touch: it starts at a bit offset that is a multiple of gcd(w, 8)."""
    g = 8 if w % 8 == 0 else 4 if w % 4 == 0 else 2 if w % 2 == 0 else 1
    return (w + 8 - g + 7) // 8


@triton.jit
def _read_bits(ptr, entry, valid, W: tl.constexpr, FIXED: tl.constexpr = False):
    """Entries ``entry`` (int32, relative to ``ptr``) of a ``W``-bit little-endian stream.

    ``ptr`` is a byte pointer to the stream's first byte (the tile's first byte; tiles start on
    byte boundaries). Loads only the bytes an entry of this width can touch."""
    NB: tl.constexpr = _span_bytes(W)
    if valid is None:
        other = None
    else:
        other = 0
    if FIXED and (W == 1 or W == 2 or W == 4):
        # fixed-position stream whose 8 consecutive entries fill one aligned 1/2/4-byte word
        # (``entry`` counts from a multiple of 8, ``ptr`` is aligned to W bytes): one load per
        # 8 values (the same address for all 8, which the compiler merges), then shifts
        if W == 1:
            wptr = ptr
        elif W == 2:
            wptr = ptr.to(tl.pointer_type(tl.int16))
        else:
            wptr = ptr.to(tl.pointer_type(tl.int32))
        word = tl.load(wptr + (entry >> 3), mask=valid, other=other).to(tl.int32)
        return (word >> ((entry & 7) * W)) & ((1 << W) - 1)
    elif W % 8 == 0:  # byte aligned: no shift, no mask
        byte = entry * (W // 8)
        v = tl.load(ptr + byte, mask=valid, other=other).to(tl.int32)
        if NB > 1:
            v = v | (tl.load(ptr + byte + 1, mask=valid, other=other).to(tl.int32) << 8)
        if NB > 2:
            v = v | (tl.load(ptr + byte + 2, mask=valid, other=other).to(tl.int32) << 16)
        return v
    else:
        bit = entry * W
        byte = bit >> 3
        v = tl.load(ptr + byte, mask=valid, other=other).to(tl.int32)
        if NB > 1:
            v = v | (tl.load(ptr + byte + 1, mask=valid, other=other).to(tl.int32) << 8)
        if NB > 2:
            v = v | (tl.load(ptr + byte + 2, mask=valid, other=other).to(tl.int32) << 16)
        if NB > 3:
            v = v | (tl.load(ptr + byte + 3, mask=valid, other=other).to(tl.int32) << 24)
        return (v >> (bit & 7)) & ((1 << W) - 1)


@triton.jit
def _level_step(stream_ptr, count, esc, val, W: tl.constexpr, FIRST: tl.constexpr,
                LAST: tl.constexpr, SKIP: tl.constexpr = True):
    """Resolve one deeper level for the values in ``esc`` (those that escaped the level above).

    ``stream_ptr`` points at this tile's first entry of the level; ``count`` is how many of the
    tile's values reached the level in earlier sub-blocks. ``val`` becomes the table index
    ``FIRST + code`` (the raw level's FIRST is ``RAW_BASE``: its codes are exponents).
    Deep levels are sparse (for weights ~N(0, 0.02): 27%, 4%, 0.7%, <0.01% of values reach
    levels 1..4), so past level 1 (``SKIP``) a sub-block none of whose values reached the level
    skips it (a uniform branch)."""
    r = esc
    if SKIP:
        k = tl.sum(r, axis=0)
        if k > 0:
            val, esc = _level_codes(stream_ptr, count, r, val, W, FIRST, LAST)
    else:  # level 1: reached by ~a quarter of the values, never worth a branch
        k = tl.sum(r, axis=0)
        val, esc = _level_codes(stream_ptr, count, r, val, W, FIRST, LAST)
    return count + k, esc, val


@triton.jit
def _level_codes(stream_ptr, count, r, val, W: tl.constexpr, FIRST: tl.constexpr,
                 LAST: tl.constexpr):
    # exclusive prefix count in value order = inclusive count - 1 for the escaped values;
    # other lanes read some in-range entry (>= 0, < count + k) and ignore it: no mask
    slot = tl.maximum(tl.cumsum(r, axis=0) + (count - 1), 0)
    code = _read_bits(stream_ptr, slot, None, W)
    val = tl.where(r != 0, code + FIRST, val)
    esc = r
    if not LAST:
        esc = tl.where(code == (1 << W) - 1, r, 0)
    return val, esc


@triton.jit
def _decode_block(l0_ptr, l1_ptr, l2_ptr, l3_ptr, l4_ptr, sm_ptr, out_t, sym_ptr, start, lim,
                  c1, c2, c3, c4,
                  W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, W3: tl.constexpr,
                  W4: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr, F3: tl.constexpr,
                  N_LEVELS: tl.constexpr, N_CODED: tl.constexpr,
                  KEEP: tl.constexpr, MAN: tl.constexpr, TOTAL: tl.constexpr,
                  BLOCK: tl.constexpr, MASKED: tl.constexpr):
    """Values ``start .. start + BLOCK`` of a tile (only those ``< lim`` when ``MASKED``; full
    sub-blocks run unmasked so their fixed-position loads and the store vectorise)."""
    # contiguity hints: each thread owns a run of consecutive values, which vectorises the
    # stores and keeps most of the prefix counts below inside a thread
    local = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK), BLOCK), BLOCK)
    if MASKED:
        mask = local < lim
    else:
        mask = None
    # level 0: every value, at its own position
    val = _read_bits(l0_ptr, local, mask, W0, True)
    if N_CODED == 0:  # raw only
        val = val + RAW_BASE
    else:
        esc = (val == (1 << W0) - 1).to(tl.int32)  # 0/1: who reaches level 1
        if MASKED:
            esc = tl.where(mask, esc, 0)
        if N_LEVELS > 1:
            c1, esc, val = _level_step(l1_ptr, c1, esc, val, W1,
                                       F1 if N_CODED > 1 else RAW_BASE, N_LEVELS == 2, False)
        if N_LEVELS > 2:
            c2, esc, val = _level_step(l2_ptr, c2, esc, val, W2,
                                       F2 if N_CODED > 2 else RAW_BASE, N_LEVELS == 3)
        if N_LEVELS > 3:
            c3, esc, val = _level_step(l3_ptr, c3, esc, val, W3,
                                       F3 if N_CODED > 3 else RAW_BASE, N_LEVELS == 4)
        if N_LEVELS > 4:  # only a raw level can be the fifth
            c4, esc, val = _level_step(l4_ptr, c4, esc, val, W4, RAW_BASE, True)
    # table index -> exponent: symbols at 0.., the identity at RAW_BASE.. (every index is in
    # the table, so the gather needs no mask)
    exp = tl.load(sym_ptr + val).to(tl.int32)
    sm = _read_bits(sm_ptr, local, mask, 1 + KEEP, True)
    sign = sm >> KEEP
    bits = (sign << (TOTAL - 1)) | (exp << MAN)
    if KEEP > 0:
        bits = bits | ((sm & ((1 << KEEP) - 1)) << (MAN - KEEP))
    tl.store(out_t + local, bits.to(out_t.dtype.element_ty), mask=mask)
    return c1, c2, c3, c4


@triton.jit
def _level_ptr(blob_ptr, lvl_off, offs_ptr, row, W: tl.constexpr):
    """Byte pointer to tile ``row``'s first entry of a level: offsets[t, l-1] groups of 8 entries
    are ``groups * W`` bytes."""
    return blob_ptr + lvl_off + tl.load(offs_ptr + row).to(tl.int64) * W


@triton.jit
def _decode_tile(blob_ptr, out_ptr, sym_ptr, n, tile, t,
                 sm_off, off_off, l0_off, l1_off, l2_off, l3_off, l4_off,
                 W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, W3: tl.constexpr,
                 W4: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr, F3: tl.constexpr,
                 N_LEVELS: tl.constexpr, N_CODED: tl.constexpr,
                 KEEP: tl.constexpr, MAN: tl.constexpr, TOTAL: tl.constexpr,
                 BLOCK: tl.constexpr):
    """Decode tile ``t``. 64-bit arithmetic only for the tile's base pointers; per-value
    arithmetic is 32-bit and relative to the tile (tile * 24 bits < 2**31)."""
    t64 = t.to(tl.int64)
    tile_start = tl.multiple_of(t64 * tile, 8)
    # tile % 8 == 0, so every stream's tile starts on a byte boundary
    sm_ptr = blob_ptr + sm_off + tile_start * (1 + KEEP) // 8
    l0_ptr = blob_ptr + l0_off + tile_start * W0 // 8
    out_t = out_ptr + tile_start
    lim = tl.minimum(n - tile_start, tile).to(tl.int32)  # values in this tile
    offs_ptr = (blob_ptr + off_off).to(tl.pointer_type(tl.int32))
    row = t64 * (N_LEVELS - 1)
    l1_ptr = blob_ptr
    l2_ptr = blob_ptr
    l3_ptr = blob_ptr
    l4_ptr = blob_ptr
    if N_LEVELS > 1:
        l1_ptr = _level_ptr(blob_ptr, l1_off, offs_ptr, row, W1)
    if N_LEVELS > 2:
        l2_ptr = _level_ptr(blob_ptr, l2_off, offs_ptr, row + 1, W2)
    if N_LEVELS > 3:
        l3_ptr = _level_ptr(blob_ptr, l3_off, offs_ptr, row + 2, W3)
    if N_LEVELS > 4:
        l4_ptr = _level_ptr(blob_ptr, l4_off, offs_ptr, row + 3, W4)
    zero = lim * 0
    c1 = zero
    c2 = zero
    c3 = zero
    c4 = zero
    args = (l0_ptr, l1_ptr, l2_ptr, l3_ptr, l4_ptr, sm_ptr, out_t, sym_ptr)
    full = lim // BLOCK * BLOCK
    for start in range(0, full, BLOCK):
        c1, c2, c3, c4 = _decode_block(*args, start, lim, c1, c2, c3, c4,
                                       W0, W1, W2, W3, W4, F1, F2, F3, N_LEVELS, N_CODED,
                                       KEEP, MAN, TOTAL, BLOCK, False)
    if full < lim:
        _decode_block(*args, full, lim, c1, c2, c3, c4,
                      W0, W1, W2, W3, W4, F1, F2, F3, N_LEVELS, N_CODED,
                      KEEP, MAN, TOTAL, BLOCK, True)


@triton.jit
def _decode_kernel(blob_ptr, out_ptr, sym_ptr, n, tile,
                   sm_off, off_off, l0_off, l1_off, l2_off, l3_off, l4_off,
                   W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, W3: tl.constexpr,
                   W4: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr, F3: tl.constexpr,
                   N_LEVELS: tl.constexpr, N_CODED: tl.constexpr,
                   KEEP: tl.constexpr, MAN: tl.constexpr, TOTAL: tl.constexpr,
                   BLOCK: tl.constexpr):
    """One tile of one tensor per program."""
    t = tl.program_id(0)
    _decode_tile(blob_ptr, out_ptr, sym_ptr, n, tile, t,
                 sm_off, off_off, l0_off, l1_off, l2_off, l3_off, l4_off,
                 W0, W1, W2, W3, W4, F1, F2, F3, N_LEVELS, N_CODED, KEEP, MAN, TOTAL, BLOCK)


@triton.jit
def _decode_many_kernel(meta_ptr, blob_ptr, out_ptr, n_tensors,
                        W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, W3: tl.constexpr,
                        W4: tl.constexpr, F1: tl.constexpr, F2: tl.constexpr, F3: tl.constexpr,
                        N_LEVELS: tl.constexpr, N_CODED: tl.constexpr,
                        KEEP: tl.constexpr, MAN: tl.constexpr, TOTAL: tl.constexpr,
                        BLOCK: tl.constexpr, MAX_T: tl.constexpr, META_COLS: tl.constexpr,
                        OUT_ALIGN: tl.constexpr):
    """One tile of one of several tensors per program. Row ``j`` of ``meta_ptr`` (int64):
    [first global tile, numel, tile, blob delta (bytes), out delta (elements), sm, offsets,
     level0..level4 byte offsets, symbol-table index into meta]."""
    pid = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, MAX_T)
    first = tl.load(meta_ptr + r * META_COLS, mask=r < n_tensors, other=1 << 62)
    j = tl.sum((first <= pid).to(tl.int32), axis=0) - 1
    m = meta_ptr + j.to(tl.int64) * META_COLS
    blob_delta = tl.multiple_of(tl.load(m + 3), 16)  # blobs are 16-byte aligned (checked)
    out_delta = tl.load(m + 4)
    if OUT_ALIGN > 1:  # every output is 16-byte aligned: keep the stores vectorised
        out_delta = tl.multiple_of(out_delta, OUT_ALIGN)
    _decode_tile(blob_ptr + blob_delta, out_ptr + out_delta, meta_ptr + tl.load(m + 12),
                 tl.load(m + 1), tl.load(m + 2), pid - tl.load(m),
                 tl.load(m + 5), tl.load(m + 6), tl.load(m + 7), tl.load(m + 8), tl.load(m + 9),
                 tl.load(m + 10), tl.load(m + 11),
                 W0, W1, W2, W3, W4, F1, F2, F3, N_LEVELS, N_CODED, KEEP, MAN, TOTAL, BLOCK)


@triton.jit
def _patch_kernel(blob_ptr, out_ptr, idx_off, val_off, n_patch, BLOCK: tl.constexpr):
    """out[patch_idx[i]] = patch_val[i] (exact bits; NaNs of lossy mode)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_patch
    idx = tl.load((blob_ptr + idx_off).to(tl.pointer_type(tl.int64)) + offs, mask=mask, other=0)
    val = tl.load((blob_ptr + val_off).to(tl.pointer_type(out_ptr.dtype.element_ty)) + offs,
                  mask=mask, other=0)
    tl.store(out_ptr + idx, val, mask=mask)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------

_SYM_CACHE = _LRU(4096)  # (device, symbols) -> (device int32 table, pinned source)
_META_CACHE = _LRU(256)  # (device, group key) -> (device int64 table, pinned source, headers)


def _sym_table(symbols: tuple, device: torch.device) -> torch.Tensor:
    def make():
        host = torch.zeros(SYM_TABLE, dtype=torch.int32)
        host[_RAW_BASE:] = torch.arange(SYM_TABLE - _RAW_BASE, dtype=torch.int32)
        if symbols:
            host[:len(symbols)] = torch.tensor(symbols, dtype=torch.int32)
        return _to_device(host, device)
    return _SYM_CACHE.get_or((str(device), symbols), make)[0]


def _signature(h) -> dict:
    """The constexpr arguments a header needs (its widths, levels, raw flag, float layout)."""
    lay = h.layout
    ws = list(spec.level_widths(h.widths, h.has_raw, lay.exp_bits))
    first = [0]
    for w in h.widths:
        first.append(first[-1] + (1 << w) - 1)
    first += [0] * (5 - len(first))
    ws_p = ws + [1] * (5 - len(ws))
    return dict(W0=ws_p[0], W1=ws_p[1], W2=ws_p[2], W3=ws_p[3], W4=ws_p[4],
                F1=first[1], F2=first[2], F3=first[3],
                N_LEVELS=len(ws), N_CODED=len(h.widths), KEEP=h.mantissa_bits,
                MAN=lay.man_bits, TOTAL=lay.total_bits)


def _section_offsets(h) -> list:
    s = h.sections
    nlev = len(spec.level_widths(h.widths, h.has_raw, h.layout.exp_bits))
    lv = [s[f"level{i}"][0] if i < nlev else 0 for i in range(5)]
    return [s["sm"][0], s["offsets"][0]] + lv


def _block_for(tile: int) -> int:
    return max(16, min(triton.next_power_of_2(tile), DECODE_BLOCK))


def _check_out(ct, out_bits: torch.Tensor) -> torch.Tensor:
    lay = ct.header.layout
    want = _INT_DTYPES[lay.itemsize]
    if out_bits.dtype != want:
        if out_bits.dtype.itemsize == lay.itemsize and out_bits.is_contiguous():
            out_bits = out_bits.reshape(-1).view(want)
        else:
            raise ValueError(f"out must be a {want} (or {ct.dtype}) tensor, got {out_bits.dtype}")
    if not out_bits.is_contiguous() or out_bits.numel() < ct.header.numel:
        raise ValueError(f"out must be contiguous with >= {ct.header.numel} elements")
    if out_bits.device != ct.data.device:
        raise ValueError(f"out is on {out_bits.device} but the blob is on {ct.data.device}")
    _check_device(out_bits.device)
    if ct.data.data_ptr() % spec.SECTION_ALIGN:
        raise ValueError("the compressed blob must start at a 16-byte aligned address (its sections "
                         "are aligned relative to it and are read as 16/32/64-bit words); "
                         "copy it (ct.data.clone()) or align the buffer it lives in")
    return out_bits.reshape(-1)


def _launch_patches(ct, out_bits: torch.Tensor) -> None:
    s = ct.header.sections
    n_patch = s["patch_idx"][1] // 8
    if n_patch:
        block = 1024
        _patch_kernel[(triton.cdiv(n_patch, block),)](ct.data, out_bits, s["patch_idx"][0],
                                                     s["patch_val"][0], n_patch, BLOCK=block)


_LAUNCH_CACHE = _LRU(4096)  # id(header) -> (header, launch arguments derived from it)


def _launch_args(h):
    """(n, tiles, positional scalars, constexpr kwargs, patch count) of a header, memoised per
    header object (the header is kept alive in the cache, so its id cannot be reused)."""
    def make():
        if sum((1 << w) - 1 for w in h.widths) > _RAW_BASE:
            # the planner never goes past 4 levels of 5 bits (124 codes); a header that does
            # would index past the symbol part of the table
            raise ValueError(f"level widths {h.widths} name more than {_RAW_BASE} codes; "
                             f"the triton backend supports the planner's range (<= 5 bits per level)")
        return h, (h.numel, spec.n_tiles(h.numel, h.tile), (h.numel, h.tile, *_section_offsets(h)),
                   _signature(h), h.sections["patch_idx"][1] // 8)
    hit = _LAUNCH_CACHE.get_or(id(h), make)
    if hit[0] is not h:  # pragma: no cover - a stale id (cannot happen while h is cached)
        del _LAUNCH_CACHE[id(h)]
        hit = _LAUNCH_CACHE.get_or(id(h), make)
    return hit[1]


def decode_into(ct, out_bits: torch.Tensor, *, block: int | None = None,
                num_warps: int | None = None) -> None:
    """Decode ``ct`` into ``out_bits`` (int16/int32 1-D view of the output, on ct's device).

    One launch (plus one for patches when the tensor has any); no allocation after the first
    call for a given symbol table; no host synchronisation; on the current stream."""
    h = ct.header
    out_bits = _check_out(ct, out_bits)
    n, tiles, scalars, sig, n_patch = _launch_args(h)
    if n == 0:
        return
    sym = _sym_table(h.symbols, ct.data.device)
    _decode_kernel[(tiles,)](ct.data, out_bits, sym, *scalars, **sig,
                             BLOCK=block or _block_for(h.tile),
                             num_warps=num_warps or DECODE_WARPS)
    if n_patch:
        _launch_patches(ct, out_bits)


def _group_meta(cts, outs, device):
    """int64 table: META_COLS per tensor, then every tensor's symbol table (SYM_TABLE entries)."""
    T = len(cts)
    meta = torch.zeros(T * META_COLS + T * SYM_TABLE, dtype=torch.int64)
    m = meta.numpy()
    blob0, out0 = cts[0].data.data_ptr(), outs[0].data_ptr()
    itemsize = outs[0].element_size()
    first = 0
    for j, (ct, out) in enumerate(zip(cts, outs)):
        h = ct.header
        dout = out.data_ptr() - out0
        if dout % itemsize:
            raise ValueError("outputs must be aligned to their element size")
        sym_base = T * META_COLS + j * SYM_TABLE
        row = [first, h.numel, h.tile, ct.data.data_ptr() - blob0, dout // itemsize,
               *_section_offsets(h), sym_base]
        m[j * META_COLS:j * META_COLS + len(row)] = row
        m[sym_base:sym_base + len(h.symbols)] = h.symbols
        m[sym_base + _RAW_BASE:sym_base + SYM_TABLE] = np.arange(SYM_TABLE - _RAW_BASE)
        first += spec.n_tiles(h.numel, h.tile)
    dev, src = _to_device(meta, device)
    return dev, src, first


def decode_many(cts, outs, *, block: int | None = None, num_warps: int | None = None) -> None:
    """Decode several tensors (e.g. the weights of one transformer block) with one launch per
    header signature (normally exactly one launch): the grid enumerates all their tiles.

    ``outs[i]`` is an int16/int32 view of (or a dense tensor of ct's dtype for) ``cts[i]``'s
    output; all on one device. No host synchronisation; the per-group descriptor table is cached
    (keyed by the headers and the blob/output addresses), so repeated calls allocate nothing."""
    cts, outs = list(cts), list(outs)
    if len(cts) != len(outs):
        raise ValueError("decode_many needs one output per compressed tensor")
    if not cts:
        return
    outs = [_check_out(ct, o) for ct, o in zip(cts, outs)]
    device = outs[0].device
    groups: dict = {}
    for ct, out in zip(cts, outs):
        if ct.data.device != device:
            raise ValueError("decode_many: all tensors must be on one device")
        n, _, _, sig, _ = _launch_args(ct.header)
        if n:
            groups.setdefault(tuple(sorted(sig.items())), []).append((ct, out))
    for key, members in groups.items():
        g_cts = [c for c, _ in members]
        g_outs = [o for _, o in members]
        ckey = (str(device), tuple((id(c.header), c.data.data_ptr(), o.data_ptr()) for c, o in members))
        meta, _src, n_prog = _META_CACHE.get_or(
            ckey, lambda: (*_group_meta(g_cts, g_outs, device), [c.header for c in g_cts]))[:3]
        aligned = all(o.data_ptr() % 16 == 0 for o in g_outs)
        _decode_many_kernel[(n_prog,)](
            meta, g_cts[0].data, g_outs[0], len(g_cts), **dict(key),
            BLOCK=block or _block_for(min(c.header.tile for c in g_cts)),
            MAX_T=max(2, triton.next_power_of_2(len(g_cts))), META_COLS=META_COLS,
            OUT_ALIGN=16 // g_outs[0].element_size() if aligned else 1,
            num_warps=num_warps or DECODE_WARPS)
        for c, o in members:
            if _launch_args(c.header)[4]:
                _launch_patches(c, o)
