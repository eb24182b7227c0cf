"""The nzrt format, in one place.

  tensor      ``CompressedTensor``: one blob of aligned sections (the streams of
              ``nzrt.kernels.spec``) plus a versioned ``Header``; the blob's CRC-32
  header      the strict reader of untrusted JSON headers (checked whole, before any data)
  checkpoint  ``.nzrt`` files: ``MAGIC``, a JSON header, aligned buffers, memory-mapped on load
  rowchunks   a large 2-D weight stored as row chunks, each its own compressed entry
  frame       one compressed tensor framed in a byte buffer of fixed capacity (FSDP2's all-gather)

The bit layout inside a blob's sections (the exponent cascade, the sign-mantissa stream, tile
offsets, patches) is ``nzrt.kernels.spec``'s: the kernels read and write it and sit below this
package, so it lives with them.
"""
from __future__ import annotations

from ..kernels.spec import FormatError
from .tensor import MAX_RANK, CompressedTensor, Header, checksum

__all__ = ["CompressedTensor", "Header", "FormatError", "MAX_RANK", "checksum"]
