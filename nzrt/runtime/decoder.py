"""The runtime's codec: one place that compresses and decodes a session's weights.

Why one object: a decode must take the codec lock where numba's threading layer needs it, give a
file-backed blob's pages back after each read, and use the session's backend; a compression must
use the session's mantissa bits and exponent code. The exponent code is chosen here, not in the
policy (``nzrt.policies`` describes what to keep where and stays free of codec and CPU details):
``Fused(widths=...)`` is a request, resolved by ``Decoder.widths`` against the device and, for
``"auto"``, whether the CPU has AVX-512BW (the fused kernel's fast path for the window code).
The kernels this needs are imported here only (``kernels.env`` aside, the settings' reader).
"""
from __future__ import annotations

import contextlib
import sys
import threading

import torch

from .. import codec, osmem
from ..format import CompressedTensor
from ..kernels.fused_reference import ROW_ID_DTYPES  # the integer ids a fused lookup takes
from .params import FLOATS

_DECODE_LOCK = threading.Lock()
_SERIAL = None


def codec_lock():
    """The lock that serialises codec kernels where numba's threading layer needs it, else none."""
    return _DECODE_LOCK if _serial_decode() else contextlib.nullcontext()


def _serial_decode() -> bool:
    """numba's "workqueue" threading layer must not run parallel kernels from two threads at
    once (the decode worker and an on-demand decode); "omp" and "tbb" may. Serialise only there."""
    global _SERIAL
    if _SERIAL is None:
        numba = sys.modules.get("numba")
        if numba is None:
            return False
        try:
            _SERIAL = numba.threading_layer() == "workqueue"
        except ValueError:  # no parallel kernel has run yet: be safe until one has
            return True
    return _SERIAL


def choose_widths(requested, device) -> tuple | None:
    """The exponent code weights are compressed with. ``requested``: the Fused policy's ``widths``,
    or None for the planner's smallest code (the cascade, ~10.7 bits a bf16 weight; every other
    policy). ``"auto"``: ``WINDOW4`` = ``(4,)``, one 4-bit level (~12.0 bits a bf16 weight, which the
    fused CPU kernel multiplies from ~1.7x faster), where that fast path runs: a CPU device with
    AVX-512BW; else None. Level widths such as ``(4,)`` are used as given."""
    if requested == "auto":
        from ..kernels.cpu.fused_w4 import HAS_AVX512BW  # numba: not at import
        return codec.WINDOW4 if device.type == "cpu" and HAS_AVX512BW else None
    return requested


def decode_chunks(mp, out, source, decode) -> torch.Tensor:
    """Decode each chunk of ``mp`` (``source(key)``: its CompressedTensor) into its rows of ``out``."""
    rows = out.view(mp.shape[0], -1) if out.dim() else out.view(1)
    for key, (a, b) in zip(mp.keys, mp.rows):
        ct = source(key)
        if ct.device != out.device:
            ct = ct.to(out.device)
        decode(ct, rows[a:b].reshape(-1) if mp.chunked else out.view(-1))
    return out


class Decoder:
    """A session's codec settings and the state of its reads: which blobs are read from their
    file each time (ids of CompressedTensors, told by placement) and the fused
    kernels' prepared views of compressed weights."""

    def __init__(self, device: torch.device, backend: str | None, mantissa_bits: int | None, requested_widths=None):
        self.device = device
        self.backend = backend
        self.mantissa_bits = mantissa_bits
        self._requested_widths = requested_widths
        self._widths = None
        self._widths_chosen = False
        self._read_from_file: dict = {}  # id(CompressedTensor) -> its map is read-only (keep cached)
        self._fused_weights: dict = {}  # key -> kernels.cpu.fused.FusedWeight of its compressed copy

    # -- the code -------------------------------------------------------------------------------
    @property
    def widths(self):
        """The exponent code of what this session compresses (see ``choose_widths``)."""
        if not self._widths_chosen:
            self._widths = choose_widths(self._requested_widths, self.device)
            self._widths_chosen = True
        return self._widths

    def compress_backend(self, t):
        return self.backend if self.backend is not None or t.device.type != "cuda" else None

    @property
    def tiles_on_cpu(self) -> bool:
        """Whether lookups may read single tiles of a compressed weight (the CPU numba codec)."""
        return self.device.type == "cpu" and codec.resolve_backend(self.backend, self.device) == "numba"

    # -- compressing ----------------------------------------------------------------------------
    def compress(self, t) -> CompressedTensor:
        """``t`` as the session keeps it: its mantissa bits, its exponent code (at entry)."""
        return codec.compress(t, mantissa_bits=self.mantissa_bits, backend=self.compress_backend(t),
                              widths=self.widths)

    def compress_exact(self, t) -> CompressedTensor:
        """``t`` losslessly, at entry (lossy mode's restore copy): no worker runs yet."""
        return codec.compress(t, backend=self.compress_backend(t))

    def compress_lossless(self, t) -> CompressedTensor:
        """``t`` compressed losslessly now (a training step), never beside a decode of the worker
        where numba's threading layer forbids two parallel kernels at once."""
        with codec_lock():
            return codec.compress(t, backend=self.compress_backend(t))

    # -- decoding -------------------------------------------------------------------------------
    def decode(self, ct, buf) -> None:
        """``ct``'s values into ``buf`` (flat, its dtype), under the codec lock."""
        with codec_lock():
            codec.decode_into(ct, buf, backend=self.backend)
        self.after_read(ct)

    def decode_with(self, ct, buf, backend) -> None:
        """A decode with another backend (the restore's retry with the reference codec)."""
        codec.decode_into(ct, buf, backend=backend)

    def rebased(self, ct, data) -> CompressedTensor:
        """``ct``'s header over ``data`` (its bytes copied elsewhere, e.g. a CUDA staging buffer)."""
        return CompressedTensor(ct.header, data, verified=True)

    def decompress(self, ct) -> torch.Tensor:
        out = torch.empty(ct.shape, dtype=ct.dtype, device=ct.device)
        self.decode(ct, out)
        return out

    def after_read(self, ct) -> None:
        """A kernel read ``ct`` (a decode, or a fused pass reading it straight): the disk tier's
        file pages go back after each read -- out of this process only where the map is
        read-only (the page cache keeps them for the next pass), else evicted as well."""
        readonly = self._read_from_file.get(id(ct))
        if readonly:
            osmem.unmap_file_pages(ct.data)
        elif readonly is not None:
            osmem.release_file_pages(ct.data, trusted=True)

    def read_from_file_each_time(self, cts) -> None:
        """Placement says which blobs are read from their file each time (CompressedTensors)."""
        maps = osmem.file_mappings(readonly=True)
        self._read_from_file = {id(ct): osmem.in_readonly_file_mapping(ct.data, maps) for ct in cts}

    def replaced(self, ct) -> None:
        """``ct`` is no longer a session's copy (a training step compressed a new one)."""
        self._read_from_file.pop(id(ct), None)

    def fused_weight(self, key, ct):
        """The fused kernels' prepared view of ``key``'s compressed copy ``ct`` (rebuilt when it changed)."""
        fw = self._fused_weights.get(key)
        if fw is None or fw.ct is not ct:
            from ..kernels.cpu.fused import FusedWeight
            fw = self._fused_weights[key] = FusedWeight(ct)
        return fw

    def forget_fused(self) -> None:
        self._fused_weights.clear()

    def warm(self, dtypes, decode: bool) -> None:
        """Load the codec's machine code now (the encoder, or the decoder), for each of ``dtypes``,
        on a tensor large enough for the parallel kernels: so that no compiler page is touched
        later, while the model's compressed copy is held (compression, the first pass)."""
        if self.device.type != "cpu":
            return
        g = torch.Generator().manual_seed(0)
        for dtype in dict.fromkeys(d for d in dtypes if d in FLOATS):
            t = torch.randn(1 << 17, generator=g).mul_(0.02).to(dtype)  # 16 tiles: the parallel path
            ct = self.compress(t)
            if decode:
                codec.decode_into(ct, torch.empty_like(t), backend=self.backend)
