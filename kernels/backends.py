"""The codec backends: what one must provide, and the registry that names them.

A backend is a module with

* ``encode(bits, layout, keep, tile, widths=None) -> (widths, has_raw, symbols, sections)``:
  1-D integer bit patterns to the stream sections of ``spec`` (bytes identical to
  ``reference.encode`` when ``widths`` is None);
* ``decode_into(ct, out_bits)``: the compressed tensor's bits into ``out_bits`` (1-D, the
  layout's integer type), bits identical to ``reference.decode``;
* optionally ``encode_blob(bits, layout, keep, tile, widths) -> (widths, has_raw, symbols, blob,
  table, crc)`` (the whole blob written in place, no copy of the sections) and
  ``linear(ct, x, bias)``, the fused decode-matmul.

``arrays`` says in which form its bit patterns travel: ``"numpy"`` (host arrays of the layout's
unsigned type) or ``"torch"`` (int16/int32 tensors on the device). ``Backend.encode`` and
``Backend.decode_into`` take torch tensors for every backend and convert, so callers never branch
on a backend's name or shape. Modules are imported on first use (numba and Triton are heavy).
"""
from __future__ import annotations

import ctypes
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import NamedTuple

import numpy as np

REQUIRED = ("encode", "decode_into")


class Encoded(NamedTuple):
    """What an encode returns: the codebook and either the sections or the finished blob."""
    widths: tuple
    has_raw: bool
    symbols: object
    sections: list | None = None
    blob: object = None      # numpy uint8, with its section table and CRC-32
    table: object = None
    crc: int | None = None


@dataclass(frozen=True)
class Backend:
    name: str
    module: str                 # import path
    devices: tuple              # torch device types it runs on
    arrays: str                 # "numpy" | "torch": how its bit patterns travel
    what: str = ""

    def load(self) -> ModuleType:
        """The module (from ``sys.modules`` after the first call: not cached here, so a test
        that re-imports a backend, e.g. Triton under the interpreter, is seen), checked against
        the protocol."""
        mod = importlib.import_module(self.module)
        missing = [f for f in REQUIRED if not callable(getattr(mod, f, None))]
        if missing:
            raise TypeError(f"backend {self.name!r} ({self.module}) lacks {', '.join(missing)}")
        return mod

    @property
    def has_linear(self) -> bool:
        return callable(getattr(self.load(), "linear", None))

    def _bits_in(self, bits, layout):
        return bits.cpu().numpy().view(layout.uint) if self.arrays == "numpy" else bits

    def encode(self, bits, layout, keep: int, tile: int, widths=None) -> Encoded:
        """``bits``: 1-D int16/int32 torch tensor of the float's patterns."""
        mod = self.load()
        data = self._bits_in(bits, layout)
        if hasattr(mod, "encode_blob"):
            widths, has_raw, symbols, blob, table, crc = mod.encode_blob(data, layout, keep, tile, widths)
            return Encoded(widths, has_raw, symbols, blob=blob, table=table, crc=crc)
        widths, has_raw, symbols, sections = mod.encode(data, layout, keep, tile, widths=widths)
        return Encoded(widths, has_raw, symbols, sections=sections)

    def decode_into(self, ct, out_bits, layout) -> None:
        """``out_bits``: 1-D int16/int32 torch tensor on ``ct``'s device."""
        if ct.device.type not in self.devices and not (self.arrays == "torch" and ct.device.type == "cpu"):
            raise ValueError(f"the {self.name} backend decodes {'/'.join(d.upper() for d in self.devices)} tensors; "
                             f"this one is on {ct.device}")
        self.load().decode_into(ct, _resizable_view(out_bits, layout) if self.arrays == "numpy" else out_bits)


def _resizable_view(bits, layout):
    """A writable numpy view of ``bits`` (CPU, contiguous) that leaves its storage resizable.

    ``Tensor.numpy()`` marks a storage non-resizable for good, and FSDP2 frees and re-grows the
    storage of the unsharded weights nzrt decodes into (``storage.resize_``). The caller holds
    ``bits`` for as long as the view is used (the decode call)."""
    if bits.device.type != "cpu" or not bits.is_contiguous():
        raise ValueError("decode_into writes a contiguous CPU tensor")
    nbytes = bits.numel() * bits.element_size()
    if nbytes == 0:
        return np.empty(0, layout.uint)
    raw = (ctypes.c_char * nbytes).from_address(bits.data_ptr())
    return np.frombuffer(raw, dtype=layout.uint)


REGISTRY = {b.name: b for b in (
    Backend("reference", "nzrt.kernels.reference", ("cpu",), "numpy", "readable, slow: the definition"),
    Backend("numba", "nzrt.kernels.cpu", ("cpu",), "numpy", "CPU kernels, parallel over tiles"),
    Backend("triton", "nzrt.kernels.triton", ("cuda",), "torch",
            "GPU kernels (CPU tensors under TRITON_INTERPRET=1)"),
)}
NAMES = tuple(REGISTRY)


def get(name: str) -> Backend:
    if name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)}")
    return REGISTRY[name]
