"""zlib's CRC-32 (bit-reflected polynomial 0xEDB88320, initial and final XOR 0xFFFFFFFF) of a
uint8 array, by carry-less multiplication: four 128-bit lanes folded 64 bytes at a time
(VPCLMULQDQ on a 512-bit register where present, else 64-bit PCLMULQDQ), then one lane 16
bytes at a time, the rest through the byte table. ``crc32`` is ``zlib.crc32`` for any input
(zlib itself without PCLMULQDQ and for short, non-uint8 or non-contiguous buffers); the
encoder's ``_crc32_any`` gives the value the header's ``crc32`` field holds for the whole blob
(every section and its zero padding). It reads bytes only: no stream layout here.
"""
from __future__ import annotations

import zlib

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .common import _OPTS
from .intrinsics import _HAS_PCLMUL, _HAS_VPCLMUL, _elem_ptr, _ld64, _ldel


@intrinsic
def _clmul(typingctx, a, b):
    """The 128-bit carry-less product of two 64-bit words (PCLMULQDQ), as (low, high) int64."""
    sig = types.UniTuple(types.int64, 2)(types.int64, types.int64)

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        v2 = ir.VectorType(i64, 2)
        fnty = ir.FunctionType(v2, [v2, v2, ir.IntType(8)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.pclmulqdq")
        zero = ir.Constant(v2, None)
        va = builder.insert_element(zero, args[0], ir.Constant(ir.IntType(32), 0))
        vb = builder.insert_element(zero, args[1], ir.Constant(ir.IntType(32), 0))
        p = builder.call(fn, [va, vb, ir.Constant(ir.IntType(8), 0)])
        lo = builder.extract_element(p, ir.Constant(ir.IntType(32), 0))
        hi = builder.extract_element(p, ir.Constant(ir.IntType(32), 1))
        return context.make_tuple(builder, sig.return_type, (lo, hi))
    return sig, codegen


def _crc_table() -> np.ndarray:
    tab = np.zeros(256, np.int64)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (0xEDB88320 if c & 1 else 0)
        tab[i] = c
    return tab


_CRC_TAB = _crc_table()
# Folding constants of the bit-reflected CRC-32 polynomial (as in Linux's crc32-pclmul and
# zlib-ng): x^(512+32), x^(512-32) mod P (fold 64 bytes ahead) and x^(128+32), x^(128-32)
# mod P (16 bytes ahead), bit-reflected and shifted for PCLMULQDQ.
_K512_LO, _K512_HI = 0x154442BD4, 0x1C6E41596
_K128_LO, _K128_HI = 0x1751997D0, 0xCCAA009E


@intrinsic
def _fold512_blocks(typingctx, buf, c, nblocks):
    """The four 128-bit lanes of ``buf[0:64]`` (``c`` XORed into the first 8 bytes), folded
    over the next ``nblocks`` 64-byte blocks, all four lanes at once in one 512-bit register
    (two VPCLMULQDQ per block). Returns the lanes as eight int64 (low, high of each)."""
    if not isinstance(buf, types.Array):
        return None
    sig = types.UniTuple(types.int64, 8)(buf, types.int64, types.int64)

    def codegen(context, builder, sig, args):
        i32, i64 = ir.IntType(32), ir.IntType(64)
        v8 = ir.VectorType(i64, 8)
        fnty = ir.FunctionType(v8, [v8, v8, ir.IntType(8)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.pclmulqdq.512")
        kvec = ir.Constant(v8, [_K512_LO, _K512_HI] * 4)
        base = builder.bitcast(_elem_ptr(context, builder, sig.args[0], args[0],
                                         ir.Constant(i64, 0), types.int64), ir.IntType(8).as_pointer())

        def block(i):
            p = builder.gep(base, [builder.mul(i, ir.Constant(i64, 64))])
            return builder.load(builder.bitcast(p, v8.as_pointer()), align=1)
        first = block(ir.Constant(i64, 0))
        lane0 = builder.xor(builder.extract_element(first, ir.Constant(i32, 0)), args[1])
        state = cgutils.alloca_once_value(builder, builder.insert_element(first, lane0, ir.Constant(i32, 0)))
        with cgutils.for_range(builder, args[2]) as loop:
            x = builder.load(state)
            lo = builder.call(fn, [x, kvec, ir.Constant(ir.IntType(8), 0x00)])
            hi = builder.call(fn, [x, kvec, ir.Constant(ir.IntType(8), 0x11)])
            d = block(builder.add(loop.index, ir.Constant(i64, 1)))
            builder.store(builder.xor(builder.xor(lo, hi), d), state)
        x = builder.load(state)
        parts = [builder.extract_element(x, ir.Constant(i32, k)) for k in range(8)]
        return context.make_tuple(builder, sig.return_type, parts)
    return sig, codegen


@njit(**_OPTS)
def _fold(lo, hi, klo, khi):
    """A 128-bit lane moved 512 or 128 bits ahead: lo * klo ^ hi * khi, carry-less."""
    a0, a1 = _clmul(lo, klo)
    b0, b1 = _clmul(hi, khi)
    return a0 ^ b0, a1 ^ b1


@njit(**_OPTS)
def _crc32_nb(buf, crc, tab):
    """zlib.crc32(buf, crc) for len(buf) >= 64: four 128-bit lanes folded 64 bytes at a time,
    then into one lane, then 16 bytes at a time; the last lane and the tail go bytewise through
    the table (the fold keeps the raw CRC of "lane + rest" equal to that of the message)."""
    n = len(buf)
    c = (crc ^ 0xFFFFFFFF) & 0xFFFFFFFF
    x0, x1 = _ld64(buf, 0) ^ c, _ld64(buf, 8)
    x2, x3 = _ld64(buf, 16), _ld64(buf, 24)
    x4, x5 = _ld64(buf, 32), _ld64(buf, 40)
    x6, x7 = _ld64(buf, 48), _ld64(buf, 56)
    p = 64
    if _HAS_VPCLMUL:
        nblocks = n // 64 - 1
        x0, x1, x2, x3, x4, x5, x6, x7 = _fold512_blocks(buf, c, nblocks)
        p = 64 * (nblocks + 1)
    while p + 64 <= n:
        y0, y1 = _fold(x0, x1, _K512_LO, _K512_HI)
        y2, y3 = _fold(x2, x3, _K512_LO, _K512_HI)
        y4, y5 = _fold(x4, x5, _K512_LO, _K512_HI)
        y6, y7 = _fold(x6, x7, _K512_LO, _K512_HI)
        x0, x1 = y0 ^ _ld64(buf, p), y1 ^ _ld64(buf, p + 8)
        x2, x3 = y2 ^ _ld64(buf, p + 16), y3 ^ _ld64(buf, p + 24)
        x4, x5 = y4 ^ _ld64(buf, p + 32), y5 ^ _ld64(buf, p + 40)
        x6, x7 = y6 ^ _ld64(buf, p + 48), y7 ^ _ld64(buf, p + 56)
        p += 64
    y0, y1 = _fold(x0, x1, _K128_LO, _K128_HI)
    x0, x1 = y0 ^ x2, y1 ^ x3
    y0, y1 = _fold(x0, x1, _K128_LO, _K128_HI)
    x0, x1 = y0 ^ x4, y1 ^ x5
    y0, y1 = _fold(x0, x1, _K128_LO, _K128_HI)
    x0, x1 = y0 ^ x6, y1 ^ x7
    while p + 16 <= n:
        y0, y1 = _fold(x0, x1, _K128_LO, _K128_HI)
        x0, x1 = y0 ^ _ld64(buf, p), y1 ^ _ld64(buf, p + 8)
        p += 16
    r = np.int64(0)
    for j in range(16):
        byte = (x0 >> (8 * j)) if j < 8 else (x1 >> (8 * (j - 8)))
        r = _ldel(tab, (r ^ byte) & 0xFF) ^ (r >> 8)
    for j in range(p, n):
        r = _ldel(tab, (r ^ _ldel(buf, j)) & 0xFF) ^ (r >> 8)
    return (r ^ 0xFFFFFFFF) & 0xFFFFFFFF


@njit(**_OPTS)
def _crc32_any(buf, crc, tab):
    """zlib.crc32(buf, crc) of any length (bytewise below 64 bytes)."""
    if _HAS_PCLMUL and len(buf) >= 64:
        return _crc32_nb(buf, crc, tab)
    r = (crc ^ 0xFFFFFFFF) & 0xFFFFFFFF
    for j in range(len(buf)):
        r = _ldel(tab, (r ^ _ldel(buf, j)) & 0xFF) ^ (r >> 8)
    return (r ^ 0xFFFFFFFF) & 0xFFFFFFFF


def crc32(buf: np.ndarray, crc: int = 0) -> int:
    """``zlib.crc32(buf, crc)`` of a contiguous uint8 array, several times faster (PCLMULQDQ)."""
    if not _HAS_PCLMUL or len(buf) < 64 or buf.dtype != np.uint8 or not buf.flags.c_contiguous:
        return zlib.crc32(buf, crc)
    return int(_crc32_nb(buf, crc, _CRC_TAB))
