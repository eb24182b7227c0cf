"""One CompressedTensor framed in a byte buffer of fixed capacity (what an all-gather sends).

FSDP2's all-gather needs every rank to send the same number of elements, and a compressed shard's
size depends on its values; so each rank writes its frame into a buffer of the capacity the ranks
agreed on, zero-padded. Bytes (uint8), never a float container: a collective or a cast may
rewrite the bit patterns of a float NaN, which would corrupt packed data.

Layout (little-endian)::

    [0:8)    magic  b"NZFRAME1"
    [8:12)   u32    header length H (UTF-8 JSON of the codec header, ``Header.to_json``)
    [12:16)  u32    0 (reserved)
    [16:16+H)       the header
    [B:B+N)         the blob, B = 16 + H rounded up to 16, N = header.blob_nbytes
    [B+N:capacity)  zeros

``unpack`` checks the whole header (bounds, fields, its own checksum) before it touches a byte of
the blob; the blob's CRC-32 is checked by the decoder.
"""
from __future__ import annotations

import struct

import torch

from . import header as H
from .tensor import CompressedTensor, FormatError, Header

MAGIC = b"NZFRAME1"
_PREFIX = 16


def _blob_offset(header_len: int) -> int:
    return (_PREFIX + header_len + 15) // 16 * 16


def framed_size(ct: CompressedTensor) -> int:
    """Bytes ``ct`` takes in a frame (the capacity it needs)."""
    return _blob_offset(len(ct.header.to_json().encode())) + ct.data.numel()


def pack_into(ct: CompressedTensor, buf: torch.Tensor) -> None:
    """Write ``ct``'s frame into ``buf`` (1-D uint8, on ``ct``'s device), zero-padding the rest."""
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise ValueError("a frame buffer is a 1-D uint8 tensor")
    head = ct.header.to_json().encode()
    start = _blob_offset(len(head))
    end = start + ct.data.numel()
    if end > buf.numel():
        raise FormatError(f"{ct.label}: its frame needs {end} bytes, the buffer holds {buf.numel()}")
    prefix = bytearray(start)
    prefix[:_PREFIX] = MAGIC + struct.pack("<II", len(head), 0)
    prefix[_PREFIX:_PREFIX + len(head)] = head
    buf[:start].copy_(torch.frombuffer(prefix, dtype=torch.uint8))
    buf[start:end].copy_(ct.data)
    buf[end:].zero_()


def unpack(buf: torch.Tensor, label: str = "frame") -> CompressedTensor:
    """The CompressedTensor framed in ``buf`` (a view of it: no copy of the blob)."""
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise FormatError(f"{label}: a frame buffer is a 1-D uint8 tensor")
    if buf.numel() < _PREFIX:
        raise FormatError(f"{label}: {buf.numel()} bytes is too short for a frame")
    prefix = bytes(buf[:_PREFIX].tolist())  # never .numpy(): it pins the storage's size
    if prefix[:8] != MAGIC:
        raise FormatError(f"{label}: not an nzrt frame (magic {prefix[:8]!r})")
    head_len, reserved = struct.unpack("<II", prefix[8:16])
    start = _blob_offset(head_len)
    if reserved != 0 or start > buf.numel():
        raise FormatError(f"{label}: header length {head_len} does not fit a {buf.numel()}-byte frame")
    raw = bytes(buf[_PREFIX:_PREFIX + head_len].tolist())
    try:
        header = Header.from_dict(H.loads(raw))
    except FormatError as e:
        raise FormatError(f"{label}: {e}") from None
    end = start + header.blob_nbytes
    if end > buf.numel():
        raise FormatError(f"{label}: the header implies {end} bytes, the frame holds {buf.numel()}")
    return CompressedTensor(header, buf[start:end], name=label)
