"""Readable numpy codec: the definition of the stream layout (see ``spec``). Written for clarity,
not speed; every fast backend must produce exactly these bytes and decode exactly these bits."""
from __future__ import annotations

import numpy as np

from . import spec
from .spec import FloatLayout, FormatError


# --- bit packing ---------------------------------------------------------------------------

def pack(values: np.ndarray, width: int) -> np.ndarray:
    """Entries of ``width`` bits, little-endian by bits, plus ``STREAM_PAD`` zero bytes."""
    out = np.zeros(spec.packed_nbytes(len(values), width), np.uint8)
    if width == 0 or len(values) == 0:
        return out
    bit_of_entry = np.arange(len(values), dtype=np.int64) * width
    v = values.astype(np.int64)
    for b in range(width):
        pos = bit_of_entry + b
        bit = ((v >> b) & 1).astype(np.uint8)
        np.bitwise_or.at(out, pos >> 3, (bit << (pos & 7)).astype(np.uint8))
    return out


def unpack(buf: np.ndarray, index: np.ndarray, width: int) -> np.ndarray:
    """Entries ``index`` of a ``width``-bit stream (the inverse of ``pack``)."""
    index = index.astype(np.int64)
    out = np.zeros(len(index), np.int64)
    for b in range(width):
        pos = index * width + b
        out |= ((buf[pos >> 3] >> (pos & 7)) & 1).astype(np.int64) << b
    return out


# --- encode --------------------------------------------------------------------------------

def split(bits: np.ndarray, layout: FloatLayout, keep: int):
    """(sign and kept mantissa, exponent) of each value."""
    b = bits.astype(np.int64)
    man = b & ((1 << layout.man_bits) - 1)
    exp = (b >> layout.man_bits) & layout.exp_mask
    sign = b >> (layout.total_bits - 1)
    sm = (sign << keep) | (man >> (layout.man_bits - keep))
    return sm, exp


def code_tables(symbols: np.ndarray, widths, has_raw: bool, exp_bits: int):
    """For every exponent value: the level that resolves it and its code there."""
    n_sym = 1 << exp_bits
    level_of = np.full(n_sym, len(widths), np.int64)  # the raw level, if nothing earlier
    code_of = np.arange(n_sym, dtype=np.int64)  # raw code = the exponent itself
    first = 0
    for level, w in enumerate(widths):
        cap = (1 << w) - 1
        for code, e in enumerate(symbols[first:first + cap]):
            level_of[e] = level
            code_of[e] = code
        first += cap
    return level_of, code_of


def encode(bits: np.ndarray, layout: FloatLayout, keep: int, tile: int = spec.DEFAULT_TILE,
           widths: tuple | None = None):
    """Encode 1-D integer bit patterns. Returns (widths, has_raw, symbols, sections). ``widths``:
    the coded levels to use instead of the planner's choice (``spec.forced_cascade``)."""
    bits = np.ascontiguousarray(bits, dtype=layout.uint)
    n = len(bits)
    bits, patch_idx, patch_val = spec.lossy_round(bits, layout, keep)
    sm, exp = split(bits, layout, keep)
    hist = np.bincount(exp, minlength=1 << layout.exp_bits)
    if widths is not None:
        widths, has_raw = spec.forced_cascade(hist, widths, layout.exp_bits)
    else:
        widths, has_raw = spec.choose_cascade(hist, layout.exp_bits, tile)
    symbols = spec.symbol_order(hist)[: sum((1 << w) - 1 for w in widths)]
    level_of, code_of = code_tables(symbols, widths, has_raw, layout.exp_bits)
    lvl = level_of[exp]
    tile_of = np.arange(n, dtype=np.int64) // tile
    tiles = spec.n_tiles(n, tile)

    sections = {"sm": pack(sm, spec.sm_width(keep))}
    all_widths = spec.level_widths(widths, has_raw, layout.exp_bits)
    offsets = np.zeros((tiles + 1, max(len(all_widths) - 1, 0)), np.uint32)
    for level, w in enumerate(all_widths):
        reaches = lvl >= level
        escape = (1 << w) - 1
        codes = np.where(lvl == level, code_of[exp], escape)[reaches]
        counts = np.bincount(tile_of[reaches], minlength=tiles)
        groups = (counts + 7) // 8  # each tile padded to whole groups of 8 entries
        starts = np.concatenate([[0], np.cumsum(groups)]).astype(np.int64)
        if level > 0:
            offsets[:, level - 1] = starts
        # entry slot = tile start + rank of the value among this tile's entries
        rank = np.arange(len(codes)) - np.concatenate([[0], np.cumsum(counts)])[tile_of[reaches]]
        slot = starts[tile_of[reaches]] * 8 + rank
        stream = np.zeros(int(starts[-1]) * 8, np.int64)
        stream[slot] = codes
        sections[f"level{level}"] = pack(stream, w)
    sections["offsets"] = offsets
    sections["patch_idx"] = patch_idx
    sections["patch_val"] = patch_val
    return tuple(widths), bool(has_raw), symbols.astype(np.uint8), sections


# --- decode --------------------------------------------------------------------------------

def decode_into(ct, out_bits: np.ndarray) -> None:
    try:
        decode(ct.header, ct.np_sections(), out_bits)
    except FormatError as e:
        raise FormatError(f"{ct.label}: {e}") from None


def decode(header, sections: dict, out_bits: np.ndarray) -> None:
    """Write the bit patterns of ``header.numel`` values into ``out_bits`` (1-D, the dtype's uint)."""
    layout = spec.LAYOUTS[header.dtype]
    n, tile, keep = header.numel, header.tile, header.mantissa_bits
    all_widths = spec.level_widths(header.widths, header.has_raw, layout.exp_bits)
    spec.check_tables(n, tile, all_widths, keep, layout, sections)  # no IndexError below
    if len(out_bits) < n:
        raise ValueError(f"out_bits holds {len(out_bits)} values, the tensor {n}")
    exp = np.zeros(n, np.int64)
    open_ = np.ones(n, bool)  # values whose exponent is not yet resolved
    tile_of = np.arange(n, dtype=np.int64) // tile
    symbols = np.asarray(header.symbols, np.int64)
    first_symbol = 0
    for level, w in enumerate(all_widths):
        idx = np.flatnonzero(open_)
        if level == 0:
            slot = idx
        else:
            counts = np.bincount(tile_of[idx], minlength=spec.n_tiles(n, tile))
            rank = np.arange(len(idx)) - np.concatenate([[0], np.cumsum(counts)])[tile_of[idx]]
            col = sections["offsets"][:, level - 1].astype(np.int64)
            room = (col[1:] - col[:-1])[tile_of[idx]] * 8
            if (rank >= room).any():
                raise FormatError(f"level {level}: a tile holds more escapes than its offsets allow")
            slot = col[tile_of[idx]] * 8 + rank
            if len(slot) and spec.packed_nbytes(int(slot.max()) + 1, w) > len(sections[f"level{level}"]):
                raise FormatError(f"level {level}: offsets point past the stream")
        codes = unpack(sections[f"level{level}"], slot, w)
        is_raw = header.has_raw and level == len(all_widths) - 1
        if is_raw:
            exp[idx] = codes
            open_[idx] = False
            break
        hit = codes != (1 << w) - 1
        if (first_symbol + codes[hit] >= len(symbols)).any():
            raise FormatError(f"level {level}: a code names no symbol")
        exp[idx[hit]] = symbols[first_symbol + codes[hit]]
        open_[idx[hit]] = False
        first_symbol += (1 << w) - 1
    if open_.any():
        raise FormatError("an escape at the last level, which has no next level")
    sm = unpack(sections["sm"], np.arange(n), spec.sm_width(keep))
    drop = layout.man_bits - keep
    sign = sm >> keep
    man = (sm & ((1 << keep) - 1)) << drop
    bits = (sign << (layout.total_bits - 1)) | (exp << layout.man_bits) | man
    out_bits[:n] = bits.astype(layout.uint)
    out_bits[sections["patch_idx"]] = sections["patch_val"]
