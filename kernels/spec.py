"""The stream layout every backend reads and writes: float layouts, the exponent cascade, section names.

A float of E exponent and M mantissa bits is split into
  * ``sm``: sign and the kept ``k`` high mantissa bits, packed at ``1 + k`` bits per value;
  * the exponent, coded by a *cascade* of levels. Level ``l < m`` is a fixed-width code of
    ``w_l`` bits: codes ``0 .. 2**w_l - 2`` name the next most frequent exponents and code
    ``2**w_l - 1`` escapes to level ``l + 1``. An optional last *raw* level stores the exponent
    itself in ``E`` bits. A value has one entry in every level it reaches, so each level is a
    stream in value order and a value's slot in it is a prefix count of escapes before it.
Values are grouped in tiles of ``tile`` values. Level 0 holds every value, so tile ``t`` starts
at entry ``t * tile``. For the other levels each tile's entries are padded to a multiple of 8,
so every tile starts on a byte boundary and can be written and read independently;
``offsets[t, l - 1]`` is where tile ``t`` starts in level ``l``, counted in groups of 8 entries.

Packing is little-endian by bits: entry ``i`` of a ``w``-bit stream occupies bits
``i*w .. i*w + w - 1`` of the byte string read as one little-endian integer. Every packed
stream is followed by at least ``STREAM_PAD`` zero bytes so a reader may load 8 bytes at any
byte it touches.

Lossy mode (``k < M``) rounds to nearest even before the split; NaNs are stored through
``patch_idx``/``patch_val`` (their exact original bits), so NaN stays NaN with its payload.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

FORMAT_VERSION = 2  # 2: the header carries ``header_crc32``, a CRC-32 of its own fields
DEFAULT_TILE = 8192
MAX_TILE = 1 << 24  # tile bounds every decoder relies on: 8..MAX_TILE, a multiple of 8
MAX_NUMEL = 1 << 33  # values per tensor: keeps every stream's group count below 2**31 (int32)
STREAM_PAD = 8
SECTION_ALIGN = 16
MAX_LEVELS = 4  # coded levels; a raw level may follow
MAX_WIDTH = 5  # widest coded level the planner considers


class FormatError(ValueError):
    """A compressed buffer or file that is corrupted, truncated, inconsistent or of an unknown
    version: the one exception every malformed input raises, on every backend."""


@dataclass(frozen=True)
class FloatLayout:
    name: str  # torch dtype name without "torch."
    exp_bits: int
    man_bits: int
    itemsize: int  # bytes

    @property
    def total_bits(self) -> int:
        return 8 * self.itemsize

    @property
    def uint(self):
        return {2: np.uint16, 4: np.uint32}[self.itemsize]

    @property
    def exp_mask(self) -> int:
        return (1 << self.exp_bits) - 1

    @property
    def inf_bits(self) -> int:
        """Bit pattern of +inf; any magnitude above it is a NaN."""
        return self.exp_mask << self.man_bits


LAYOUTS = {
    "bfloat16": FloatLayout("bfloat16", 8, 7, 2),
    "float16": FloatLayout("float16", 5, 10, 2),
    "float32": FloatLayout("float32", 8, 23, 4),
}


def sm_width(keep: int) -> int:
    """Bits per value of the sign-and-kept-mantissa stream."""
    return 1 + keep


def packed_nbytes(count: int, width: int) -> int:
    """Bytes of a ``count``-entry stream of ``width``-bit entries, tail padding included."""
    return (count * width + 7) // 8 + STREAM_PAD


def n_tiles(n: int, tile: int) -> int:
    return (n + tile - 1) // tile


def level_widths(widths: tuple[int, ...], has_raw: bool, exp_bits: int) -> tuple[int, ...]:
    """Entry width of every stored level, the raw one included."""
    return tuple(widths) + ((exp_bits,) if has_raw else ())


def symbol_order(hist: np.ndarray) -> np.ndarray:
    """Exponents that occur, most frequent first; ties by smaller exponent (a stable, unique order)."""
    present = np.flatnonzero(hist)
    order = np.lexsort((present, -hist[present].astype(np.int64)))
    return present[order].astype(np.int64)


def _cascade_cost(counts: np.ndarray, widths, exp_bits: int, tiles: int) -> tuple[int, bool]:
    """Bits a cascade costs for symbols with sorted ``counts``; also whether a raw level is needed."""
    entering = int(counts.sum())
    used = 0
    bits = 0
    levels = 0
    for w in widths:
        bits += entering * w + tiles * 4 * w  # ~half a group of padding per tile
        levels += 1
        cap = (1 << w) - 1
        entering -= int(counts[used:used + cap].sum())
        used += cap
    has_raw = entering > 0
    if has_raw:
        bits += entering * exp_bits + tiles * 4 * exp_bits
        levels += 1
    bits += tiles * 32 * max(levels - 1, 0)  # per-tile offsets
    return bits, has_raw


def choose_cascade(hist: np.ndarray, exp_bits: int, tile: int) -> tuple[tuple[int, ...], bool]:
    """The level widths (and raw flag) that code this exponent histogram in the fewest bits.

    Exhaustive over at most ``MAX_LEVELS`` coded levels of 1..``MAX_WIDTH`` bits: a few hundred
    candidates, each costed from the sorted histogram in O(levels).
    """
    counts = np.sort(hist[hist > 0])[::-1].astype(np.int64)
    n = int(counts.sum())
    if n == 0:
        return (), False
    tiles = n_tiles(n, tile)
    best = None
    max_w = min(MAX_WIDTH, exp_bits)
    for m in range(MAX_LEVELS + 1):
        for widths in itertools.product(range(1, max_w + 1), repeat=m):
            cost, has_raw = _cascade_cost(counts, widths, exp_bits, tiles)
            if best is None or cost < best[0]:
                best = (cost, widths, has_raw)
    return best[1], best[2]


WINDOW4 = (4,)  # one 4-bit level (15 exponents, code 15 escapes to a raw byte): ~12 bits a bf16
# weight against the planner's ~10.7, and the shape ``cpu.fused_w4`` multiplies fastest from


def window_fusable(header, shape) -> bool:
    """Whether a compressed W [N, K] is what the window fused kernels (``cpu.fused_w4``,
    ``triton.fused``) multiply from: lossless bf16 (so no patches) in the ``WINDOW4`` code, rows
    and tiles of whole 64-weight groups, not empty."""
    if (header.dtype != "bfloat16" or header.mantissa_bits != 7 or tuple(header.widths) != WINDOW4
            or len(shape) != 2):
        return False
    N, K = shape
    return K % 64 == 0 and header.tile % 64 == 0 and N * K > 0


def check_widths(widths, exp_bits: int) -> tuple[int, ...]:
    """``widths`` as a tuple of ints: 0..``MAX_LEVELS`` coded levels (none: every exponent raw) of
    1..min(MAX_WIDTH, exp_bits) bits each; ValueError otherwise."""
    try:
        w = tuple(int(v) for v in widths)
    except TypeError:
        raise ValueError(f"widths must be a sequence of level widths, got {widths!r}") from None
    top = min(MAX_WIDTH, exp_bits)
    if not len(w) <= MAX_LEVELS or not all(1 <= v <= top for v in w) or any(
            isinstance(v, bool) or int(v) != v for v in widths):
        raise ValueError(f"widths {widths!r}: 0..{MAX_LEVELS} coded levels of 1..{top} bits each")
    return w


def forced_cascade(hist: np.ndarray, widths, exp_bits: int) -> tuple[tuple[int, ...], bool]:
    """The given level widths instead of ``choose_cascade``'s, with a raw level when they cannot
    name every exponent present (none at all for an empty histogram)."""
    w = check_widths(widths, exp_bits)
    present = int((hist > 0).sum())
    if present == 0:
        return (), False
    return w, present > sum((1 << v) - 1 for v in w)


def lossy_round(bits: np.ndarray, layout: FloatLayout, keep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round to ``keep`` mantissa bits, nearest even, carry into the exponent (readable reference).

    Returns (rounded bits, NaN positions, their original bits). Finite values never round to
    inf: they saturate at the largest finite value with ``keep`` mantissa bits.
    """
    s = layout.man_bits - keep
    if s == 0:
        empty = np.zeros(0, np.int64)
        return bits, empty, bits[:0]
    wide = bits.astype(np.int64)
    sign = wide & (1 << (layout.total_bits - 1))
    mag = wide ^ sign
    is_nan = mag > layout.inf_bits
    is_inf = mag == layout.inf_bits
    lsb = (mag >> s) & 1
    rounded = (mag + (1 << (s - 1)) - 1 + lsb) & ~((1 << s) - 1)
    max_finite = layout.inf_bits - (1 << s)
    rounded = np.where(~is_nan & ~is_inf & (rounded > max_finite), max_finite, rounded)
    rounded = np.where(is_inf, mag, rounded)
    rounded = np.where(is_nan, layout.inf_bits, rounded)  # stored as inf, patched back to NaN
    out = (rounded | sign).astype(layout.uint)
    nan_idx = np.flatnonzero(is_nan).astype(np.int64)
    return out, nan_idx, bits[nan_idx].copy()


def check_tables(n: int, tile: int, widths: tuple[int, ...], keep: int, layout: FloatLayout,
                 sections: dict) -> None:
    """The blob-dependent facts every decoder relies on (``widths``: every stored level's, raw
    included; ``sections``: name -> numpy view). Raises FormatError on the first that fails:

    * ``sm`` and every level stream are exactly as long as ``n``, the widths and the offsets say;
    * ``offsets[:, l - 1]`` starts at 0, never decreases, grows per tile by at most the previous
      level's groups in that tile, and ends at level ``l``'s group count;
    * patch indices are strictly increasing and below ``n``; patch values are NaNs.
    """
    tiles = n_tiles(n, tile)
    L = len(widths)
    if len(sections["sm"]) != packed_nbytes(n, sm_width(keep)):
        raise FormatError("the sm stream is not as long as the header implies")
    off = sections["offsets"]
    if off.shape != (tiles + 1, max(L - 1, 0)):
        raise FormatError(f"offsets table has shape {off.shape}, expected {(tiles + 1, max(L - 1, 0))}")
    if L:
        counts = np.full(tiles, tile, np.int64)
        if tiles:
            counts[-1] = n - (tiles - 1) * tile
        prev = (counts + 7) // 8  # level 0: every value of the tile, in groups of 8
        if len(sections["level0"]) != int(prev.sum()) * widths[0] + STREAM_PAD:
            raise FormatError("level 0 stream is not as long as the header implies")
        for level in range(1, L):
            col = off[:, level - 1].astype(np.int64)
            step = np.diff(col)
            if col[0] != 0 or (step < 0).any() or (step > prev).any():
                raise FormatError(f"level {level} tile offsets are inconsistent")
            if len(sections[f"level{level}"]) != int(col[-1]) * widths[level] + STREAM_PAD:
                raise FormatError(f"level {level} offsets do not end where its stream ends")
            prev = step
    pi, pv = sections["patch_idx"], sections["patch_val"]
    if len(pi) != len(pv):
        raise FormatError("patch sections disagree in length")
    if len(pi) and (pi[0] < 0 or pi[-1] >= n or (np.diff(pi) <= 0).any()):
        raise FormatError("patch indices are out of range or not strictly increasing")
    sign = 1 << (layout.total_bits - 1)
    if len(pv) and ((pv.astype(np.int64) & ~sign) <= layout.inf_bits).any():
        raise FormatError("a patch value is not a NaN")
