"""Triton backend: decode (and encode) the nzrt stream layout on the GPU, on integer bit patterns.

Bit layout (defined by ``spec`` and ``reference``; this module only reads and writes it)
-----------------------------------------------------------------------------------------
A float of ``E`` exponent and ``M`` mantissa bits (``TOTAL = 1 + E + M``) with ``KEEP`` kept
mantissa bits is stored as

* ``sm``: ``sign << KEEP | mantissa >> (M - KEEP)``, ``SM_W = 1 + KEEP`` bits per value, value ``i``
  at bits ``i*SM_W ..`` (little-endian by bits: bit ``b`` of the stream is bit ``b & 7`` of byte
  ``b >> 3``);
* the exponent as a cascade of ``N_LEVELS`` streams. Coded level ``l`` has ``W_l``-bit entries:
  codes ``0 .. 2**W_l - 2`` name ``symbols[F_l + code]`` (``F_l = sum_{j<l} 2**W_j - 1``), code
  ``2**W_l - 1`` escapes to level ``l + 1``. An optional last raw level (``HAS_RAW``) stores the
  exponent itself in ``E`` bits. Level 0 holds every value at its own position. For ``l > 0`` the
  entries of tile ``t`` start at entry ``offsets[t, l-1] * 8`` (``offsets`` is a ``uint32`` table
  of shape ``(tiles + 1, N_LEVELS - 1)``), in value order: the slot of a value is that base plus
  the number of values *before it in the same tile* that reached level ``l`` (an exclusive
  prefix count, ``tl.cumsum``).
* ``patch_idx`` (int64) / ``patch_val`` (the float's uint): exact bits written over the decoded
  ones afterwards (NaNs in lossy mode; normally empty).
Every stream is followed by >= 8 zero bytes, so a reader may load a few bytes past any entry.

Decode (``decode_into`` / ``decode_many``)
------------------------------------------
One program per tile; it walks its tile in sub-blocks of ``BLOCK`` values (a power of two,
default 1024 on 4 warps on a GPU, the whole tile under the interpreter) and carries one running
count per level across sub-blocks. Full sub-blocks run unmasked (only the tile's tail is masked)
so the fixed-position loads and the int16/int32 store vectorise. Per sub-block:

1. level 0 and ``sm`` are read at fixed positions (widths 1/2/4: one aligned 1/2/4-byte word per
   8 values; width 8k: whole bytes; otherwise the 1-4 bytes an entry can touch, then a shift);
2. for each deeper level, if any value of the sub-block reached it (a uniform branch: deep
   levels are sparse, e.g. 27%, 4%, 0.7%, <0.01% of N(0, 0.02) weights reach levels 1..4),
   ``tl.cumsum`` of the 0/1 escape flags gives each escaped value its slot (inclusive count - 1 +
   the running count), its code is gathered from the packed stream (unmasked: every lane's slot
   is in range) and the table index becomes ``F_l + code`` (``RAW_BASE + code`` at a raw level);
3. one gather from the per-tensor table (symbols at ``0..``, the identity at ``RAW_BASE..``, so
   raw and coded values take the same path) gives the exponent, and
   ``sign << (TOTAL-1) | exp << M | kept mantissa << (M - KEEP)`` is stored.

Level widths, level count, ``KEEP`` and the float layout are ``constexpr`` (one specialisation
per header signature); ``n``, ``tile`` and the section byte offsets are runtime scalars. Per-value
arithmetic is 32-bit and tile-relative; only base pointers are 64-bit. Blob bounds are not
re-checked in the kernel: ``codec.decode_into`` runs ``ct.verify()`` (CRC + offsets) first.

No allocation, no host synchronisation, on the current stream: ``decode_into`` passes the blob,
the output and the section offsets as scalar arguments. The only device-side table is the symbol
table, which lives in a small per-device cache keyed by the header's symbol tuple (int32,
``SYM_TABLE`` = 384 entries, 1.5 KiB). A miss copies it once from pinned host memory with ``non_blocking=True`` (the pinned
buffer is kept alive in the cache), so even the first call does not synchronise; later calls
reuse it. A second, tiny kernel applies patches and is only launched when a tensor has any
(the header says how many, so this costs nothing normally).

Per-call host work is a few attribute checks and one memoised lookup per header (the launch
arguments derived from it); blobs must start 16-byte aligned (sections are read as 16/32/64-bit
words), which every torch allocation is — a misaligned view is refused with a clear error.

``decode_many(cts, outs)`` decodes the tensors of one transformer block with one launch per
*header signature* (dtype, kept mantissa bits, level widths, raw flag): in practice one launch per
block, because every weight of a block gets the same cascade. Its grid enumerates the tiles of all
tensors of the group. A device table (int64, ``META_COLS`` per tensor, then the symbol tables)
gives each tensor's first global tile, size, tile, the *byte/element distance* of its blob and
output from the first tensor's (so the kernel needs no pointer arrays: ``base_ptr + delta``) and
its section offsets. A program finds its tensor by comparing its id with the first-tile column
(``tl.sum(first <= pid) - 1``). The table is cached keyed by (header objects, blob and output
addresses) — a scheduler that decodes a block into the same slot buffers hits it every time; a
miss builds it on the host and copies it asynchronously from pinned memory (no sync). Because
the output pointer is ``base + delta``, the compiler cannot prove alignment; when every output
is 16-byte aligned (checked on the host) the kernel is told so (``OUT_ALIGN``) and the stores
stay vectorised. Why group instead of passing widths at run time: constexpr widths let every
shift and mask fold to constants (the kernel is ALU-bound, see below), and the weights of one
block normally share one cascade, so grouping costs nothing in practice.

Cost model (static, ``tools/bench_gpu.py --static``: sm_90 SASS of the decode loop, no GPU
needed): ~12 instructions per value for level 0 + sm + store, ~20 more per coded level that a
sub-block reaches. An H100 issues ~3e13 lane-instructions/s while a copy of the same bytes
(~3.35 B per bf16 value) runs at ~0.9e12 values/s, i.e. ~33 instructions per value break even:
2-level cascades (e.g. (4,)+raw, (3, 5)) should decode near copy speed, the 5-level
(2,2,2,3)+raw that ``spec.choose_cascade`` picks for N(0, 0.02) weights needs ~95-110 and is
expected to be ALU-bound at roughly a third of copy bandwidth. Measure with tools/bench_gpu.py.

Encode (``encode``)
-------------------
1. ``_hist_kernel``: per tile, lossy rounding (``spec.lossy_round`` semantics on integer bits)
   and a ``tl.histogram`` of exponents -> a ``(tiles, 2**E)`` table on the device.
2. Host: the global histogram (sync 1), ``spec.choose_cascade`` / ``spec.symbol_order``, the
   per-exponent (level, code) table. Per-tile counts of each level follow from the tile
   histograms by an exact float64 matmul; groups of 8 and a prefix over tiles give ``offsets``
   on the device; the totals size the streams (sync 2).
3. ``_scatter_kernel``: per tile, each value writes its sm field and, for every level it reaches,
   its code into a one-entry-per-slot array at ``offsets[t, l-1] * 8 + exclusive prefix count``.
4. ``_pack_kernel``: one program per block of output bytes; each byte gathers the entries that
   overlap it (no atomics), so the packed bytes equal ``reference.pack`` exactly.
NaN patch positions (lossy mode only) come from a torch ``nonzero``. Sections are returned as
numpy arrays on the CPU in the reference's order, so ``CompressedTensor.from_sections`` builds a
byte-identical blob.

Under ``TRITON_INTERPRET=1`` (set before this module is imported) everything runs on CPU tensors,
bit-exactly, because the kernels only use integer loads/stores, shifts, masks, ``tl.where``,
gathers, ``tl.cumsum`` and ``tl.histogram``.
"""
from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np
import torch
import triton
import triton.language as tl

from . import spec
from .reference import code_tables

try:  # what @triton.jit below decides on (read when this module is imported)
    INTERPRET = bool(triton.knobs.runtime.interpret)
except AttributeError:  # older Triton without knobs
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

# Sub-block sizes. Under the interpreter every program costs ~1 ms of Python, so one sub-block
# covers a whole tile (up to 64Ki values). On a GPU, BLOCK / (32 * warps) = 8 consecutive values
# per thread lets the int16 store vectorise and keeps the prefix counts mostly in-thread; 1024
# values on 4 warps is the default (unmeasured: tools/bench_gpu.py sweeps the alternatives and
# `tools/bench_gpu.py --static` counts SASS instructions per value without a GPU).
DECODE_BLOCK = int(os.environ.get("NZRT_TRITON_BLOCK", 65536 if INTERPRET else 1024))
DECODE_WARPS = int(os.environ.get("NZRT_TRITON_WARPS", 4))
ENCODE_BLOCK = 65536 if INTERPRET else 2048
PACK_BLOCK = 65536 if INTERPRET else 1024
_RAW_BASE = 128  # table index of raw exponent 0; symbols (<= 4 levels of <= 5 bits: 124) come first
RAW_BASE = tl.constexpr(_RAW_BASE)
SYM_TABLE = _RAW_BASE + 256  # symbols, then the identity for raw exponents (8 bits at most)
META_COLS = 16

_INT_DTYPES = {2: torch.int16, 4: torch.int32}


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


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------

class _LRU(OrderedDict):
    def __init__(self, cap):
        super().__init__()
        self.cap = cap

    def get_or(self, key, make):
        try:
            self.move_to_end(key)
            return self[key]
        except KeyError:
            value = self[key] = make()
            if len(self) > self.cap:
                self.popitem(last=False)
            return value


_SYM_CACHE = _LRU(4096)  # (device, symbols) -> (device int32 table, pinned source)
_META_CACHE = _LRU(256)  # (device, group key) -> (device int64 table, pinned source, headers)


def _to_device(host: torch.Tensor, device: torch.device):
    """An asynchronous copy from pinned memory (no host sync); returns (device tensor, source),
    the source to be kept alive as long as the copy may be in flight."""
    if device.type == "cpu":
        return host, host
    pinned = host.pin_memory()
    return pinned.to(device, non_blocking=True), pinned


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


def _check_device(device: torch.device) -> None:
    if device.type == "cpu" and not INTERPRET:
        raise ValueError("the triton backend runs on CUDA tensors, or on CPU tensors when "
                         "TRITON_INTERPRET=1 was set before nzrt.kernels.triton_gpu was imported; "
                         "use backend='numba' or 'reference' for CPU tensors")


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
