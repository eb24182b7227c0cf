""".nzrt files: a JSON header and aligned raw buffers, memory-mapped on load. No pickle anywhere.

Layout::

    b"NZRT\\r\\n\\x1a\\n"  u64 header length  u32 header CRC-32  u32 zero
    header JSON (utf-8), zero padding to ALIGN
    buffer 0, padding, buffer 1, ...    (each buffer starts at a multiple of ALIGN)

The header maps each tensor name to either a compressed tensor (its codec header and where
its blob lies) or a dense tensor (dtype, shape, where its bytes lie). Every entry carries a
CRC-32 of its name and fields (for a dense tensor, then its bytes; a compressed blob is
covered by its codec header's own CRCs). Buffers lie in entry order, each at the first
ALIGN-aligned byte after the previous one, and the file ends after the last: one layout per
header, so a header whose sizes, offsets or types disagree with it is refused whole (as
safetensors does) before a byte of data is read.
"""
from __future__ import annotations

import json
import math
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch

from . import header as H
from .tensor import MAX_RANK, CompressedTensor, FormatError, Header

MAGIC = b"NZRT\r\n\x1a\n"
PREFIX = struct.Struct("<8sQII")
ALIGN = 64
FILE_VERSION = 2  # 2: every entry has a CRC-32 of its name and fields; canonical layout
_TOP = ("format", "version", "metadata", "tensors")
_KEYS = {"compressed": ("kind", "header", "offset", "nbytes", "crc32"),
         "dense": ("kind", "dtype", "shape", "offset", "nbytes", "crc32")}
DENSE_DTYPES = {n: getattr(torch, n) for n in (
    "float64", "float32", "float16", "bfloat16", "complex64", "complex128", "int64", "int32",
    "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool", "float8_e4m3fn", "float8_e5m2")
    if isinstance(getattr(torch, n, None), torch.dtype)}


def _pad(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _dense_bytes(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)


class Writer:
    """Write a ``.nzrt`` one tensor at a time: each ``add`` writes the tensor's bytes to disk at
    once and keeps only its header entry, so a whole model never needs to be in memory.

    The header precedes the buffers but is only known at the end, so the buffers go to a
    temporary data file beside ``path``; ``close`` writes prefix, header and padding to a second
    temporary file, copies the data after them in bounded chunks, fsyncs and renames it over
    ``path`` (atomic: readers see the old file or the whole new one). As a context manager it
    closes on success and aborts (removing every temporary) on any exception, Ctrl-C included.
    """

    COPY_CHUNK = 8 << 20

    def __init__(self, path, metadata: dict | None = None):
        self.path = Path(path)
        self.metadata = metadata
        if metadata is not None:
            _check_metadata(metadata)
        self._entries: dict = {}
        self._pos = 0
        self._closed = False
        self._tmp = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._data_path = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".data.tmp",
                                               dir=self.path.parent)
        self._data = os.fdopen(fd, "wb")

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if not self._closed:  # close(metadata) may have been called inside the block
                self.close()
        elif not self._closed:
            self.abort()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def add(self, name: str, value) -> None:
        """Append ``value`` (a Tensor or CompressedTensor) as ``name``; its bytes are written now."""
        if self._closed:
            raise ValueError(f"{self.path}: the writer is closed")
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {type(name).__name__}")
        if name in self._entries:
            raise ValueError(f"{self.path}: tensor {name!r} was already added (duplicate name)")
        pos = self._pos
        if isinstance(value, CompressedTensor):
            blob = value.data.cpu().numpy()
            e = {"kind": "compressed", "header": json.loads(value.header.to_json()),
                 "offset": pos, "nbytes": int(blob.nbytes)}
            entry = dict(e, crc32=_entry_crc(name, e))
        elif isinstance(value, torch.Tensor):
            blob = _dense_bytes(value)
            e = {"kind": "dense", "dtype": str(value.dtype).removeprefix("torch."),
                 "shape": list(value.shape), "offset": pos, "nbytes": int(blob.nbytes)}
            entry = dict(e, crc32=zlib.crc32(blob, _entry_crc(name, e)))
        else:
            raise TypeError(f"tensor {name!r}: expected a torch.Tensor or CompressedTensor, "
                            f"got {type(value).__name__}")
        if blob.nbytes:
            self._data.write(memoryview(blob))
        end = _pad(pos + blob.nbytes)
        if end > pos + blob.nbytes:
            self._data.write(b"\0" * (end - pos - blob.nbytes))
        self._entries[name] = entry
        self._pos = end

    def close(self, metadata: dict | None = None) -> None:
        """Write the final file atomically. ``metadata`` given here replaces the constructor's."""
        if self._closed:
            raise ValueError(f"{self.path}: the writer is closed")
        try:
            if metadata is not None:
                _check_metadata(metadata)
                self.metadata = metadata
            header = json.dumps({"format": "nzrt", "version": FILE_VERSION,
                                 "metadata": self.metadata or {}, "tensors": self._entries},
                                separators=(",", ":")).encode()
            data_start = _pad(PREFIX.size + len(header))
            self._data.flush()
            self._data.close()
            fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp",
                                             dir=self.path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(PREFIX.pack(MAGIC, len(header), zlib.crc32(header), 0))
                f.write(header)
                f.write(b"\0" * (data_start - PREFIX.size - len(header)))
                f.flush()
                with open(self._data_path, "rb") as src:
                    _copy(src, f, self._pos, self.COPY_CHUNK)
                f.flush()
                os.fsync(f.fileno())
            os.replace(self._tmp, self.path)
            self._tmp = None
            os.unlink(self._data_path)
            self._closed = True
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Give up: remove the temporaries (the destination is left as it was)."""
        self._closed = True
        try:
            self._data.close()
        except Exception:  # pragma: no cover
            pass
        for p in (self._data_path, self._tmp):
            if p is not None and os.path.exists(p):
                os.unlink(p)
        self._tmp = None

    def __del__(self):  # an abandoned writer leaves no temporaries behind
        if not getattr(self, "_closed", True):
            try:
                self.abort()
            except Exception:
                pass


def _check_metadata(metadata) -> None:
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    json.dumps(metadata)  # TypeError / ValueError now, not after the data is written


def _copy(src, dst, n: int, chunk: int) -> None:
    """Copy ``n`` bytes from ``src`` to ``dst`` (both at their positions), ``chunk`` at a time."""
    fin, fout = src.fileno(), dst.fileno()
    left = n
    if hasattr(os, "copy_file_range"):
        try:
            while left:
                k = os.copy_file_range(fin, fout, min(chunk, left))
                if k == 0:
                    break
                left -= k
        except OSError:
            pass  # not supported here: copy the rest by hand
    if left:
        done = n - left
        src.seek(done)
        dst.seek(0, os.SEEK_END)
        buf = bytearray(min(chunk, left))
        view = memoryview(buf)
        while left:
            k = src.readinto(view[:min(chunk, left)])
            if not k:
                raise OSError(f"the data file ended {left} bytes early")
            dst.write(view[:k])
            left -= k
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fin, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:  # pragma: no cover
            pass


def save(path, tensors: dict, metadata: dict | None = None) -> None:
    """Write ``tensors`` (name -> Tensor or CompressedTensor) to ``path`` atomically.

    ``metadata`` is any JSON-able dict (a model's config, say), returned by ``load_metadata``.
    """
    with Writer(path, metadata) as w:
        for name, value in tensors.items():
            w.add(name, value)


def _entry_crc(name: str, entry: dict) -> int:
    """CRC-32 of a tensor's name and entry fields (``crc32`` itself excluded)."""
    return zlib.crc32(H.dumps([name, {k: v for k, v in entry.items() if k != "crc32"}]).encode())


def _read_header(path: Path) -> tuple[dict, int, int]:
    """(header dict, byte where the buffers start, file size), the header checked whole."""
    if not path.is_file():
        raise FileNotFoundError(f"no such .nzrt file: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(PREFIX.size)
        if len(prefix) < PREFIX.size:
            raise FormatError(f"{path}: {size} bytes is too short to be a .nzrt file")
        magic, hlen, hcrc, reserved = PREFIX.unpack(prefix)
        if magic != MAGIC:
            raise FormatError(f"{path}: not a .nzrt file (bad magic bytes)")
        if PREFIX.size + hlen > size:
            raise FormatError(f"{path}: truncated (header of {hlen} bytes does not fit in {size})")
        if hlen > H.MAX_HEADER_BYTES or reserved:
            raise FormatError(f"{path}: malformed prefix (header of {hlen} bytes, reserved word "
                              f"{reserved:#x})")
        raw = f.read(hlen)
    if zlib.crc32(raw) != hcrc:
        raise FormatError(f"{path}: header checksum mismatch: the file is corrupted")
    try:
        head = H.loads(raw)
        if head.get("format") != "nzrt" or head.get("version") != FILE_VERSION \
                or type(head.get("version")) is not int:
            old = " (written by an older nzrt: re-create it with `nzrt compress`)" \
                if head.get("version") == 1 and type(head.get("version")) is int else ""
            raise FormatError(f"unsupported .nzrt version {H._show(head.get('version'))} "
                              f"(this nzrt reads version {FILE_VERSION}){old}")
        H.expect_keys(head, _TOP, "the file header")
        if type(head["metadata"]) is not dict or type(head["tensors"]) is not dict:
            raise FormatError("malformed header: metadata and tensors must be objects")
    except FormatError as e:
        raise FormatError(f"{path}: {e}") from None
    start = _pad(PREFIX.size + hlen)
    pos, name = 0, None
    for name, e in head["tensors"].items():
        try:
            pos = _check_entry(name, e, pos)
            if start + e["offset"] + e["nbytes"] > size:
                raise FormatError(f"its bytes end at {start + e['offset'] + e['nbytes']}, past the "
                                  f"end of the {size}-byte file (truncated?)")
        except FormatError as err:
            raise FormatError(f"{path}: tensor {name!r}: {err}") from None
    if start + pos != size:
        who = f"tensor {name!r} (the last): " if name is not None else ""
        raise FormatError(f"{path}: {who}the buffers end at byte {start + pos}, the file at {size} "
                          f"({'truncated' if size < start + pos else 'trailing bytes'})")
    return head, start, size


def _check_entry(name: str, e: dict, pos: int) -> int:
    """Check one entry's fields (replacing its codec header by a validated ``Header``); return
    where the next buffer starts."""
    kind = e.get("kind") if type(e) is dict else None
    if type(kind) is not str or kind not in _KEYS:
        raise FormatError(f"unknown entry kind {H._show(kind)}")
    H.expect_keys(e, _KEYS[kind], f"the {kind} entry")
    off = H.as_int(e["offset"], "offset", 0, 1 << 62)
    nb = H.as_int(e["nbytes"], "nbytes", 0, 1 << 62)
    H.as_int(e["crc32"], "crc32", 0, (1 << 32) - 1)
    if off != pos:
        raise FormatError(f"its bytes start at {off}, the layout puts them at {pos} "
                          f"(moved or overlapping buffers)")
    if kind == "compressed":
        crc = _entry_crc(name, e)
        if crc != e["crc32"]:
            raise FormatError("entry checksum mismatch: its fields were changed")
        h = Header.from_dict(e["header"])
        if nb != h.blob_nbytes:
            raise FormatError(f"nbytes {nb}, its codec header implies {h.blob_nbytes}")
        e["header"] = h
    else:
        H.as_str(e["dtype"], "dtype", DENSE_DTYPES)
        shape = H.as_ints(e["shape"], "shape", 0, 1 << 48, MAX_RANK)
        want = math.prod(shape) * DENSE_DTYPES[e["dtype"]].itemsize
        if nb != want:
            raise FormatError(f"nbytes {nb}, its dtype and shape {list(shape)} imply {want}")
    return _pad(off + nb)


def load_metadata(path) -> dict:
    """The ``metadata`` dict stored by ``save`` (reads only the header)."""
    return _read_header(Path(path))[0]["metadata"]


def _map_readonly(path: Path, size: int) -> torch.Tensor:
    """The file's first ``size`` bytes mapped read-only: the compressed blobs live here. Nothing
    writes them (a training step compresses a new copy), and a read-only map can never hold a
    written page, so the disk tier may take its pages out of the process after each read and leave
    them in the page cache (``osmem.unmap_file_pages``). Dense entries stay in a writable private
    map: they become the model's own tensors, which the user may change in place."""
    import mmap
    import warnings
    if not size:
        return torch.zeros(0, dtype=torch.uint8)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    with warnings.catch_warnings():  # "the given buffer is not writable": by design, see above
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(m, dtype=torch.uint8, count=size)  # the tensor keeps the map alive


def load(path, *, verify: bool = True) -> dict:
    """Map ``path`` into memory: name -> CompressedTensor (or Tensor for dense entries), no copy.

    The header is checked whole first (strict JSON, every field typed, every size and offset
    consistent). With ``verify`` (the default) every compressed blob's CRC-32 and tables are
    checked now, so corruption is reported here with the tensor's name; without it, on first
    decode (again with file and tensor named). Dense buffers are always checked here: they are
    returned as plain tensors, with no later moment to check them. Every malformed input is a
    ``FormatError`` naming the file and the tensor.
    """
    path = Path(path)
    head, start, size = _read_header(path)
    whole = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8) if size else \
        torch.zeros(0, dtype=torch.uint8)
    blobs = _map_readonly(path, size)
    out = {}
    for name, e in head["tensors"].items():
        span = slice(start + e["offset"], start + e["offset"] + e["nbytes"])
        blob = whole[span]
        if e["kind"] == "compressed":
            blob = blobs[span]
            ct = CompressedTensor(e["header"], blob, source=str(path), name=name)
            if verify:
                ct.verify()
            out[name] = ct
        else:
            if zlib.crc32(blob.numpy(), _entry_crc(name, e)) != e["crc32"]:
                raise FormatError(f"{path}: tensor {name!r}: checksum mismatch: the file is corrupted")
            dtype, shape = DENSE_DTYPES[e["dtype"]], e["shape"]
            out[name] = blob.view(dtype).reshape(shape) if e["nbytes"] else torch.empty(shape, dtype=dtype)
    return out
