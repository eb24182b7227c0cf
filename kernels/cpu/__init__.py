"""numba CPU backend: the stream layout of ``spec`` / ``reference``, fast.

Same two entry points as ``reference``: ``encode`` (bytes identical to ``reference.encode``) and
``decode_into`` (bits identical to ``reference.decode``), plus ``encode_blob`` (the blob
``CompressedTensor`` holds, written in place, with its CRC-32), ``crc32`` (``zlib.crc32``, by
carry-less multiplication) and ``choose_cascade`` (``spec.choose_cascade``, compiled). Kernels
are ``nogil`` and run in parallel over tiles; they compile on first call (and are cached on
disk), never at import of ``nzrt``.

This module is the backend's face; the kernels live beside it, by concern:
  common      compile options, table sizes, error flags, when to go parallel
  intrinsics  unaligned loads/stores, CMOV, popcount, PEXT/PDEP, AVX-512 byte ops; host flags
  crc         zlib's CRC-32 by carry-less multiplication
  plan        codebook, code tables and tile offsets from the exponent histogram
  encode      histogram, stream writers, blob layout: ``encode``, ``encode_blob``
  decode      decode tables, tile decode, patches: ``decode_into``
  fused       fused decode-matmul ``linear`` (y = x @ W.T + b from the compressed W, tile by
              tile with ``decode``'s tile decoder; the arithmetic is ``fused_reference``'s)
  fused_w4    its fast path for the 4-bit window code (lossless bf16, AVX-512BW)
  fused_common  what both fused kernels share: widening, the output rounding, prefetch.

numba's disk cache checks only the file that defines a compiled function: the intrinsics,
constants and callees it compiled in from another module are not checked. ``common`` keeps
one stamp over all the kernel sources and drops every cached kernel when any source changed.
"""
from __future__ import annotations

from .common import ERR_CODE, ERR_ESCAPES, ERR_OFFSETS, ERR_PATCH, ERR_SHORT, PARALLEL_MIN_TILES
from .crc import crc32
from .decode import decode_into
from .encode import encode, encode_blob
from .fused import linear
from .intrinsics import _HAS_BMI2, _HAS_PCLMUL, _HAS_VBMI2, _HAS_VPCLMUL  # noqa: F401 - read by tests
from .plan import choose_cascade

__all__ = ["encode", "encode_blob", "decode_into", "linear", "crc32", "choose_cascade", "PARALLEL_MIN_TILES",
           "ERR_ESCAPES", "ERR_CODE", "ERR_OFFSETS", "ERR_PATCH", "ERR_SHORT"]
