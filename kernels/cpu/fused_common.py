"""What the two fused CPU kernels (``fused``: any cascade; ``fused_w4``: the 4-bit window code) share:
widening bf16/fp16/fp32 bits to float32 (exact), the output rounding (float32 to the output
dtype's bits, nearest even, NaN canonical) and prefetching a byte range. Apart from both so that
neither imports the other (``fused`` dispatches to ``fused_w4``)."""
from __future__ import annotations

import numpy as np
from numba import njit

from .common import _OPTS
from .intrinsics import _prefetch

_F16_SUB = np.float32(2.0 ** -24)


@njit(**_OPTS)
def _widen(kind, buf, cnt, wf, wu):
    """Bits buf[:cnt] of the weight dtype as float32 values in wf[:cnt] (wu: wf's bits)."""
    if kind == 0:
        for i in range(cnt):
            wu[i] = np.uint32(buf[i]) << np.uint32(16)
    elif kind == 2:
        for i in range(cnt):
            wu[i] = np.uint32(buf[i])
    else:
        for i in range(cnt):
            h = np.int64(buf[i])
            s = (h & 0x8000) << 16
            e = (h >> 10) & 31
            m = h & 0x3FF
            if e == 0:  # zero or subnormal: m * 2**-24, exact in float32
                v = np.float32(m) * _F16_SUB
                wf[i] = -v if s else v
            elif e == 31:
                wu[i] = np.uint32(s | 0x7F800000 | (m << 13))
            else:
                wu[i] = np.uint32(s | ((e + 112) << 23) | (m << 13))


@njit(**_OPTS)
def _round_bits(z, okind, tmp, tmpu):
    """Step 5: a float32 to the output dtype's bits, nearest even, NaN canonical."""
    tmp[0] = z
    u = np.int64(tmpu[0])
    a = u & 0x7FFFFFFF
    if okind == 2:
        return np.int64(0x7FC00000) if a > 0x7F800000 else u
    if okind == 0:
        if a > 0x7F800000:
            return np.int64(0x7FC0)
        return (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    # float16
    if a > 0x7F800000:
        return np.int64(0x7E00)
    s = (u >> 16) & 0x8000
    if a >= 0x477FF000:  # >= 65520 rounds to inf
        return s | 0x7C00
    if a >= 0x38800000:  # a normal half: rebias the exponent, round off 13 bits
        r = a - 0x38000000
        return s | ((r + 0xFFF + ((r >> 13) & 1)) >> 13)
    e = a >> 23
    if e < 102:  # below 2**-25: rounds to zero (2**-25 itself is a tie, to even zero)
        return s
    m = (a & 0x7FFFFF) | 0x800000
    sh = 126 - e  # the value in units of 2**-24 is m >> sh
    q = m >> sh
    rem = m & ((np.int64(1) << sh) - 1)
    half = np.int64(1) << (sh - 1)
    q += np.int64(rem > half) | (np.int64(rem == half) & (q & 1))
    return s | q


@njit(**_OPTS)
def _prefetch_bytes(st, b0, nb):
    """Prefetch bytes [b0, b0 + nb) of a byte stream, a cache line at a time."""
    for b in range(b0, b0 + nb, 64):
        _prefetch(st, b)


@njit(**_OPTS)
def _inputs(xkind, xbits, xf, xfu, bkind, bbits, bf, bfu):
    """x and the bias as float32 (exact), once per call, before the chunks run."""
    _widen(xkind, xbits, len(xf), xf, xfu)
    if len(bf):
        _widen(bkind, bbits, len(bf), bf, bfu)
