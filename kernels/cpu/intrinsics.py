"""numba intrinsics the CPU kernels are built from, and what the host CPU has.

  * unaligned little-endian loads and stores of 16, 32 or 64 bits at an element index
    (``_ld64``, ``_ld32``, ``_st64``, ``_st32``, ``_st16``) and element access without
    negative-index wraparound (``_ldel``, ``_stel``): with spec's packing (entry ``i`` of a
    ``w``-bit stream at bits ``i*w ..`` of the stream read as one little-endian integer, at least
    ``STREAM_PAD`` = 8 bytes after it), ``_ld64(st, b >> 3) >> (b & 7)`` holds the entry at bit
    ``b`` in its low bits;
  * a cache prefetch hint (``_prefetch``), a real CMOV (``_cmov``), popcount, BMI2 PEXT/PDEP (portable loops without BMI2);
  * AVX-512 byte work on 64 lanes: a compare to a 64-bit mask (``_eqmask64``) and VPCOMPRESSB
    (``_compress64``), portable loops without VBMI2;
  * vector lane packers (``_make_bytes``) from 16- or 32-bit float patterns to exponent bytes
    ``(v >> man_bits) & 0xff`` and to the ``sm`` bytes of lossless bf16 (one byte a value:
    ``(v >> 8) & 0x80 | v & 0x7f``) and fp32 (three: ``(v >> 8) & 0x800000 | v & 0x7fffff``).
The ``_HAS_*`` host flags are read at import (``NZRT_NUMBA_NO_AVX512=1`` turns off AVX-512 and
VPCLMULQDQ, for tests, in a fresh ``NUMBA_CACHE_DIR``) and are compiled into the callers as
constants.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .. import env


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


_X86 = __import__("platform").machine().lower() in ("x86_64", "amd64")


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Hint the cache line holding element ``idx`` of ``arr`` into the caches (PREFETCHT1, to L2, on
    x86-64; nothing elsewhere). Never faults, so an index past the array is harmless."""
    sig = types.void(arr, idx)

    def codegen(context, builder, sig, args):
        if _X86:
            ptr = _elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
            p8 = builder.bitcast(ptr, ir.IntType(8).as_pointer())
            builder.asm(ir.FunctionType(ir.VoidType(), [p8.type]), "prefetcht1 ($0)", "r", [p8],
                        side_effect=True)
        return context.get_dummy_value()
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
_NO_AVX512 = env.get("NZRT_NUMBA_NO_AVX512") == "1"


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
_HAS_VPCLMUL = _host_has("vpclmulqdq") and _host_has("avx512f")


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


def _bf16_level0_x32_soft(L0, sm, out, i, p, t0, t1, t2):
    c = np.int64(0)
    for j in range(32):
        code = (np.int64(L0[(i + j) >> 2]) >> (2 * ((i + j) & 3))) & 3
        s = np.int64(sm[i + j])
        if code == 3:
            v = np.int64(out[p + c])
            c += 1
        else:
            v = t0 if code == 0 else (t1 if code == 1 else t2)
        out[i + j] = ((s & 0x80) << 8) | (s & 0x7F) | v
    return c


def _codes2_x32_soft(st, byte, out, q, p, t0, t1, t2):
    c = np.int64(0)
    for j in range(32):
        code = (np.int64(st[byte + (j >> 2)]) >> (2 * (j & 3))) & 3
        if code == 3:
            v = np.int64(out[p + c])
            c += 1
        else:
            v = t0 if code == 0 else (t1 if code == 1 else t2)
        out[q + j] = v
    return c


def _make_merge2_x32(with_sm: bool):
    """Merge 32 entries of a 2-bit level whose code 3 escapes, into 16-bit output lanes: code
    c < 3 names ``t_c`` (the exponent in place), an escape takes the next entry of the list at
    ``out[p:]`` (one VPEXPANDW); the 8 code bytes are read from ``st[byte]``; the 32 lanes are
    stored after the list was read. ``with_sm`` (level 0 of lossless bf16): the sign/mantissa
    byte ``sm[q + j]`` goes to bits 15 and 0..6 and ``byte`` is ``q >> 2``. Returns the escapes
    taken. Without AVX-512 VBMI2, a loop."""
    soft = _bf16_level0_x32_soft if with_sm else _codes2_x32_soft

    @intrinsic
    def merge2(typingctx, st, second, out, q, p, t0, t1, t2):
        if not all(isinstance(a, types.Array) for a in (st, second, out)) and with_sm:
            return None
        if not with_sm and not (isinstance(st, types.Array) and isinstance(out, types.Array)):
            return None
        sig = types.int64(st, second, out, types.int64, types.int64, types.int64, types.int64, types.int64)

        def codegen(context, builder, sig, args):
            if not _HAS_VBMI2:
                return context.compile_internal(builder, soft, sig, args)
            i8, i16, i32, i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
            v8, v32b, v32w = ir.VectorType(i8, 8), ir.VectorType(i8, 32), ir.VectorType(i16, 32)
            v32m = ir.VectorType(ir.IntType(1), 32)
            expand = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(v32w, [i16.as_pointer(), v32m, v32w]),
                "llvm.masked.expandload.v32i16")
            ctpop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i32, [i32]), "llvm.ctpop.i32")
            q, p = args[3], args[4]
            const = lambda x: ir.Constant(v32w, x if isinstance(x, list) else [x] * 32)  # noqa: E731
            byte = builder.ashr(q, ir.Constant(i64, 2)) if with_sm else args[1]
            pcode = _elem_ptr(context, builder, sig.args[0], args[0], byte, types.int64)
            b = builder.load(builder.bitcast(pcode, v8.as_pointer()), align=1)
            spread = builder.shuffle_vector(b, ir.Constant(v8, None),
                                            ir.Constant(ir.VectorType(i32, 32), [j // 4 for j in range(32)]))
            codes = builder.and_(builder.lshr(builder.zext(spread, v32w),
                                              const([2 * (j % 4) for j in range(32)])), const(3))
            T = [_vec_splat(builder, v32w, builder.trunc(a, i16)) for a in args[5:8]]
            esc = builder.icmp_unsigned("==", codes, const(3))
            sym = builder.select(builder.icmp_unsigned("==", codes, const(0)), T[0],
                                 builder.select(builder.icmp_unsigned("==", codes, const(1)), T[1],
                                                builder.select(esc, const(0), T[2])))
            plist = _elem_ptr(context, builder, sig.args[2], args[2], p, types.int64)
            word = builder.call(expand, [builder.bitcast(plist, i16.as_pointer()), esc, sym])
            if with_sm:
                psm = _elem_ptr(context, builder, sig.args[1], args[1], q, types.int64)
                s = builder.zext(builder.load(builder.bitcast(psm, v32b.as_pointer()), align=1), v32w)
                word = builder.or_(builder.or_(builder.shl(builder.and_(s, const(0x80)), const(8)),
                                               builder.and_(s, const(0x7F))), word)
            pout = _elem_ptr(context, builder, sig.args[2], args[2], q, types.int64)
            builder.store(word, builder.bitcast(pout, v32w.as_pointer()), align=1)
            return builder.zext(builder.call(ctpop, [builder.bitcast(esc, i32)]), i64)
        return sig, codegen
    return merge2


_bf16_level0_x32 = _make_merge2_x32(True)  # (L0, sm, out, i, p, t0, t1, t2)
_codes2_x32 = _make_merge2_x32(False)  # (st, byte, out, q, p, t0, t1, t2)
