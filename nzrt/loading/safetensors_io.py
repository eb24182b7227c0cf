"""Read safetensors checkpoints one tensor at a time, without mmap.

``safetensors.safe_open`` maps the whole file: every tensor read through it stays in the page
cache and is counted in the process's RSS (as file-backed pages) until the map is closed. Here
the header is parsed and validated by us, whole, before a byte of data is read, and each tensor
is read with ``readinto`` into a fresh ``torch.empty`` buffer: anonymous memory that is freed
when the tensor is dropped. After each read the range is handed back to the kernel with
``posix_fadvise(POSIX_FADV_DONTNEED)`` where available, so the page cache stays small too.

Layout of a safetensors file: u64 little-endian header length N, N bytes of JSON
(``{"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, ...}`` plus an
optional ``"__metadata__"`` object of strings), then the data; offsets are relative to the start
of the data. As safetensors itself does, we refuse a header whose byte ranges are out of bounds,
overlap, leave holes, or disagree with dtype and shape.
"""
from __future__ import annotations

import math
import os
import struct
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..format import header as H
from ..format import FormatError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
MAX_RANK = 64
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}
_FADVISE = getattr(os, "posix_fadvise", None)
_DONTNEED = getattr(os, "POSIX_FADV_DONTNEED", None)


class SafetensorsError(FormatError):
    """A safetensors file or index that cannot be read; the message names file and tensor."""


class _Entry:
    __slots__ = ("file", "dtype", "shape", "begin", "end")

    def __init__(self, file: Path, dtype: torch.dtype, shape: tuple, begin: int, end: int):
        self.file, self.dtype, self.shape, self.begin, self.end = file, dtype, shape, begin, end

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path) -> tuple[dict[str, _Entry], dict, int]:
    """(name -> entry in file order with absolute offsets, ``__metadata__``, file size), the
    header of ``path`` validated whole; a ``SafetensorsError`` naming file and tensor otherwise."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb", buffering=0) as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SafetensorsError(f"{path}: {size} bytes is too short to be a safetensors file")
            (hlen,) = struct.unpack("<Q", prefix)
            if hlen > MAX_HEADER_BYTES:
                raise SafetensorsError(f"{path}: header length {hlen} exceeds the "
                                       f"{MAX_HEADER_BYTES}-byte limit (corrupted or not safetensors)")
            if 8 + hlen > size:
                raise SafetensorsError(f"{path}: truncated: a header of {hlen} bytes does not fit "
                                       f"in the {size}-byte file")
            raw = f.read(hlen)
            if len(raw) != hlen:
                raise SafetensorsError(f"{path}: truncated while reading the header")
    except OSError as e:
        raise SafetensorsError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        head = H.loads(raw)
    except FormatError as e:
        raise SafetensorsError(f"{path}: {e}") from None
    start = 8 + hlen
    data_len = size - start
    meta = head.pop("__metadata__", None)
    if meta is None:
        meta = {}
    elif type(meta) is not dict or any(type(v) is not str for v in meta.values()):
        raise SafetensorsError(f"{path}: __metadata__ must be an object of strings")
    spans = []
    for name, e in head.items():
        try:
            if type(e) is not dict:
                raise SafetensorsError(f"its entry is a JSON {type(e).__name__}, not an object")
            if set(e) != {"dtype", "shape", "data_offsets"}:
                raise SafetensorsError(f"its entry has keys {sorted(e)}; expected dtype, shape, data_offsets")
            dt = e["dtype"]
            if type(dt) is not str or dt not in DTYPES:
                raise SafetensorsError(f"dtype {H._show(dt)} is not supported (supported: {', '.join(DTYPES)})")
            shape = e["shape"]
            if type(shape) is not list or len(shape) > MAX_RANK or \
                    any(type(d) is not int or d < 0 or d >= 1 << 48 for d in shape):
                raise SafetensorsError(f"shape {H._show(shape)} is not a list of non-negative integers")
            offs = e["data_offsets"]
            if type(offs) is not list or len(offs) != 2 or any(type(o) is not int or o < 0 for o in offs):
                raise SafetensorsError(f"data_offsets {H._show(offs)} is not [begin, end]")
            b, en = offs
            if b > en:
                raise SafetensorsError(f"data_offsets [{b}, {en}] end before they begin")
            if en > data_len:
                raise SafetensorsError(f"data_offsets [{b}, {en}] end past the {data_len} data bytes "
                                       f"(out of bounds or truncated file)")
            want = math.prod(shape) * DTYPES[dt].itemsize
            if en - b != want:
                raise SafetensorsError(f"spans {en - b} bytes, its dtype {dt} and shape {shape} imply {want}")
        except SafetensorsError as err:
            raise SafetensorsError(f"{path}: tensor {name!r}: {err}") from None
        spans.append((b, en, name, DTYPES[dt], tuple(shape)))
    spans.sort(key=lambda s: (s[0], s[1]))
    pos, prev = 0, None
    for b, en, name, _, _ in spans:
        if b < pos:
            raise SafetensorsError(f"{path}: tensor {name!r}: its bytes [{b}, {en}) overlap those of "
                                   f"tensor {prev!r} (which end at {pos})")
        if b > pos:
            raise SafetensorsError(f"{path}: tensor {name!r}: a hole of {b - pos} bytes before it "
                                   f"(offsets are not contiguous)")
        pos, prev = en, name
    if pos != data_len:
        raise SafetensorsError(f"{path}: the tensors end at data byte {pos}, the file has {data_len} "
                               f"({'truncated' if pos > data_len else 'trailing bytes'})")
    entries = {name: _Entry(path, dt, shape, start + b, start + en) for b, en, name, dt, shape in spans}
    return entries, meta, size


def _read_entry(f, e: _Entry, name: str) -> torch.Tensor:
    """Read one tensor from the open raw file ``f`` into fresh (anonymous) memory."""
    n = e.nbytes
    if n == 0:
        return torch.empty(e.shape, dtype=e.dtype)
    buf = torch.empty(n, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    f.seek(e.begin)
    got = 0
    while got < n:
        k = f.readinto(view[got:])
        if not k:
            raise SafetensorsError(f"{e.file}: tensor {name!r}: the file ended after {got} of its "
                                   f"{n} bytes (it changed since its header was read?)")
        got += k
    del view
    if _FADVISE is not None and _DONTNEED is not None:
        try:
            _FADVISE(f.fileno(), e.begin, n, _DONTNEED)
        except OSError:  # pragma: no cover - advisory only
            pass
    return buf.view(e.dtype).reshape(e.shape)


def _shard_files(path: Path) -> list[Path]:
    """The safetensors files of a directory (or a single file), in the order they are read."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no such safetensors file or directory: {path}")
    index = path / INDEX
    if index.is_file():
        try:
            idx = H.loads(index.read_bytes())
        except FormatError as e:
            raise SafetensorsError(f"{index}: {e}") from None
        wm = idx.get("weight_map")
        if type(wm) is not dict or any(type(v) is not str for v in wm.values()):
            raise SafetensorsError(f"{index}: weight_map must be an object of tensor name -> file name")
        files = []
        for name, fname in wm.items():
            if fname in ("", ".", "..") or "/" in fname or "\\" in fname or fname.startswith("."):
                raise SafetensorsError(f"{index}: tensor {name!r}: shard {fname!r} is not a file name "
                                       f"inside the directory")
            if path / fname not in files:
                files.append(path / fname)
        return files
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found
    raise FileNotFoundError(f"{path}: no {SINGLE} or {INDEX}" +
                            (f" ({len(found)} .safetensors files and no index)" if found else ""))


class SafetensorsDir(Mapping):
    """A transformers checkpoint directory (``model.safetensors`` or a sharded
    ``model.safetensors.index.json``), or a single ``.safetensors`` file, as a read-only mapping
    name -> Tensor. Every header (and the index) is validated whole on construction; each
    ``self[name]`` reads that one tensor fresh from disk into its own memory."""

    def __init__(self, path):
        self.path = Path(path)
        if sys.byteorder != "little":  # pragma: no cover
            raise SafetensorsError("safetensors data is little-endian; this machine is not")
        self._files = _shard_files(self.path)
        self._entries: dict[str, _Entry] = {}
        self.metadata: dict = {}
        where: dict[str, Path] = {}
        for f in self._files:
            if not f.is_file():
                raise SafetensorsError(f"{self.path}: shard {f.name} named in {INDEX} is missing")
            entries, meta, _ = read_header(f)
            self.metadata.update(meta)
            for name, e in entries.items():
                if name in where:
                    raise SafetensorsError(f"{f}: tensor {name!r} is also in {where[name].name}")
                where[name] = f
                self._entries[name] = e
        index = self.path / INDEX
        if self.path.is_dir() and index.is_file():
            wm = H.loads(index.read_bytes())["weight_map"]
            for name, fname in wm.items():
                if name not in where:
                    raise SafetensorsError(f"{index}: tensor {name!r} is not in its shard {fname}")
                if where[name].name != fname:
                    raise SafetensorsError(f"{index}: tensor {name!r} is in {where[name].name}, "
                                           f"the index says {fname}")
            extra = [n for n in where if n not in wm]
            if extra:
                raise SafetensorsError(f"{where[extra[0]]}: tensor {extra[0]!r} is not in {INDEX} "
                                       f"({len(extra)} such tensors)")

    # Mapping
    def __getitem__(self, name: str) -> torch.Tensor:
        e = self._entries[name]
        with open(e.file, "rb", buffering=0) as f:
            return _read_entry(f, e, name)

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"SafetensorsDir({str(self.path)!r}, {len(self)} tensors, {self.total_bytes()} bytes)"

    def mapped(self, name: str) -> torch.Tensor | None:
        """``name`` memory-mapped from its file (copy-on-write, so writes never reach the file),
        with a storage of its own bytes: only the pages read become resident (an embedding's
        looked-up rows, say). None where the bytes are not aligned for their dtype."""
        import numpy as np

        e = self._entries[name]
        np_dtype = {torch.bfloat16: np.uint16, torch.float16: np.float16, torch.float32: np.float32,
                    torch.float64: np.float64}.get(e.dtype)
        if np_dtype is None or e.nbytes == 0 or e.begin % np.dtype(np_dtype).itemsize:
            return None
        arr = np.memmap(e.file, dtype=np_dtype, mode="c", offset=e.begin, shape=(e.nbytes // np.dtype(np_dtype).itemsize,))
        t = torch.from_numpy(arr)
        if e.dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        return t.reshape(e.shape)

    def info(self, name: str) -> tuple[torch.dtype, tuple, int]:
        """(dtype, shape, nbytes) of ``name``, from the header only."""
        e = self._entries[name]
        return e.dtype, e.shape, e.nbytes

    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    @property
    def files(self) -> list[Path]:
        return list(self._files)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:  # type: ignore[override]
        """(name, tensor) in file order, one file open at a time, one tensor held at a time."""
        f, cur = None, None
        try:
            for name, e in self._entries.items():
                if e.file != cur:
                    if f is not None:
                        f.close()
                    f, cur = open(e.file, "rb", buffering=0), e.file
                t = _read_entry(f, e, name)
                yield name, t
                del t
        finally:
            if f is not None:
                f.close()


def iter_tensors(path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a safetensors file or checkpoint directory, in file order; every header
    is validated before the first tensor is read."""
    return SafetensorsDir(path).items()


def has_safetensors(path) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / SINGLE).is_file() or (path / INDEX).is_file())


__all__ = ["SafetensorsDir", "SafetensorsError", "iter_tensors", "read_header", "has_safetensors", "DTYPES"]
