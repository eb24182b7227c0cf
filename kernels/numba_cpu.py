"""numba CPU backend: the stream layout of ``spec`` / ``reference``, fast.

Same two entry points as ``reference``: ``encode`` (bytes identical to ``reference.encode``) and
``decode_into`` (bits identical to ``reference.decode``). Kernels are ``nogil`` and run in parallel
over tiles; they compile on first call (and are cached on disk), never at import of ``nzrt``.

Decoding a tile, in three steps and without any scratch memory:
  1. top-down, count the escapes of every level within the tile (popcounts for 1- and 2-bit
     levels), which gives each deeper level's entry count; check it against the tile's offsets;
  2. bottom-up, decode the deepest level into the *tail* of the tile's own output slots, then
     merge each shallower level with the list below it (a code picks its symbol, an escape takes
     the next list entry: a branchless cursor), again into the tail;
  3. level 0 merges with the level-1 list and the sign/mantissa stream into the final bits.
A list of ``k`` entries lives in the last ``k`` slots of the tile; the merge reads slot
``end - (escapes left)`` and writes slot ``end - (entries left)``, so it never overwrites an
entry it still has to read. Levels whose codes for one 64-bit word of output (4 values of
bf16/fp16, 2 of fp32) fit in a byte are decoded a word at a time: the chunk of codes selects
the symbols of its non-escape lanes, its escape lanes and their count from a small table, and
PDEP drops the next list entries into the escape lanes (and, on level 0, the sign/mantissa bits
into place); the rest go one entry at a time with a branchless cursor (a real CMOV).

Encoding is one compiled call on one thread (``_encode_ser``; four with threads) that writes
the blob ``CompressedTensor`` holds, sections in place, and its CRC-32:
  1. the exponent histogram, per tile: exponents as bytes, then, 64 at a time, an AVX-512 byte
     compare and a popcount for each of 15 exponents guessed from a sample (the rare others
     one at a time; exact whatever the guess);
  2. the plan: ``spec.choose_cascade`` / ``spec.symbol_order`` (exact compiled replicas), code
     tables, tile offsets, hence every section's size and the blob's layout;
  3. per tile: the sign/mantissa bytes; a level of width 1 or 2 codes 64 entries at a time (byte
     compares give the masks of its <= 3 symbols, PDEP interleaves them into 2-bit codes,
     VPCOMPRESSB packs the escaping exponents for the next level); wider levels use a bit writer;
  4. zlib's CRC-32 of the blob, by carry-less multiplication (VPCLMULQDQ), ~30 GB/s.
Without AVX-512 (VBMI2) the same bytes come from portable loops (three compares per entry, PEXT
per 8 entries; a 4-way scalar histogram; 64-bit PCLMULQDQ).
Errors (more escapes than the offsets allow, a code that names no symbol, offsets past a stream,
a patch index out of range) come back as flags and raise ``FormatError`` in Python.
"""
from __future__ import annotations

import functools
import os
import zlib

import numpy as np
import numba
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import spec
from .spec import FloatLayout, FormatError

_OPTS = dict(cache=True, nogil=True, error_model="numpy", boundscheck=False)
_NLEV = spec.MAX_LEVELS + 1  # coded levels plus the raw one
_NCODE = 256  # widest level: the raw exponent byte


# --- intrinsics: unaligned loads/stores, popcount, pdep -------------------------------------

def _elem_ptr(context, builder, aryty, ary, idx, idxty):
    a = context.make_array(aryty)(context, builder, ary)
    i = context.cast(builder, idx, idxty, types.intp)
    return builder.gep(a.data, [i])


def _make_load(bits):
    @intrinsic
    def load(typingctx, arr, idx):
        """``bits``-bit little-endian word at element ``idx`` of ``arr`` (unaligned), as int64."""
        if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
            return None
        sig = types.int64(arr, idx)

        def codegen(context, builder, sig, args):
            ptr = _elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
            p = builder.bitcast(ptr, ir.IntType(bits).as_pointer())
            v = builder.load(p, align=1)
            return v if bits == 64 else builder.zext(v, ir.IntType(64))
        return sig, codegen
    return load


def _make_store(bits):
    @intrinsic
    def store(typingctx, arr, idx, val):
        """Store the low ``bits`` bits of ``val`` at element ``idx`` of ``arr`` (unaligned)."""
        if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
            return None
        sig = types.void(arr, idx, types.int64)

        def codegen(context, builder, sig, args):
            ptr = _elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
            p = builder.bitcast(ptr, ir.IntType(bits).as_pointer())
            v = args[2] if bits == 64 else builder.trunc(args[2], ir.IntType(bits))
            builder.store(v, p, align=1)
            return context.get_dummy_value()
        return sig, codegen
    return store


@intrinsic
def _ldel(typingctx, arr, idx):
    """arr[idx] as int64, without negative-index wraparound (the caller keeps idx in range)."""
    if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
        return None
    sig = types.int64(arr, idx)

    def codegen(context, builder, sig, args):
        ptr = _elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        v = builder.load(ptr)
        dt = sig.args[0].dtype
        if dt.bitwidth == 64:
            return v
        return builder.sext(v, ir.IntType(64)) if dt.signed else builder.zext(v, ir.IntType(64))
    return sig, codegen


@intrinsic
def _stel(typingctx, arr, idx, val):
    """arr[idx] = low bits of val, without negative-index wraparound."""
    if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
        return None
    sig = types.void(arr, idx, types.int64)

    def codegen(context, builder, sig, args):
        ptr = _elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        bw = sig.args[0].dtype.bitwidth
        v = args[2] if bw == 64 else builder.trunc(args[2], ir.IntType(bw))
        builder.store(v, ptr)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def _cmov(typingctx, cond, a, b):
    """``a if cond != 0 else b`` as a real CMOV (LLVM would otherwise turn a select whose operand
    is a load back into an unpredictable branch)."""
    sig = types.int64(types.int64, types.int64, types.int64)

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        fnty = ir.FunctionType(i64, [i64, i64, i64])
        return builder.asm(fnty, "testq $1, $1\n\tcmovneq $2, $0",
                           "=r,r,r,0,~{flags}", args, side_effect=False)
    return sig, codegen


_ld64 = _make_load(64)
_ld32 = _make_load(32)
_st64 = _make_store(64)
_st32 = _make_store(32)
_st16 = _make_store(16)


@intrinsic
def _popc(typingctx, x):
    sig = types.int64(types.int64)

    def codegen(context, builder, sig, args):
        return builder.ctpop(args[0])
    return sig, codegen


def _pdep_soft(x, m):
    r = np.int64(0)
    bit = np.int64(1)
    while m != 0:
        low = m & -m
        if x & bit:
            r |= low
        m &= m - 1
        bit <<= 1
    return r


# NZRT_NUMBA_NO_AVX512=1 compiles the portable paths (for tests; use a fresh NUMBA_CACHE_DIR)
_NO_AVX512 = os.environ.get("NZRT_NUMBA_NO_AVX512") == "1"


def _host_has(feature: str) -> bool:
    if _NO_AVX512 and (feature.startswith("avx512") or feature == "vpclmulqdq"):
        return False
    try:
        import llvmlite.binding as llvm
        return bool(llvm.get_host_cpu_features().get(feature, False))
    except Exception:  # pragma: no cover - exotic llvmlite builds
        return False


_HAS_BMI2 = _host_has("bmi2")
_HAS_PCLMUL = _host_has("pclmul")


def _init_asm_parser() -> None:
    """The JIT must parse the inline assembly of ``_cmov``."""
    import llvmlite.binding as llvm
    try:
        llvm.initialize_native_asmparser()
    except Exception:  # pragma: no cover - newer llvmlite initialises everything itself
        pass


_init_asm_parser()


def _pext_soft(x, m):
    r = np.int64(0)
    bit = np.int64(1)
    while m != 0:
        low = m & -m
        if x & low:
            r |= bit
        m &= m - 1
        bit <<= 1
    return r


@intrinsic
def _pext(typingctx, x, m):
    """Parallel bit extract (BMI2 PEXT; a loop where the CPU lacks it)."""
    sig = types.int64(types.int64, types.int64)

    def codegen(context, builder, sig, args):
        if _HAS_BMI2:
            fnty = ir.FunctionType(ir.IntType(64), [ir.IntType(64), ir.IntType(64)])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.bmi.pext.64")
            return builder.call(fn, args)
        return context.compile_internal(builder, _pext_soft, sig, args)
    return sig, codegen


@intrinsic
def _pdep(typingctx, x, m):
    """Parallel bit deposit (BMI2 PDEP; a loop where the CPU lacks it)."""
    sig = types.int64(types.int64, types.int64)

    def codegen(context, builder, sig, args):
        if _HAS_BMI2:
            fnty = ir.FunctionType(ir.IntType(64), [ir.IntType(64), ir.IntType(64)])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.bmi.pdep.64")
            return builder.call(fn, args)
        return context.compile_internal(builder, _pdep_soft, sig, args)
    return sig, codegen


_HAS_VBMI2 = _host_has("avx512bw") and _host_has("avx512vbmi2")


def _eqmask64_soft(arr, idx, s):
    m = np.int64(0)
    for j in range(64):
        m |= np.int64(arr[idx + j] == s) << j
    return m


@intrinsic
def _eqmask64(typingctx, arr, idx, s):
    """Bit j set where byte ``arr[idx + j] == s``, j < 64 (one AVX-512 compare); reads 64 bytes."""
    if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
        return None
    sig = types.int64(arr, idx, types.int64)

    def codegen(context, builder, sig, args):
        if not _HAS_VBMI2:
            return context.compile_internal(builder, _eqmask64_soft, sig, args)
        v64 = ir.VectorType(ir.IntType(8), 64)
        ptr = _elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        v = builder.load(builder.bitcast(ptr, v64.as_pointer()), align=1)
        sb = builder.trunc(args[2], ir.IntType(8))
        splat = builder.insert_element(ir.Constant(v64, None), sb, ir.Constant(ir.IntType(32), 0))
        zeros32 = ir.Constant(ir.VectorType(ir.IntType(32), 64), [0] * 64)
        splat = builder.shuffle_vector(splat, ir.Constant(v64, None), zeros32)
        eq = builder.icmp_unsigned("==", v, splat)
        return builder.bitcast(eq, ir.IntType(64))
    return sig, codegen


def _compress64_soft(src, idx, mask, dst, didx):
    c = didx
    for j in range(64):
        if (mask >> j) & 1:
            dst[c] = src[idx + j]
            c += 1


@intrinsic
def _compress64(typingctx, src, idx, mask, dst, didx):
    """The bytes ``src[idx + j]`` whose mask bit j is set, packed to ``dst[didx:]`` (VPCOMPRESSB
    in a register, then one 64-byte store: 64 bytes of ``dst`` must be writable)."""
    if not isinstance(src, types.Array) or not isinstance(dst, types.Array):
        return None
    sig = types.void(src, idx, types.int64, dst, didx)

    def codegen(context, builder, sig, args):
        if not _HAS_VBMI2:
            return context.compile_internal(builder, _compress64_soft, sig, args)
        v64 = ir.VectorType(ir.IntType(8), 64)
        ptr = _elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        v = builder.load(builder.bitcast(ptr, v64.as_pointer()), align=1)
        m = builder.bitcast(args[2], ir.VectorType(ir.IntType(1), 64))
        fnty = ir.FunctionType(v64, [v64, v64, ir.VectorType(ir.IntType(1), 64)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.mask.compress.v64i8")
        packed = builder.call(fn, [v, ir.Constant(v64, None), m])
        dptr = _elem_ptr(context, builder, sig.args[3], args[3], args[4], sig.args[4])
        builder.store(packed, builder.bitcast(dptr, v64.as_pointer()), align=1)
        return context.get_dummy_value()
    return sig, codegen


def _vec_splat(builder, vty, val):
    v = builder.insert_element(ir.Constant(vty, None), val, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, ir.Constant(vty, None),
                                  ir.Constant(ir.VectorType(ir.IntType(32), vty.count), [0] * vty.count))


def _make_bytes(kind):
    @intrinsic
    def to_bytes(typingctx, src, i, dst, j, sh):
        """Packed bytes for a vector of values at ``src[i]``, stored at ``dst[j]``; explicit
        narrow lanes (numba's own loops would widen every value to 64 bits):
          "exp16": 32 16-bit values -> 32 exponent bytes ``(v >> sh) & 0xff``;
          "exp32": 16 32-bit values -> 16 exponent bytes ``(v >> sh) & 0xff``;
          "sm16": 32 lossless bf16 -> 32 bytes of sign and mantissa ``(v >> 8) & 0x80 | v & 0x7f``;
          "sm32": 16 lossless fp32 -> 48 bytes, 3 per value: ``(v >> 8) & 0x800000 | v & 0x7fffff``."""
        if not isinstance(src, types.Array) or not isinstance(dst, types.Array):
            return None
        sig = types.void(src, i, dst, j, types.int64)

        def codegen(context, builder, sig, args):
            bits, lanes = (16, 32) if kind.endswith("16") else (32, 16)
            vin = ir.VectorType(ir.IntType(bits), lanes)
            const = lambda x: ir.Constant(vin, [x] * lanes)  # noqa: E731
            ptr = _elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
            v = builder.load(builder.bitcast(ptr, vin.as_pointer()), align=1)
            if kind.startswith("exp"):
                sh = _vec_splat(builder, vin, builder.trunc(args[4], ir.IntType(bits)))
                out = builder.trunc(builder.lshr(v, sh), ir.VectorType(ir.IntType(8), lanes))
            elif kind == "sm16":
                hi = builder.and_(builder.lshr(v, const(8)), const(0x80))
                out = builder.trunc(builder.or_(hi, builder.and_(v, const(0x7F))),
                                    ir.VectorType(ir.IntType(8), lanes))
            else:  # sm32: the low three bytes of every 32-bit lane, in order
                hi = builder.and_(builder.lshr(v, const(8)), const(0x800000))
                w = builder.bitcast(builder.or_(hi, builder.and_(v, const(0x7FFFFF))),
                                    ir.VectorType(ir.IntType(8), 64))
                keep = [4 * q + b for q in range(16) for b in range(3)]
                out = builder.shuffle_vector(w, ir.Constant(w.type, None),
                                             ir.Constant(ir.VectorType(ir.IntType(32), 48), keep))
            dptr = _elem_ptr(context, builder, sig.args[2], args[2], args[3], sig.args[3])
            builder.store(out, builder.bitcast(dptr, out.type.as_pointer()), align=1)
            return context.get_dummy_value()
        return sig, codegen
    return to_bytes


_exp_bytes32 = _make_bytes("exp16")
_exp_bytes16 = _make_bytes("exp32")
_bf16_sm_bytes32 = _make_bytes("sm16")
_fp32_sm_bytes48 = _make_bytes("sm32")


@njit(**_OPTS)
def _exponent_bytes(src, a, cnt, mb, emask, dst):
    """dst[j] = exponent of src[a + j], j < cnt."""
    j = 0
    if emask == 255:  # bf16, fp32: the byte above the mantissa is the exponent
        if src.itemsize == 2:
            while j + 32 <= cnt:
                _exp_bytes32(src, a + j, dst, j, mb)
                j += 32
        else:
            while j + 16 <= cnt:
                _exp_bytes16(src, a + j, dst, j, mb)
                j += 16
    for j in range(j, cnt):
        _stel(dst, j, (_ldel(src, a + j) >> mb) & emask)


# --- CRC-32 (zlib's) by carry-less multiplication ---------------------------------------------

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


_HAS_VPCLMUL = _host_has("vpclmulqdq") and _host_has("avx512f")


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


# --- the plan: an exact, fast replica of spec.choose_cascade --------------------------------

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


# --- encode kernels --------------------------------------------------------------------------

@njit(**_OPTS)
def _hist_tile(t, bits, n, tile, mb, emask, th):
    a = t * tile
    end = min(a + tile, n)
    nsym = emask + 1
    # four interleaved sub-histograms break the store-to-load chain of repeated exponents
    h4 = np.zeros(4 * nsym, np.int32)
    i = a
    if bits.itemsize == 2:
        while i + 4 <= end:
            x = _ld64(bits, i)
            e0 = (x >> mb) & emask
            e1 = (x >> (mb + 16)) & emask
            e2 = (x >> (mb + 32)) & emask
            e3 = (x >> (mb + 48)) & emask
            _stel(h4, e0, _ldel(h4, e0) + 1)
            _stel(h4, nsym + e1, _ldel(h4, nsym + e1) + 1)
            _stel(h4, 2 * nsym + e2, _ldel(h4, 2 * nsym + e2) + 1)
            _stel(h4, 3 * nsym + e3, _ldel(h4, 3 * nsym + e3) + 1)
            i += 4
    while i + 4 <= end:
        e0 = (_ldel(bits, i) >> mb) & emask
        e1 = (_ldel(bits, i + 1) >> mb) & emask
        e2 = (_ldel(bits, i + 2) >> mb) & emask
        e3 = (_ldel(bits, i + 3) >> mb) & emask
        _stel(h4, e0, _ldel(h4, e0) + 1)
        _stel(h4, nsym + e1, _ldel(h4, nsym + e1) + 1)
        _stel(h4, 2 * nsym + e2, _ldel(h4, 2 * nsym + e2) + 1)
        _stel(h4, 3 * nsym + e3, _ldel(h4, 3 * nsym + e3) + 1)
        i += 4
    while i < end:
        e = (_ldel(bits, i) >> mb) & emask
        _stel(h4, e, _ldel(h4, e) + 1)
        i += 1
    for e in range(nsym):
        th[t, e] = h4[e] + h4[nsym + e] + h4[2 * nsym + e] + h4[3 * nsym + e]


@njit(**_OPTS)
def _round_tile(t, bits, rb, n, tile, s, signbit, inf, maxfin):
    """spec.lossy_round on one tile; returns its NaN count."""
    a = t * tile
    end = min(a + tile, n)
    half = (np.int64(1) << (s - 1)) - 1
    keepmask = ~((np.int64(1) << s) - 1)
    nn = 0
    for i in range(a, end):
        b = np.int64(bits[i])
        sign = b & signbit
        mag = b ^ sign
        if mag > inf:
            r = inf
            nn += 1
        elif mag == inf:
            r = mag
        else:
            r = (mag + half + ((mag >> s) & 1)) & keepmask
            if r > maxfin:
                r = maxfin
        rb[i] = r | sign
    return nn


@njit(**_OPTS)
def _nan_fill_tile(t, bits, n, tile, inf, signbit, start, pidx, pval):
    a = t * tile
    end = min(a + tile, n)
    c = start
    for i in range(a, end):
        b = np.int64(bits[i])
        if (b & ~signbit) > inf:
            pidx[c] = i
            pval[c] = bits[i]
            c += 1


_NGUESS = 15  # top-15 exponents: 99.97% of MiniLM's values; a rare remainder keeps the
# one-at-a-time loop short and its branch predictable


@njit(**_OPTS)
def _guess_symbols(bits, n, mb, emask):
    """``_NGUESS`` distinct exponents, the most frequent in a strided sample of <= 4096 values:
    the ones ``_hist_tile_vec`` counts by compares (a guess: it decides speed, never counts)."""
    nsym = emask + 1
    h = np.zeros(nsym, np.int64)
    step = max(n // 4096, 1)
    for i in range(0, n, step):
        e = (_ldel(bits, i) >> mb) & emask
        h[e] += 1
    keys = np.empty(nsym, np.int64)
    for e in range(nsym):
        keys[e] = (n - h[e]) * 1024 + e
    keys.sort()
    return keys[:_NGUESS] & 1023


@njit(**_OPTS)
def _hist_tile_vec(t, bits, n, tile, mb, emask, th, g):
    """``_hist_tile`` with AVX-512: the tile's exponents as bytes (vectorisable), then per 64
    values a compare and a popcount for each guessed symbol g[q]; the values that match none
    are counted one at a time."""
    a = t * tile
    end = min(a + tile, n)
    cnt = end - a
    ex = np.empty(cnt + 64, np.uint8)  # 64 bytes of slack for the vector loads
    _exponent_bytes(bits, a, cnt, mb, emask, ex)
    for e in range(emask + 1):
        th[t, e] = 0
    counts = np.zeros(_NGUESS, np.int64)
    j = 0
    while j < cnt:
        rem = cnt - j
        valid = np.int64(-1) if rem >= 64 else (np.int64(1) << rem) - 1
        rest = valid
        for q in range(_NGUESS):
            m = _eqmask64(ex, j, g[q])
            counts[q] += _popc(m & valid)
            rest &= ~m
        while rest != 0:
            e = _ldel(ex, j + _popc((rest & -rest) - 1))  # the lowest set bit's value
            th[t, e] += 1
            rest &= rest - 1
        j += 64
    for q in range(_NGUESS):
        th[t, g[q]] += counts[q]


@njit(**_OPTS)
def _round_hist_tile(t, bits, rb, n, tile, lossy, s, signbit, inf, maxfin, mb, emask, th, nanc, g):
    src = bits
    if lossy:
        nanc[t] = _round_tile(t, bits, rb, n, tile, s, signbit, inf, maxfin)
        src = rb
    if _HAS_VBMI2 and emask + 1 >= _NGUESS:  # the guesses must be distinct exponents
        _hist_tile_vec(t, src, n, tile, mb, emask, th, g)
    else:
        _hist_tile(t, src, n, tile, mb, emask, th)


@njit(parallel=True, **_OPTS)
def _round_hist_par(bits, rb, n, tile, lossy, s, signbit, inf, maxfin, mb, emask, th, nanc):
    g = _guess_symbols(bits, n, mb, emask)
    for t in prange(th.shape[0]):
        _round_hist_tile(t, bits, rb, n, tile, lossy, s, signbit, inf, maxfin, mb, emask, th, nanc, g)


@njit(**_OPTS)
def _round_hist_ser(bits, rb, n, tile, lossy, s, signbit, inf, maxfin, mb, emask, th, nanc):
    g = _guess_symbols(bits, n, mb, emask)
    for t in range(th.shape[0]):
        _round_hist_tile(t, bits, rb, n, tile, lossy, s, signbit, inf, maxfin, mb, emask, th, nanc, g)


@njit(cache=True, nogil=True)
def _plan(th, n, tile, exp_bits, max_levels, max_width):
    """Everything between the histogram and the stream writes, in one compiled call:
    spec.choose_cascade, spec.symbol_order, reference.code_tables, the per-level code tables
    and the tile offsets. Returns (widths, has_raw, symbols, L, W, CT, SYM, offsets, sizes)."""
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
    if npres:
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


@njit(**_OPTS)
def _flush_bits(st, pos, acc, nb):
    while nb > 0:
        _stel(st, pos, acc & 0xFF)
        pos += 1
        acc >>= 8
        nb -= 8


@njit(**_OPTS)
def _enc_tile(t, src, n, tile, L, W, CT, SYM, mb, emask, keep, drop, tbm1, smw, sm,
              L0, L1, L2, L3, L4, off):
    """Write tile t of every stream. CT[l * 256 + e] = code of exponent e at level l, plus
    1 << 16 when e escapes past level l."""
    a = t * tile
    end = min(a + tile, n)
    cnt = end - a
    streams = (L0, L1, L2, L3, L4)
    manmask = (np.int64(1) << mb) - 1
    # sign + kept mantissa
    # the byte shortcuts are for LOSSLESS bf16/fp32 only (keep == mb): fp16 with keep == 7 also
    # has 8-bit sm entries in 16-bit values, but its kept bits are man >> 3, not man & 0x7f
    if smw == 8 and tbm1 == 15 and keep == 7 and mb == 7:  # lossless bf16: one byte per value
        i = a
        while i + 32 <= end:
            _bf16_sm_bytes32(src, i, sm, i, 0)
            i += 32
        for i in range(i, end):
            b = _ldel(src, i)
            _stel(sm, i, ((b >> 8) & 0x80) | (b & 0x7F))
    else:
        i0 = a
        if smw == 24 and tbm1 == 31 and keep == 23 and mb == 23:  # lossless fp32: three bytes per value
            while i0 + 16 <= end:
                _fp32_sm_bytes48(src, i0, sm, 3 * i0, 0)
                i0 += 16
        pos = (i0 * smw) >> 3  # i0 - a is a multiple of 8: a byte boundary
        acc = np.int64(0)
        nb = 0
        for i in range(i0, end):
            b = _ldel(src, i)
            acc |= (((b >> tbm1) << keep) | ((b & manmask) >> drop)) << nb
            nb += smw
            if nb >= 32:
                _st32(sm, pos, acc)
                pos += 4
                acc >>= 32
                nb -= 32
        _flush_bits(sm, pos, acc, nb)
    if L == 0:
        return
    # every level works on the exponents (as bytes) of the values that reach it, in order;
    # it writes its codes and compacts the escaping exponents for the next level
    cnt8 = (cnt + 7) & ~7
    cur = np.empty(cnt8 + 64, np.uint8)  # 64 bytes of slack for the vector loads and stores
    nxt = np.empty(cnt8 + 64, np.uint8)
    codes = np.empty(cnt8 + 8, np.uint8)
    _exponent_bytes(src, a, cnt, mb, emask, cur)
    k = cnt
    for l in range(L):
        w = W[l]
        st = streams[l]
        pos = (a * w) >> 3 if l == 0 else np.int64(off[t, l - 1]) * w
        if w <= 2 and _HAS_VBMI2:
            c = _code_vec(cur, k, SYM[3 * l], SYM[3 * l + 1], SYM[3 * l + 2], w, st, pos, nxt)
        elif w <= 2:
            c = _code_cmp(cur, k, SYM[3 * l], SYM[3 * l + 1], SYM[3 * l + 2], w, st, pos, codes, nxt)
        else:
            # the bit writer leaves the unused tail of the tile's last group unwritten
            for b in range(pos, pos + ((k + 7) >> 3) * w):
                _stel(st, b, 0)
            c = 0
            row = l * 256
            acc = np.int64(0)
            nb = 0
            for j in range(k):
                e = _ldel(cur, j)
                tt = _ldel(CT, row + e)
                acc |= (tt & 0xFFFF) << nb
                nb += w
                if nb >= 32:
                    _st32(st, pos, acc)
                    pos += 4
                    acc >>= 32
                    nb -= 32
                _stel(nxt, c, e)
                c += tt >> 16
            _flush_bits(st, pos, acc, nb)
        cur, nxt = nxt, cur
        k = c


@njit(**_OPTS)
def _code_cmp(ex, k, s0, s1, s2, w, st, pos, codes, nxt):
    """A level of width 1 or 2 (at most three symbols): (a) per entry, vectorisable: its code
    from three compares; (b) per 8 entries: PEXT packs the codes into w bytes at ``pos`` and the
    escaping exponents into consecutive bytes of ``nxt``. Returns the number of escapes."""
    for j in range(k):
        e = _ldel(ex, j)
        _stel(codes, j, 3 ^ (np.int64(e == s0) * 3) ^ (np.int64(e == s1) * 2) ^ np.int64(e == s2))
    k8 = (k + 7) & ~7
    for j in range(k, k8):
        _stel(codes, j, 0)  # the tile's padding entries are zero codes
    c = np.int64(0)
    if w == 2:
        for g in range(k8 >> 3):
            x = _ld64(codes, 8 * g)
            _st16(st, pos + 2 * g, _pext(x, 0x0303030303030303))
            m = x & (x >> 1) & 0x0101010101010101
            _st64(nxt, c, _pext(_ld64(ex, 8 * g), m * 0xFF))
            c += _popc(m)
    else:
        for g in range(k8 >> 3):
            m = _ld64(codes, 8 * g) & 0x0101010101010101
            _stel(st, pos + g, _pext(m, 0x0101010101010101))
            _st64(nxt, c, _pext(_ld64(ex, 8 * g), m * 0xFF))
            c += _popc(m)
    return c


@njit(**_OPTS)
def _code_vec(ex, k, s0, s1, s2, w, st, pos, nxt):
    """``_code_cmp``, 64 entries at a time (AVX-512). Byte compares give the masks k0, k1, k2 of
    the entries that are symbol 0, 1, 2 (0x100: no symbol, never equal). A code's bit 0 is set
    unless the entry is symbol 0 or 2, bit 1 unless it is symbol 0 or 1, so both are set for an
    escape; PDEP interleaves the two masks into 2-bit codes (w == 1: bit 0 is the code).
    VPCOMPRESSB packs the escaping exponents. ``ex`` and ``nxt`` need 64 bytes of slack."""
    c = np.int64(0)
    j = 0
    while j < k:
        rem = k - j
        valid = np.int64(-1) if rem >= 64 else (np.int64(1) << rem) - 1
        k0 = _eqmask64(ex, j, s0) if s0 < 256 else np.int64(0)
        if w == 2:
            k1 = _eqmask64(ex, j, s1) if s1 < 256 else np.int64(0)
            k2 = _eqmask64(ex, j, s2) if s2 < 256 else np.int64(0)
            b0 = ~(k0 | k2) & valid
            b1 = ~(k0 | k1) & valid
            lo = _pdep(b0 & 0xFFFFFFFF, 0x5555555555555555) | _pdep(b1 & 0xFFFFFFFF, -0x5555555555555556)
            hi = (_pdep((b0 >> 32) & 0xFFFFFFFF, 0x5555555555555555)
                  | _pdep((b1 >> 32) & 0xFFFFFFFF, -0x5555555555555556))
            esc = b0 & b1
            q = pos + (j >> 2)
            if rem >= 64:
                _st64(st, q, lo)
                _st64(st, q + 8, hi)
            else:  # the tile's last groups: 2 bytes per 8 entries, nothing past them
                for b in range(((rem + 7) >> 3) * 2):
                    _stel(st, q + b, (lo >> (8 * b)) if b < 8 else (hi >> (8 * (b - 8))))
        else:
            esc = ~k0 & valid
            q = pos + (j >> 3)
            if rem >= 64:
                _st64(st, q, esc)
            else:
                for b in range((rem + 7) >> 3):
                    _stel(st, q + b, esc >> (8 * b))
        _compress64(ex, j, esc, nxt, c)
        c += _popc(esc)
        j += 64
    return c


_EMPTY_U8 = np.zeros(16, np.uint8)


PARALLEL_MIN_TILES = 8  # below this a parallel region costs more than it saves


def _parallel(tiles: int) -> bool:
    return tiles >= PARALLEL_MIN_TILES and numba.get_num_threads() > 1


def _align(x: int) -> int:
    a = spec.SECTION_ALIGN
    return (x + a - 1) // a * a


def encode(bits: np.ndarray, layout: FloatLayout, keep: int, tile: int = spec.DEFAULT_TILE):
    """Encode 1-D integer bit patterns. Returns (widths, has_raw, symbols, sections), byte for
    byte what ``reference.encode`` returns (the sections are views into one blob)."""
    widths, has_raw, symbols, blob, table, _ = encode_blob(bits, layout, keep, tile)
    sections = {}
    for name, (off, nb, rows, cols) in table.items():
        dt = (np.uint32 if name == "offsets" else np.int64 if name == "patch_idx"
              else layout.uint if name == "patch_val" else np.uint8)
        arr = blob[off:off + nb].view(dt)
        sections[name] = arr.reshape(rows, cols) if name == "offsets" else arr
    return widths, has_raw, symbols, sections


@njit(**_OPTS)
def _al(x):
    return (x + spec.SECTION_ALIGN - 1) // spec.SECTION_ALIGN * spec.SECTION_ALIGN


@njit(**_OPTS)
def _layout(bits, th, nanc, tile, lossy, signbit, inf, exp_bits, smw):
    """Between the histogram and the stream writes: the plan, the blob's layout (the one
    CompressedTensor.from_sections gives these sections, each 16-byte aligned), its zero
    padding, the offsets and the NaN patches. Returns (widths, has_raw, symbols, W, CT, SYM,
    off, blob, table); table row i = (byte offset, nbytes, rows, cols) of section i in the
    order sm, level0.., offsets, patch_idx, patch_val."""
    n = len(bits)
    tiles = th.shape[0]
    widths, has_raw, symbols, L, W, CT, SYM, off, sizes = _plan(
        th, n, tile, exp_bits, spec.MAX_LEVELS, spec.MAX_WIDTH)
    nan_total = nanc.sum() if lossy else 0
    table = np.zeros((L + 4, 4), np.int64)
    table[0, 1] = (n * smw + 7) // 8 + spec.STREAM_PAD
    for l in range(L):
        table[1 + l, 1] = sizes[l]
    table[L + 1, 1] = off.size * 4
    table[L + 1, 2] = off.shape[0]
    table[L + 1, 3] = off.shape[1]
    table[L + 2, 1] = 8 * nan_total
    table[L + 3, 1] = bits.itemsize * nan_total
    pos = 0
    for i in range(L + 4):
        table[i, 0] = pos
        pos = _al(pos + table[i, 1])
    blob = np.empty(pos, np.uint8)
    # zero what no kernel writes: the STREAM_PAD tail of sm and of every level, alignment gaps
    for i in range(L + 4):
        o, nb = table[i, 0], table[i, 1]
        for j in range(o + nb - (spec.STREAM_PAD if i <= L else 0), _al(o + nb)):
            blob[j] = 0
    o = table[L + 1, 0]
    for r in range(off.shape[0]):
        for c in range(off.shape[1]):
            _st32(blob, o + 4 * (r * off.shape[1] + c), np.int64(off[r, c]))
    if nan_total:
        nstart = np.zeros(tiles + 1, np.int64)
        for t in range(tiles):
            nstart[t + 1] = nstart[t] + nanc[t]
        pidx = np.empty(nan_total, np.int64)
        pval = np.empty_like(bits[:nan_total])
        for t in range(tiles):
            if nanc[t]:
                _nan_fill_tile(t, bits, n, tile, inf, signbit, nstart[t], pidx, pval)
        oi, ov = table[L + 2, 0], table[L + 3, 0]
        for p in range(nan_total):
            _st64(blob, oi + 8 * p, pidx[p])
            v = np.int64(pval[p])
            for byte in range(bits.itemsize):
                blob[ov + bits.itemsize * p + byte] = (v >> (8 * byte)) & 0xFF
    return widths, has_raw, symbols, W, CT, SYM, off, blob, table


@njit(**_OPTS)
def _level(blob, table, l):
    """The stream of level l, a view into the blob (empty if there is no such level)."""
    if l >= table.shape[0] - 4:
        return blob[:0]
    return blob[table[1 + l, 0]:table[1 + l, 0] + table[1 + l, 1]]


@njit(**_OPTS)
def _streams_ser(src, tile, W, CT, SYM, mb, emask, keep, smw, off, blob, table):
    n = len(src)
    L = table.shape[0] - 4
    if L == 0:
        return
    sm = blob[table[0, 0]:table[0, 0] + table[0, 1]]
    lv0, lv1, lv2 = _level(blob, table, 0), _level(blob, table, 1), _level(blob, table, 2)
    lv3, lv4 = _level(blob, table, 3), _level(blob, table, 4)
    for t in range((n + tile - 1) // tile):
        _enc_tile(t, src, n, tile, L, W, CT, SYM, mb, emask, keep, mb - keep, src.itemsize * 8 - 1,
                  smw, sm, lv0, lv1, lv2, lv3, lv4, off)


@njit(parallel=True, **_OPTS)
def _streams_par(src, tile, W, CT, SYM, mb, emask, keep, smw, off, blob, table):
    n = len(src)
    L = table.shape[0] - 4
    if L == 0:
        return
    sm = blob[table[0, 0]:table[0, 0] + table[0, 1]]
    lv0, lv1, lv2 = _level(blob, table, 0), _level(blob, table, 1), _level(blob, table, 2)
    lv3, lv4 = _level(blob, table, 3), _level(blob, table, 4)
    for t in prange((n + tile - 1) // tile):
        _enc_tile(t, src, n, tile, L, W, CT, SYM, mb, emask, keep, mb - keep, src.itemsize * 8 - 1,
                  smw, sm, lv0, lv1, lv2, lv3, lv4, off)


@njit(**_OPTS)
def _encode_ser(bits, rb, tile, lossy, s, signbit, inf, maxfin, mb, emask, exp_bits, keep, smw, crctab):
    """The whole one-thread encode in one compiled call: histogram, layout, streams, CRC-32.
    (Only serial callees: a cached function that calls a parallel one can crash when loaded
    from numba's cache, numba issues #4807 and #8578; the parallel encode goes through Python.)"""
    n = len(bits)
    th = np.empty(((n + tile - 1) // tile, emask + 1), np.int32)  # every row written below
    nanc = np.zeros(th.shape[0], np.int64)
    if n:
        _round_hist_ser(bits, rb, n, tile, lossy, s, signbit, inf, maxfin, mb, emask, th, nanc)
    widths, has_raw, symbols, W, CT, SYM, off, blob, table = _layout(
        bits, th, nanc, tile, lossy, signbit, inf, exp_bits, smw)
    _streams_ser(rb if lossy else bits, tile, W, CT, SYM, mb, emask, keep, smw, off, blob, table)
    return widths, has_raw, symbols, blob, table, _crc32_any(blob, 0, crctab)


def encode_blob(bits: np.ndarray, layout: FloatLayout, keep: int, tile: int = spec.DEFAULT_TILE):
    """``encode``, written straight into the blob that ``CompressedTensor.from_sections`` would
    build from its sections: (widths, has_raw, symbols, blob, table, crc32), table[name] =
    (byte offset, nbytes, rows, cols). Every byte of the blob is written once; padding is zero."""
    bits = np.ascontiguousarray(bits, dtype=layout.uint).reshape(-1)
    n = len(bits)
    s = layout.man_bits - keep
    lossy = s > 0
    rb = np.empty_like(bits) if lossy else bits  # the rounded values (lossy)
    signbit, inf, maxfin = 1 << (layout.total_bits - 1), layout.inf_bits, layout.inf_bits - (1 << s)
    mb, emask, smw = layout.man_bits, layout.exp_mask, spec.sm_width(keep)
    tiles = spec.n_tiles(n, tile)
    if not _parallel(tiles):
        widths, has_raw, symbols, blob, tab, crc = _encode_ser(
            bits, rb, tile, lossy, s, signbit, inf, maxfin, mb, emask, layout.exp_bits, keep, smw, _CRC_TAB)
    else:
        th = np.empty((tiles, emask + 1), np.int32)
        nanc = np.zeros(tiles, np.int64)
        _round_hist_par(bits, rb, n, tile, lossy, s, signbit, inf, maxfin, mb, emask, th, nanc)
        widths, has_raw, symbols, W, CT, SYM, off, blob, tab = _layout(
            bits, th, nanc, tile, lossy, signbit, inf, layout.exp_bits, smw)
        _streams_par(rb, tile, W, CT, SYM, mb, emask, keep, smw, off, blob, tab)
        crc = _crc32_any(blob, 0, _CRC_TAB)
    rows = tab.tolist()
    names = ["sm"] + _LEVEL_NAMES[:len(rows) - 4] + ["offsets", "patch_idx", "patch_val"]
    table = {name: tuple(row) for name, row in zip(names, rows)}
    return tuple(widths.tolist()), bool(has_raw), symbols.astype(np.uint8), blob, table, int(crc)


_LEVEL_NAMES = [f"level{level}" for level in range(_NLEV)]


# --- decode kernels --------------------------------------------------------------------------

ERR_ESCAPES = 1  # a tile holds more escapes than its offsets allow
ERR_CODE = 2  # a code names no symbol
ERR_OFFSETS = 4  # offsets decrease or point past a stream
ERR_PATCH = 8  # a patch index out of range
ERR_SHORT = 16  # a stream shorter than the header implies


@njit(**_OPTS)
def _count_esc(st, start, k, w):
    """Escapes (all-ones codes) among entries [start, start + k) of a w-bit stream; start % 8 == 0."""
    if k <= 0:
        return np.int64(0)
    tot = np.int64(0)
    if w == 1 or w == 2:
        per = 64 // w
        byte0 = (start * w) >> 3
        nfull = k // per
        for q in range(nfull):
            x = _ld64(st, byte0 + 8 * q)
            if w == 2:
                x = x & (x >> 1) & 0x5555555555555555
            tot += _popc(x)
        r = k - nfull * per
        if r:
            x = _ld64(st, byte0 + 8 * nfull) & ((np.int64(1) << (r * w)) - 1)
            if w == 2:
                x = x & (x >> 1) & 0x5555555555555555
            tot += _popc(x)
        return tot
    mask = (np.int64(1) << w) - 1
    for j in range(start, start + k):
        b = j * w
        tot += ((_ld64(st, b >> 3) >> (b & 7)) & mask) == mask
    return tot


@njit(**_OPTS)
def _ldwin(out, q, lim, G):
    """The G output slots from q as one little-endian 64-bit word (zeros past the array)."""
    if q + G <= lim:
        return _ld64(out, q)
    X = np.int64(0)
    sh = 64 // G
    for j in range(G):
        if q + j < lim:
            X |= _ldel(out, q + j) << (sh * j)
    return X


@njit(**_OPTS)
def _merge_chunks(st, start, k, w, G, TT, row, out, P, Pn, lim, valid):
    """The table path of ``_merge``: G entries (one chunk of G * w <= 8 bits) per step. A chunk
    selects from TT the symbols of its non-escape lanes (B), its escape lanes (M) and their count
    (N, negative if a code names no symbol); PDEP drops the next list entries into the escape
    lanes. Returns (entries done, list entries taken, bad)."""
    c = np.int64(0)
    bad = np.int64(0)
    j = 0
    if valid and P + k + 8 <= lim:
        # every code valid, no read can pass the array: no checks
        cm = (np.int64(1) << (G * w)) - 1
        while j + G <= k:
            b = (start + j) * w
            r = (row + ((_ld64(st, b >> 3) >> (b & 7)) & cm)) * 4
            _st64(out, P + j, _ldel(TT, r) | _pdep(_ld64(out, Pn + c), _ldel(TT, r + 1)))
            c += _ldel(TT, r + 2)
            j += G
    if G == 4 and w == 2:
        base = (start * 2) >> 3
        while j + 4 <= k:
            r = (row + _ldel(st, base + (j >> 2))) * 4
            q = Pn + c
            if q + 4 <= lim:
                X = _ld64(out, q)
            else:
                X = _ldwin(out, q, lim, 4)
            nn = _ldel(TT, r + 2)
            _st64(out, P + j, _ldel(TT, r) | _pdep(X, _ldel(TT, r + 1)))
            c += nn & 7
            bad |= nn
            j += 4
    elif G == 4 and w == 1:
        base = start >> 3
        while j + 4 <= k:
            r = (row + ((_ldel(st, base + (j >> 3)) >> (j & 4)) & 15)) * 4
            q = Pn + c
            if q + 4 <= lim:
                X = _ld64(out, q)
            else:
                X = _ldwin(out, q, lim, 4)
            nn = _ldel(TT, r + 2)
            _st64(out, P + j, _ldel(TT, r) | _pdep(X, _ldel(TT, r + 1)))
            c += nn & 7
            bad |= nn
            j += 4
    else:
        cmask = (np.int64(1) << (G * w)) - 1
        while j + G <= k:
            b = (start + j) * w
            r = (row + ((_ld64(st, b >> 3) >> (b & 7)) & cmask)) * 4
            q = Pn + c
            if q + G <= lim:
                X = _ld64(out, q)
            else:
                X = _ldwin(out, q, lim, G)
            nn = _ldel(TT, r + 2)
            _st64(out, P + j, _ldel(TT, r) | _pdep(X, _ldel(TT, r + 1)))
            c += nn & 7
            bad |= nn
            j += G
    return j, c, bad


@njit(**_OPTS)
def _merge(st, start, k, w, escv, tab, TT, G, lv, out, P, Pn, lim, valid):
    """Decode k entries of a level (from entry ``start``) into out[P:P+k], escapes taking the
    next entries of the list at out[Pn:]. Returns a negative number if a code names no symbol."""
    j = 0
    c = np.int64(0)
    bad = np.int64(0)
    if G * w <= 8:
        j, c, bad = _merge_chunks(st, start, k, w, G, TT, lv * 256, out, P, Pn, lim, valid)
    mask = (np.int64(1) << w) - 1
    last = lim - 1
    row = lv * _NCODE
    while j < k:
        b = (start + j) * w
        code = (_ld64(st, b >> 3) >> (b & 7)) & mask
        v = _ldel(tab, row + code)
        bad |= v
        x = _ldel(out, min(Pn + c, last))
        e = np.int64(code == escv)
        _stel(out, P + j, _cmov(e, x, v))
        c += e
        j += 1
    return bad


@njit(**_OPTS)
def _level0_chunks(L0, sm, out, a, end, w0, smw, G, TT, lanemask, P1, lim, valid):
    """Level 0 and the sign/mantissa stream, G values per step (see ``_merge_chunks``).
    Returns (next value, list entries taken, bad)."""
    c = np.int64(0)
    bad = np.int64(0)
    i = a
    if G == 4 and w0 == 2 and smw == 8 and valid and end + 8 <= lim:
        # lossless bf16, every code valid, reads of the list cannot pass the array: no checks
        while i + 8 <= end:
            r = _ldel(L0, i >> 2) * 4
            r2 = _ldel(L0, (i >> 2) + 1) * 4
            s8 = _ld64(sm, i)
            word = _pdep(s8, lanemask) | _ldel(TT, r) | _pdep(_ld64(out, P1 + c), _ldel(TT, r + 1))
            c += _ldel(TT, r + 2)
            word2 = (_pdep(s8 >> 32, lanemask) | _ldel(TT, r2)
                     | _pdep(_ld64(out, P1 + c), _ldel(TT, r2 + 1)))
            c += _ldel(TT, r2 + 2)
            _st64(out, i, word)
            _st64(out, i + 4, word2)
            i += 8
    if valid and end + 8 <= lim:  # any layout, every code valid: no checks
        cmask = (np.int64(1) << (G * w0)) - 1
        smaskg = (np.int64(1) << (G * smw)) - 1
        while i + G <= end:
            b = i * w0
            r = ((_ld64(L0, b >> 3) >> (b & 7)) & cmask) * 4
            bpos = i * smw
            sg = (_ld64(sm, bpos >> 3) >> (bpos & 7)) & smaskg
            _st64(out, i, _pdep(sg, lanemask) | _ldel(TT, r) | _pdep(_ld64(out, P1 + c), _ldel(TT, r + 1)))
            c += _ldel(TT, r + 2)
            i += G
    if G == 4 and w0 == 2 and smw == 8:  # lossless bf16
        while i + 4 <= end:
            r = _ldel(L0, i >> 2) * 4
            q = P1 + c
            if q + 4 <= lim:
                X = _ld64(out, q)
            else:
                X = _ldwin(out, q, lim, 4)
            nn = _ldel(TT, r + 2)
            word = _pdep(_ld32(sm, i), lanemask) | _ldel(TT, r) | _pdep(X, _ldel(TT, r + 1))
            _st64(out, i, word)
            c += nn & 7
            bad |= nn
            i += 4
    else:
        cmask = (np.int64(1) << (G * w0)) - 1
        smaskg = (np.int64(1) << (G * smw)) - 1
        while i + G <= end:
            b = i * w0
            r = ((_ld64(L0, b >> 3) >> (b & 7)) & cmask) * 4
            bpos = i * smw
            sg = (_ld64(sm, bpos >> 3) >> (bpos & 7)) & smaskg
            q = P1 + c
            if q + G <= lim:
                X = _ld64(out, q)
            else:
                X = _ldwin(out, q, lim, G)
            nn = _ldel(TT, r + 2)
            word = _pdep(sg, lanemask) | _ldel(TT, r) | _pdep(X, _ldel(TT, r + 1))
            _st64(out, i, word)
            c += nn & 7
            bad |= nn
            i += G
    return i, c, bad


@njit(**_OPTS)
def _decode_tile(t, n, tile, L, W, ESC, VALID, tab, TT, G, sm, smw, keep, drop, tbm1, lanemask,
                 L0, L1, L2, L3, L4, off, out):
    a = t * tile
    end = min(a + tile, n)
    cnt = end - a
    lim = len(out)
    streams = (L0, L1, L2, L3, L4)
    # 1. top-down: entries of each deeper level in this tile
    k1 = np.int64(0)
    k2 = np.int64(0)
    k3 = np.int64(0)
    k4 = np.int64(0)
    k = cnt
    s = a
    for l in range(L - 1):
        e = _count_esc(streams[l], s, k, W[l])
        o0 = np.int64(off[t, l])
        o1 = np.int64(off[t + 1, l])
        if o1 < o0 or o1 * W[l + 1] + 8 > len(streams[l + 1]):
            return ERR_OFFSETS
        if (o1 - o0) * 8 < e:
            return ERR_ESCAPES
        if l == 0:
            k1 = e
        elif l == 1:
            k2 = e
        elif l == 2:
            k3 = e
        else:
            k4 = e
        k = e
        s = o0 * 8
    # 2. bottom-up: deeper levels into the tile's tail
    bad = np.int64(0)
    kn = np.int64(0)
    for l in range(L - 1, 0, -1):
        kl = k1 if l == 1 else (k2 if l == 2 else (k3 if l == 3 else k4))
        if kl:
            bad |= _merge(streams[l], np.int64(off[t, l - 1]) * 8, kl, W[l], ESC[l], tab, TT, G, l,
                          out, end - kl, end - kn, lim, VALID[l])
        kn = kl
    # 3. level 0 + sign/mantissa
    w0 = W[0]
    P1 = end - k1
    i = a
    c = np.int64(0)
    if G * w0 <= 8:
        i, c, bad0 = _level0_chunks(L0, sm, out, a, end, w0, smw, G, TT, lanemask, P1, lim, VALID[0])
        bad |= bad0
    esc0 = ESC[0]
    last = lim - 1
    kmask = (np.int64(1) << keep) - 1
    mask0 = (np.int64(1) << w0) - 1
    smmask = (np.int64(1) << smw) - 1
    while i < end:
        b = i * w0
        code = (_ld64(L0, b >> 3) >> (b & 7)) & mask0
        v = _ldel(tab, code)
        bad |= v
        x = _ldel(out, min(P1 + c, last))
        e = np.int64(code == esc0)
        c += e
        bs = i * smw
        smv = (_ld64(sm, bs >> 3) >> (bs & 7)) & smmask
        _stel(out, i, ((smv >> keep) << tbm1) | ((smv & kmask) << drop) | _cmov(e, x, v))
        i += 1
    return ERR_CODE if bad < 0 else 0


@njit(parallel=True, **_OPTS)
def _decode_par(n, tile, L, W, ESC, VALID, tab, TT, G, sm, smw, keep, drop, tbm1, lanemask,
                L0, L1, L2, L3, L4, off, out, pidx, pval):
    tiles = (n + tile - 1) // tile
    e_esc = 0
    e_code = 0
    e_off = 0
    for t in prange(tiles):
        f = _decode_tile(t, n, tile, L, W, ESC, VALID, tab, TT, G, sm, smw, keep, drop, tbm1,
                         lanemask, L0, L1, L2, L3, L4, off, out)
        e_esc += f == ERR_ESCAPES
        e_code += f == ERR_CODE
        e_off += f == ERR_OFFSETS
    return _finish(n, out, pidx, pval, e_esc, e_code, e_off)


@njit(**_OPTS)
def _decode_ser(n, tile, L, W, ESC, VALID, tab, TT, G, sm, smw, keep, drop, tbm1, lanemask,
                L0, L1, L2, L3, L4, off, out, pidx, pval):
    tiles = (n + tile - 1) // tile
    e_esc = 0
    e_code = 0
    e_off = 0
    for t in range(tiles):
        f = _decode_tile(t, n, tile, L, W, ESC, VALID, tab, TT, G, sm, smw, keep, drop, tbm1,
                         lanemask, L0, L1, L2, L3, L4, off, out)
        e_esc += f == ERR_ESCAPES
        e_code += f == ERR_CODE
        e_off += f == ERR_OFFSETS
    return _finish(n, out, pidx, pval, e_esc, e_code, e_off)


@njit(**_OPTS)
def _finish(n, out, pidx, pval, e_esc, e_code, e_off):
    err = 0
    if e_esc:
        err |= ERR_ESCAPES
    if e_code:
        err |= ERR_CODE
    if e_off:
        err |= ERR_OFFSETS
    for p in range(len(pidx)):
        j = pidx[p]
        if j < 0 or j >= n:
            err |= ERR_PATCH
        else:
            out[j] = pval[p]
    return err


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


@functools.lru_cache(maxsize=512)  # ~50 KB of tables each
def _decode_tables(dtype: str, keep: int, widths: tuple, has_raw: bool, symbols: tuple):
    """Per-codebook decode tables (built once per distinct codebook, then reused)."""
    layout = spec.LAYOUTS[dtype]
    mb = layout.man_bits
    all_widths = spec.level_widths(widths, has_raw, layout.exp_bits)
    L = len(all_widths)
    # tab[level, code]: the exponent (shifted into place) a code names; -1: names nothing;
    # 0 for the escape code of a level that has a next one
    tab = np.full((_NLEV, _NCODE), -1, np.int64)
    W = np.zeros(_NLEV, np.int64)
    ESC = np.full(_NLEV, -1, np.int64)
    first = 0
    for level, w in enumerate(all_widths):
        W[level] = w
        if has_raw and level == L - 1:
            tab[level, : 1 << w] = np.arange(1 << w) << mb
            continue
        cap = (1 << w) - 1
        for c in range(cap):
            if first + c < len(symbols):
                tab[level, c] = symbols[first + c] << mb
        if level < L - 1:
            ESC[level] = cap
            tab[level, cap] = 0
        first += cap
    # G = values per 64-bit word of output. A level with G * w <= 8 decodes G entries per step:
    # TT[level, chunk] = (symbols of the non-escape lanes, escape lanes (all ones), escape
    # count or a negative number when a code names no symbol, 0)
    G = 8 // layout.itemsize
    lanebits = 8 * layout.itemsize
    TT = np.zeros((_NLEV, 256, 4), np.uint64)  # built with numpy: ~4 ms a codebook in Python loops
    ones = np.uint64((1 << lanebits) - 1)
    for level, w in enumerate(all_widths):
        if G * w > 8:
            continue
        chunk = np.arange(1 << (G * w), dtype=np.int64)
        sym, esc_lanes = TT[level, : len(chunk), 0], TT[level, : len(chunk), 1]
        n_esc = np.zeros(len(chunk), np.int64)
        bad = np.zeros(len(chunk), bool)
        for j in range(G):
            code = (chunk >> (w * j)) & ((1 << w) - 1)
            is_esc = code == ESC[level]
            named = tab[level, code]
            bad |= (named < 0) & ~is_esc
            shift = np.uint64(lanebits * j)
            sym |= np.where(is_esc | (named < 0), 0, named).astype(np.uint64) << shift
            esc_lanes |= np.where(is_esc, ones << shift, np.uint64(0))
            n_esc += is_esc
        TT[level, : len(chunk), 2] = np.where(bad, -(1 << 40), n_esc).astype(np.int64).view(np.uint64)
    TT = TT.reshape(-1).view(np.int64)
    drop = mb - keep
    lane = (1 << (lanebits - 1)) | (((1 << keep) - 1) << drop)
    lanemask = 0
    for j in range(G):
        lanemask |= lane << (lanebits * j)
    lanemask = _signed64(lanemask)
    # VALID[level]: no code of the level can name nothing (its fast loops skip the check)
    VALID = np.array([int((tab[level, : 1 << int(W[level])] >= 0).all()) if level < L else 0
                      for level in range(_NLEV)], np.int64)
    tab = tab.reshape(-1)
    for arr in (tab, W, ESC, VALID, TT):
        arr.setflags(write=False)
    return L, W, ESC, VALID, tab, TT, G, drop, lanemask


_ERRORS = [
    (ERR_OFFSETS, "tile offsets are inconsistent or point past a level's stream"),
    (ERR_ESCAPES, "a tile holds more escapes than its offsets allow"),
    (ERR_CODE, "a code names no symbol"),
    (ERR_PATCH, "a patch index is out of range"),
    (ERR_SHORT, "a stream is shorter than the header implies"),
]


def decode_into(ct, out_bits: np.ndarray) -> None:
    """Write the bit patterns of ``ct`` into ``out_bits`` (1-D, the dtype's uint, >= numel)."""
    h = ct.header
    layout = spec.LAYOUTS[h.dtype]
    n = h.numel
    if (out_bits.dtype != layout.uint or out_bits.ndim != 1 or len(out_bits) < n
            or not out_bits.flags.c_contiguous or not out_bits.flags.writeable):
        raise ValueError(f"out_bits must be a writeable contiguous 1-D {np.dtype(layout.uint).name} "
                         f"array of >= {n} values")
    if n == 0:
        return
    sec = ct.np_sections()
    L, W, ESC, VALID, tab, TT, G, drop, lanemask = _decode_tables(
        h.dtype, h.mantissa_bits, h.widths, h.has_raw, h.symbols)
    smw = spec.sm_width(h.mantissa_bits)
    lv = [sec[f"level{i}"] for i in range(L)] + [_EMPTY_U8] * (_NLEV - L)
    # the reads of a stream stay within ((count - 1) * width >> 3) + 8 bytes
    if (len(sec["sm"]) < (((n - 1) * smw) >> 3) + 8
            or L == 0 or len(lv[0]) < (((n - 1) * int(W[0])) >> 3) + 8):
        raise FormatError("a stream is shorter than the header implies")
    off = sec["offsets"]
    if off.shape[0] != spec.n_tiles(n, h.tile) + 1 or off.shape[1] != max(L - 1, 0):
        raise FormatError(f"offsets table has shape {off.shape}")
    tiles = spec.n_tiles(n, h.tile)
    kern = _decode_par if _parallel(tiles) else _decode_ser
    err = kern(n, h.tile, L, W, ESC, VALID, tab, TT, G, sec["sm"], smw, h.mantissa_bits, drop,
               layout.total_bits - 1, lanemask, lv[0], lv[1], lv[2], lv[3], lv[4], off, out_bits,
               sec["patch_idx"], sec["patch_val"])
    if err:
        msgs = [m for bit, m in _ERRORS if err & bit]
        raise FormatError("corrupted compressed tensor: " + "; ".join(msgs))
