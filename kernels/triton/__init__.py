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

from .common import DECODE_BLOCK, DECODE_WARPS, INTERPRET
from .decode import decode_into, decode_many
from .encode import encode

__all__ = ["encode", "decode_into", "decode_many", "DECODE_BLOCK", "DECODE_WARPS", "INTERPRET"]
