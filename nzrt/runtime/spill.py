"""Lossy mode's lossless restore copies, kept on disk instead of in RAM.

A lossy run computes with rounded weights but must give the exact originals back on exit. The
lossless copies go to an unnamed temporary file (``tempfile.TemporaryFile``: it has no name, so
nothing is left on disk whatever happens to the process) and are read back through a memory map:
their pages are file-backed and given back to the operating system after each restore
(``nzrt.osmem``). Directory: ``$NZRT_TMPDIR``, else the system's temporary directory.
"""
from __future__ import annotations

import mmap
import tempfile

import torch

from .. import osmem
from ..format import CompressedTensor
from ..kernels import env
from .errors import ManagedError

_ALIGN = 64


class RestoreSpill:
    SOURCE = "<nzrt restore file>"  # CompressedTensor.source of what get() returns

    def __init__(self):
        self._file = None
        self._size = 0
        self._map = None        # torch uint8 view of an mmap of the first _mapped bytes
        self._mapped = 0
        self._entries: dict = {}  # key -> (Header, offset, nbytes)

    def _open(self):
        where = env.get("NZRT_TMPDIR") or tempfile.gettempdir()
        try:
            self._file = tempfile.TemporaryFile(prefix="nzrt-restore-", dir=where)
        except OSError as e:
            raise ManagedError(f"nzrt: cannot create a temporary file for lossy mode's restore copies in "
                               f"{where} ({e}); set NZRT_TMPDIR to a writable directory") from None

    def add(self, key: str, ct: CompressedTensor) -> None:
        """Write ``ct``'s blob to the file now; nothing of it stays in memory."""
        if self._file is None:
            self._open()
        blob = ct.data.cpu().numpy() if ct.data.numel() else b""
        pad = (-self._size) % _ALIGN
        try:
            if pad:
                self._file.write(b"\0" * pad)
            self._file.write(memoryview(blob))
            self._file.flush()
        except OSError as e:
            raise ManagedError(f"nzrt: writing lossy mode's restore copy of {key!r} failed ({e}); "
                               f"free disk space or set NZRT_TMPDIR to a disk with room") from None
        off = self._size + pad
        self._size = off + ct.data.numel()
        self._entries[key] = (ct.header, off, ct.data.numel())

    def __contains__(self, key) -> bool:
        return key in self._entries

    def pop(self, key, default=None):
        return self._entries.pop(key, default)

    def get(self, key: str) -> CompressedTensor:
        """The restore copy of ``key``, memory-mapped from the file."""
        header, off, n = self._entries[key]
        if off + n > self._mapped:
            self._remap()
        data = self._map[off:off + n] if n else torch.zeros(0, dtype=torch.uint8)
        return CompressedTensor(header, data, verified=True, source=self.SOURCE, name=key)

    def _remap(self) -> None:
        self._file.flush()
        m = mmap.mmap(self._file.fileno(), self._size, flags=mmap.MAP_PRIVATE,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._map = torch.frombuffer(m, dtype=torch.uint8)  # the tensor keeps the map alive
        self._mapped = self._size

    def release(self, ct: CompressedTensor) -> None:
        """After a restore: its pages need not stay in RSS."""
        osmem.release_file_pages(ct.data, trusted=True)

    def nbytes(self) -> int:
        """Bytes on disk."""
        return self._size

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        self._entries.clear()
        self._map = None
        self._mapped = 0
        if self._file is not None:
            self._file.close()
            self._file = None
        self._size = 0
