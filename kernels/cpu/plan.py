"""The encoder's plan, compiled: from the per-tile exponent histogram to the codebook, the
code tables and the tile offsets (everything between the histogram and the stream writes).

``_choose_cascade_nb`` / ``choose_cascade`` are exact replicas of ``spec.choose_cascade`` (same
candidates, order, cost and tie-break) and ``_plan`` of ``spec.symbol_order`` and
``reference.code_tables``. What they give the stream writers, in spec's terms:
  * ``CT[l * 256 + e]``: the ``w_l``-bit code of exponent ``e`` at level ``l`` (the escape code
    ``2**w_l - 1`` when ``e`` is coded deeper; the exponent itself on the raw level), plus
    ``1 << 16`` when ``e`` escapes past level ``l``;
  * ``SYM[3 * l + j]``: symbol ``j`` of a level of width 1 or 2 (0x100, no exponent, if unused);
  * ``offsets[t, l - 1]``: where tile ``t`` starts in level ``l >= 1``, in groups of 8 entries
    (each tile's entries of a level padded to a multiple of 8), and each level's size in bytes
    (its groups * ``w_l``, plus ``STREAM_PAD``; level 0: ``ceil(n / 8)`` groups).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .. import spec
from .common import _NLEV


@njit(cache=True, nogil=True)
def _choose_cascade_nb(counts, exp_bits, tile, max_levels, max_width):
    """Same candidates, same order, same cost and same tie-break as ``spec.choose_cascade``.

    The candidates of m levels are visited in itertools.product order by an odometer that keeps
    the cost of every prefix (bits, values entering the next level, symbols used), so a step
    recomputes only the levels from the digit that changed (and no divisions)."""
    nc = len(counts)
    pre = np.zeros(nc + 1, np.int64)
    for i in range(nc):
        pre[i + 1] = pre[i] + counts[i]
    n = pre[nc]
    tiles = (n + tile - 1) // tile
    max_w = min(max_width, exp_bits)
    best_cost = np.int64(-1)
    best_m = 0
    best_raw = False
    best_w = np.zeros(max_levels, np.int64)
    widths = np.ones(max_levels, np.int64)
    # state before level j: bits_at[j], entering_at[j], used_at[j]
    bits_at = np.zeros(max_levels + 1, np.int64)
    entering_at = np.zeros(max_levels + 1, np.int64)
    used_at = np.zeros(max_levels + 1, np.int64)
    entering_at[0] = n
    for m in range(max_levels + 1):
        for j in range(m):
            widths[j] = 1
        dirty = 0  # first level whose prefix state is stale
        while True:
            pruned = -1
            for j in range(dirty, m):
                w = widths[j]
                entering = entering_at[j]
                used = used_at[j]
                cap = (1 << w) - 1
                hi = min(used + cap, nc)
                lo = min(used, nc)
                bits_at[j + 1] = bits_at[j] + entering * w + tiles * 4 * w
                entering_at[j + 1] = entering - (pre[hi] - pre[lo])
                used_at[j + 1] = used + cap
                if best_cost >= 0 and bits_at[j + 1] >= best_cost:
                    pruned = j  # every cost only adds: no candidate with this prefix can win
                    break
            if pruned < 0:
                bits = bits_at[m]
                entering = entering_at[m]
                levels = m
                has_raw = entering > 0
                if has_raw:
                    bits += entering * exp_bits + tiles * 4 * exp_bits
                    levels += 1
                bits += tiles * 32 * max(levels - 1, 0)
                if best_cost < 0 or bits < best_cost:
                    best_cost = bits
                    best_m = m
                    best_raw = has_raw
                    for j in range(m):
                        best_w[j] = widths[j]
                j = m - 1
            else:
                j = pruned
            # next candidate: increment digit j (the last, or the pruned one), carrying leftwards
            for k in range(j + 1, m):
                widths[k] = 1
            while j >= 0 and widths[j] == max_w:
                widths[j] = 1
                j -= 1
            if j < 0:
                break
            widths[j] += 1
            dirty = j
    return best_w[:best_m].copy(), best_raw


def choose_cascade(hist: np.ndarray, exp_bits: int, tile: int) -> tuple[tuple[int, ...], bool]:
    """``spec.choose_cascade``, compiled (the readable one costs ~5 ms per tensor)."""
    counts = np.sort(hist[hist > 0])[::-1].astype(np.int64)
    if counts.sum() == 0:
        return (), False
    w, raw = _choose_cascade_nb(counts, exp_bits, tile, spec.MAX_LEVELS, spec.MAX_WIDTH)
    return tuple(int(x) for x in w), bool(raw)


@njit(cache=True, nogil=True)
def _plan(th, n, tile, exp_bits, max_levels, max_width, forced):
    """Everything between the histogram and the stream writes, in one compiled call:
    spec.choose_cascade (or, when ``forced[0]`` is 1, the widths ``forced[1:]`` with a raw level
    added when they cannot name every exponent present: ``spec.forced_cascade``), spec.symbol_order,
    reference.code_tables, the per-level code tables and the tile offsets. Returns (widths,
    has_raw, symbols, L, W, CT, SYM, offsets, sizes)."""
    tiles = th.shape[0]
    nsym = th.shape[1]
    hist = np.zeros(nsym, np.int64)
    for t in range(tiles):
        for e in range(nsym):
            hist[e] += th[t, e]
    npres = 0
    for e in range(nsym):
        npres += hist[e] > 0
    # present exponents, most frequent first, ties by smaller exponent (spec.symbol_order)
    keys = np.empty(npres, np.int64)
    j = 0
    for e in range(nsym):
        if hist[e] > 0:
            keys[j] = (n - hist[e]) * 1024 + e
            j += 1
    keys.sort()
    order = keys & 1023
    counts = np.empty(npres, np.int64)
    for j in range(npres):
        counts[j] = hist[order[j]]
    if npres and forced[0] == 1:
        widths = forced[1:].copy()
        fcap = 0
        for w in widths:
            fcap += (1 << w) - 1
        has_raw = npres > fcap
    elif npres:
        widths, has_raw = _choose_cascade_nb(counts, exp_bits, tile, max_levels, max_width)
    else:
        widths, has_raw = np.zeros(0, np.int64), False
    m = len(widths)
    cap = 0
    for w in widths:
        cap += (1 << w) - 1
    symbols = order[:min(cap, npres)].copy()
    L = m + (1 if has_raw else 0)
    W = np.zeros(_NLEV, np.int64)
    for l in range(m):
        W[l] = widths[l]
    if has_raw:
        W[m] = exp_bits
    # reference.code_tables: level and code of every exponent (raw: the exponent itself)
    LV = np.full(nsym, m, np.int64)
    CO = np.arange(nsym)
    first = 0
    for l in range(m):
        c = (1 << widths[l]) - 1
        for k in range(c):
            if first + k < len(symbols):
                LV[symbols[first + k]] = l
                CO[symbols[first + k]] = k
        first += c
    CT = np.zeros(_NLEV * 256, np.int64)
    for l in range(L):
        esc = (1 << W[l]) - 1
        for e in range(nsym):
            code = CO[e] if LV[e] == l else esc
            CT[l * 256 + e] = code | ((1 << 16) if LV[e] > l else 0)
    # SYM[3 * l + j]: symbol j of a level of width <= 2 (0x100, no exponent, where unused)
    SYM = np.full(_NLEV * 3, 0x100, np.int64)
    first = 0
    for l in range(m):
        c = (1 << widths[l]) - 1
        if widths[l] <= 2:
            for k in range(c):
                if first + k < len(symbols):
                    SYM[3 * l + k] = symbols[first + k]
        first += c
    off, totals = _plan_offsets(th, LV, L, tile, n)
    sizes = np.zeros(L, np.int64)
    for l in range(L):
        sizes[l] = totals[l] * W[l] + 8  # STREAM_PAD
    return widths, has_raw, symbols, L, W, CT, SYM, off, sizes


@njit(cache=True, nogil=True)
def _plan_offsets(th, LV, L, tile, n):
    """Per-tile entry counts of every level -> offsets (groups of 8) and each level's total groups."""
    tiles = th.shape[0]
    nsym = th.shape[1]
    off = np.zeros((tiles + 1, max(L - 1, 0)), np.uint32)
    totals = np.zeros(L, np.int64)
    cnt = np.zeros(L + 1, np.int64)
    run = np.zeros(L, np.int64)
    for t in range(tiles):
        for l in range(L + 1):
            cnt[l] = 0
        for e in range(nsym):
            c = th[t, e]
            if c:
                cnt[LV[e]] += c
        acc = 0
        for l in range(L - 1, -1, -1):  # entries reaching level l = resolved at l or deeper
            acc += cnt[l]
            if l > 0:
                run[l] += (acc + 7) // 8
                off[t + 1, l - 1] = run[l]
    for l in range(1, L):
        totals[l] = run[l]
    totals[0] = (n + 7) // 8
    return off, totals
