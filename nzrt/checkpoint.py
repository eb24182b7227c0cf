""".nzrt files: a JSON header and aligned raw buffers, memory-mapped on load. No pickle anywhere.

Layout::

    b"NZRT\\r\\n\\x1a\\n"  u64 header length  u32 header CRC-32  u32 zero
    header JSON (utf-8), zero padding to ALIGN
    buffer 0, padding, buffer 1, ...    (each buffer starts at a multiple of ALIGN)

The header maps each tensor name to either a compressed tensor (its codec header and where
its blob lies) or a dense tensor (dtype, shape, where its bytes lie, CRC-32).
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch

from .format import CompressedTensor, FormatError, Header

MAGIC = b"NZRT\r\n\x1a\n"
PREFIX = struct.Struct("<8sQII")
ALIGN = 64
FILE_VERSION = 1


def _pad(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _dense_bytes(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)


def save(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write ``tensors`` (name -> Tensor or CompressedTensor) to ``path`` atomically.

    ``metadata`` is any JSON-able dict (a model's config, say), returned by ``load_metadata``.
    """
    path = Path(path)
    entries, buffers, pos = {}, [], 0
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {type(name).__name__}")
        if isinstance(value, CompressedTensor):
            blob = value.data.cpu().numpy()
            entries[name] = {"kind": "compressed", "header": json.loads(value.header.to_json()),
                             "offset": pos, "nbytes": int(blob.nbytes)}
        elif isinstance(value, torch.Tensor):
            blob = _dense_bytes(value)
            entries[name] = {"kind": "dense", "dtype": str(value.dtype).removeprefix("torch."),
                             "shape": list(value.shape), "offset": pos, "nbytes": int(blob.nbytes),
                             "crc32": zlib.crc32(blob)}
        else:
            raise TypeError(f"tensor {name!r}: expected a torch.Tensor or CompressedTensor, "
                            f"got {type(value).__name__}")
        buffers.append((pos, blob))
        pos = _pad(pos + blob.nbytes)
    header = json.dumps({"format": "nzrt", "version": FILE_VERSION, "metadata": metadata or {},
                         "tensors": entries}, separators=(",", ":")).encode()
    data_start = _pad(PREFIX.size + len(header))

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(PREFIX.pack(MAGIC, len(header), zlib.crc32(header), 0))
            f.write(header)
            f.write(b"\0" * (data_start - PREFIX.size - len(header)))
            written = 0
            for off, blob in buffers:
                f.write(b"\0" * (off - written))
                f.write(memoryview(blob))
                written = off + blob.nbytes
            f.write(b"\0" * (pos - written))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_header(path: Path) -> tuple[dict, int, int]:
    """(header dict, byte where the buffers start, file size)."""
    if not path.is_file():
        raise FileNotFoundError(f"no such .nzrt file: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(PREFIX.size)
        if len(prefix) < PREFIX.size:
            raise FormatError(f"{path}: {size} bytes is too short to be a .nzrt file")
        magic, hlen, hcrc, _ = PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise FormatError(f"{path}: not a .nzrt file (bad magic bytes)")
        if PREFIX.size + hlen > size:
            raise FormatError(f"{path}: truncated (header of {hlen} bytes does not fit in {size})")
        raw = f.read(hlen)
    if zlib.crc32(raw) != hcrc:
        raise FormatError(f"{path}: header checksum mismatch: the file is corrupted")
    try:
        head = json.loads(raw)
    except ValueError as e:
        raise FormatError(f"{path}: header is not valid JSON ({e})") from None
    if head.get("format") != "nzrt" or head.get("version") != FILE_VERSION:
        raise FormatError(f"{path}: unsupported .nzrt version {head.get('version')!r} "
                          f"(this nzrt reads version {FILE_VERSION})")
    return head, _pad(PREFIX.size + hlen), size


def load_metadata(path) -> dict:
    """The ``metadata`` dict stored by ``save`` (reads only the header)."""
    return _read_header(Path(path))[0]["metadata"]


def load(path, *, verify: bool = True) -> dict:
    """Map ``path`` into memory: name -> CompressedTensor (or Tensor for dense entries), no copy.

    With ``verify`` (the default) every buffer's CRC-32 is checked now, so corruption is
    reported here with the tensor's name; without it, compressed tensors are checked on first
    decode. Bounds are always checked.
    """
    path = Path(path)
    head, start, size = _read_header(path)
    whole = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8) if size else \
        torch.zeros(0, dtype=torch.uint8)
    out = {}
    for name, e in head["tensors"].items():
        try:
            off, nb = start + int(e["offset"]), int(e["nbytes"])
            if int(e["offset"]) < 0 or nb < 0 or off + nb > size:
                raise FormatError(f"its bytes [{off}, {off + nb}) lie past the end of the "
                                  f"{size}-byte file (truncated?)")
            blob = whole[off:off + nb]
            if e["kind"] == "compressed":
                ct = CompressedTensor(Header.from_dict(e["header"]), blob, source=str(path))
                if verify:
                    ct.verify()
                out[name] = ct
            elif e["kind"] == "dense":
                if verify and zlib.crc32(blob.numpy()) != int(e["crc32"]):
                    raise FormatError("checksum mismatch: the file is corrupted")
                dtype = getattr(torch, e["dtype"])
                out[name] = blob.view(dtype).reshape(e["shape"]) if nb else \
                    torch.empty(e["shape"], dtype=dtype)
            else:
                raise FormatError(f"unknown entry kind {e['kind']!r}")
        except FormatError as err:
            raise FormatError(f"{path}: tensor {name!r}: {err}") from None
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise FormatError(f"{path}: tensor {name!r}: malformed entry ({err!r})") from None
    return out
