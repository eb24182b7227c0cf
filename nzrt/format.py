"""CompressedTensor: one contiguous byte blob (aligned sections) plus a small versioned header.

The same layout serves device memory, pinned host buffers and ``.nzrt`` files; the header is
plain JSON (no pickle) and carries a CRC-32 of the blob.
"""
from __future__ import annotations

import json
import math
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .kernels import spec
from .kernels.spec import FormatError

SECTION_DTYPES = {"offsets": np.uint32, "patch_idx": np.int64}  # others: uint8, or the float's uint


@dataclass(frozen=True)
class Header:
    dtype: str  # "bfloat16" | "float16" | "float32"
    shape: tuple[int, ...]
    mantissa_bits: int  # kept mantissa bits (== the dtype's for lossless)
    tile: int
    widths: tuple[int, ...]  # coded levels
    has_raw: bool
    symbols: tuple[int, ...]  # exponents named by the coded levels, in code order
    sections: dict = field(default_factory=dict)  # name -> (byte offset, nbytes, rows, cols)
    crc32: int = 0
    version: int = spec.FORMAT_VERSION

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def layout(self) -> spec.FloatLayout:
        return spec.LAYOUTS[self.dtype]

    @property
    def lossless(self) -> bool:
        return self.mantissa_bits == self.layout.man_bits

    def to_json(self) -> str:
        d = asdict(self)
        d["sections"] = {k: list(v) for k, v in self.sections.items()}
        return json.dumps(d, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Header":
        try:
            if d.get("version") != spec.FORMAT_VERSION:
                raise FormatError(f"unknown format version {d.get('version')!r}; "
                                  f"this nzrt reads version {spec.FORMAT_VERSION}")
            h = cls(dtype=str(d["dtype"]), shape=tuple(int(s) for s in d["shape"]),
                    mantissa_bits=int(d["mantissa_bits"]), tile=int(d["tile"]),
                    widths=tuple(int(w) for w in d["widths"]), has_raw=bool(d["has_raw"]),
                    symbols=tuple(int(s) for s in d["symbols"]),
                    sections={k: tuple(int(x) for x in v) for k, v in d["sections"].items()},
                    crc32=int(d["crc32"]), version=int(d["version"]))
        except FormatError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"malformed header: {e!r}") from None
        h.validate()
        return h

    def expected_sections(self) -> dict:
        """name -> (nbytes, rows, cols) that the header implies; the bounds every decoder relies on."""
        lay = self.layout
        n = self.numel
        widths = spec.level_widths(self.widths, self.has_raw, lay.exp_bits)
        tiles = spec.n_tiles(n, self.tile)
        exp = {"sm": (spec.packed_nbytes(n, spec.sm_width(self.mantissa_bits)), 0, 0)}
        exp["offsets"] = ((tiles + 1) * max(len(widths) - 1, 0) * 4, tiles + 1, max(len(widths) - 1, 0))
        return exp

    def validate(self) -> None:
        """Structural checks that need no buffer: anything a decoder indexes by must be sane."""
        if self.dtype not in spec.LAYOUTS:
            raise FormatError(f"unsupported dtype {self.dtype!r}")
        lay = self.layout
        if any(s < 0 for s in self.shape):
            raise FormatError(f"negative shape {self.shape}")
        if not 0 <= self.mantissa_bits <= lay.man_bits:
            raise FormatError(f"mantissa_bits {self.mantissa_bits} out of range 0..{lay.man_bits}")
        if self.tile <= 0 or self.tile % 8:
            raise FormatError(f"tile {self.tile} is not a positive multiple of 8")
        if len(self.widths) > spec.MAX_LEVELS or any(not 1 <= w <= min(spec.MAX_WIDTH, lay.exp_bits) for w in self.widths):
            raise FormatError(f"bad level widths {self.widths}")
        cap = sum((1 << w) - 1 for w in self.widths)
        if len(self.symbols) > cap or any(not 0 <= s <= lay.exp_mask for s in self.symbols):
            raise FormatError("symbol table does not fit the levels")
        if self.numel and not self.widths and not self.has_raw:
            raise FormatError("no exponent level for a non-empty tensor")
        for name, (nbytes, rows, cols) in self.expected_sections().items():
            got = self.sections.get(name)
            if got is None or got[1] != nbytes or (rows and tuple(got[2:]) != (rows, cols)):
                raise FormatError(f"section {name!r} is {got}, the header implies {nbytes} bytes")


def checksum(blob: np.ndarray) -> int:
    """``zlib.crc32`` of a uint8 array: the numba backend's carry-less-multiply CRC-32 where
    numba is installed (same value, several times faster), else zlib's."""
    global _crc32
    if _crc32 is None:
        try:
            from .kernels.numba_cpu import crc32 as fast
        except ImportError:
            fast = zlib.crc32
        _crc32 = fast
    return _crc32(blob)


_crc32 = None


def _align(x: int) -> int:
    a = spec.SECTION_ALIGN
    return (x + a - 1) // a * a


def _level_names(h: Header) -> list[str]:
    return [f"level{i}" for i in range(len(spec.level_widths(h.widths, h.has_raw, h.layout.exp_bits)))]


class CompressedTensor:
    """A float tensor held as a compressed byte blob. Build it with ``nzrt.compress``.

    ``data`` is a 1-D uint8 torch tensor (any device, possibly pinned or memory-mapped);
    ``header`` says how to read it.
    """

    __slots__ = ("header", "data", "source", "_verified", "_np_sections")

    def __init__(self, header: Header, data: torch.Tensor, *, verified: bool = False,
                 source: str | None = None):
        if data.dtype != torch.uint8 or data.dim() != 1:
            raise FormatError("CompressedTensor data must be a 1-D uint8 tensor")
        self.header = header
        self.data = data
        self.source = source  # the file whose memory map holds ``data``, if any
        self._verified = verified
        self._np_sections = None
        self._check_bounds()

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_sections(cls, header_fields: dict, sections: dict) -> "CompressedTensor":
        """Lay ``sections`` (name -> array, in order) out in one blob, each 16-byte aligned."""
        sections = {name: np.ascontiguousarray(arr) for name, arr in sections.items()}
        table, pos = {}, 0
        for name, arr in sections.items():
            rows, cols = (arr.shape + (0,))[:2] if arr.ndim == 2 else (0, 0)
            table[name] = (pos, arr.nbytes, rows, cols)
            pos = _align(pos + arr.nbytes)
        blob = np.empty(pos, np.uint8)  # every byte is written below: a section or a zero gap
        for name, arr in sections.items():
            off, nb = table[name][:2]
            blob[off:off + nb] = arr.reshape(-1).view(np.uint8)
            blob[off + nb:_align(off + nb)] = 0
        return cls.from_blob(header_fields, blob, table)

    @classmethod
    def from_blob(cls, header_fields: dict, blob: np.ndarray, table: dict,
                  crc32: int | None = None) -> "CompressedTensor":
        """A blob already laid out as ``from_sections`` lays it out (a backend that writes its
        sections in place); ``table[name] = (byte offset, nbytes, rows, cols)``; ``crc32``: the
        blob's ``zlib.crc32`` if the backend computed it."""
        crc32 = checksum(blob) if crc32 is None else crc32
        header = Header(**header_fields, sections=table, crc32=crc32)
        header.validate()
        return cls(header, torch.from_numpy(blob), verified=True)

    # -- the tensor-like face ----------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.header.shape)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.header.dtype)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def numel(self) -> int:
        return self.header.numel

    @property
    def nbytes(self) -> int:
        """Every byte held: the blob (streams, tables, offsets, padding) and the header."""
        return self.data.numel() + len(self.header.to_json())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / max(self.numel(), 1)

    def to(self, device, non_blocking: bool = False) -> "CompressedTensor":
        data = self.data.to(device, non_blocking=non_blocking)
        return CompressedTensor(self.header, data, verified=self._verified,
                                source=self.source if data is self.data else None)

    def pin_memory(self) -> "CompressedTensor":
        return CompressedTensor(self.header, self.data.pin_memory(), verified=self._verified)

    def is_pinned(self) -> bool:
        return self.data.is_pinned()

    def __repr__(self) -> str:
        h = self.header
        mode = "lossless" if h.lossless else f"mantissa_bits={h.mantissa_bits}"
        return (f"CompressedTensor(shape={tuple(h.shape)}, dtype={h.dtype}, {mode}, "
                f"{self.bits_per_weight:.2f} bits/weight, device={self.device})")

    # -- integrity --------------------------------------------------------------------------
    def _check_bounds(self) -> None:
        h = self.header
        size = self.data.numel()
        names = ["sm", "offsets", "patch_idx", "patch_val"] + _level_names(h)
        for name in names:
            if name not in h.sections:
                raise FormatError(f"section {name!r} missing")
            off, nb = h.sections[name][:2]
            if off < 0 or nb < 0 or off + nb > size:
                raise FormatError(f"section {name!r} [{off}, {off + nb}) lies outside the "
                                  f"{size}-byte buffer (truncated?)")
            if off % spec.SECTION_ALIGN:
                raise FormatError(f"section {name!r} is misaligned")
        if h.sections["patch_idx"][1] // 8 * h.layout.itemsize != h.sections["patch_val"][1]:
            raise FormatError("patch sections disagree in length")

    def verify(self) -> None:
        """Check the CRC-32 of the blob (once; cached) and the stream offsets."""
        if self._verified:
            return
        crc = checksum(self.data.cpu().numpy())
        if crc != self.header.crc32:
            raise FormatError(f"checksum mismatch (stored {self.header.crc32:#010x}, "
                              f"computed {crc:#010x}): the buffer is corrupted")
        self._check_offsets()
        self._verified = True

    def _check_offsets(self) -> None:
        """Offsets must grow by at most a tile's groups and end inside each level's stream."""
        h = self.header
        s = self.np_sections()
        off = s["offsets"].astype(np.int64)
        n = h.numel
        widths = spec.level_widths(h.widths, h.has_raw, h.layout.exp_bits)
        for level in range(1, len(widths)):
            col = off[:, level - 1]
            step = np.diff(col)
            if col[0] != 0 or (step < 0).any() or (step > (h.tile + 7) // 8).any():
                raise FormatError(f"level {level} tile offsets are inconsistent")
            if spec.packed_nbytes(int(col[-1]) * 8, widths[level]) > len(s[f"level{level}"]):
                raise FormatError(f"level {level} offsets point past its stream")
        if len(widths) and len(s["level0"]) < spec.packed_nbytes(n, widths[0]):
            raise FormatError("level 0 stream too short")
        pi = s["patch_idx"]
        if len(pi) and (pi.min() < 0 or pi.max() >= n):
            raise FormatError("patch index out of range")

    # -- views for CPU backends -------------------------------------------------------------
    def np_sections(self) -> dict:
        """name -> numpy view into the blob (CPU only)."""
        if self._np_sections is None:
            if self.data.device.type != "cpu":
                raise ValueError("np_sections() needs a CPU CompressedTensor")
            blob = self.data.numpy()
            out = {}
            for name, (off, nb, rows, cols) in self.header.sections.items():
                dt = SECTION_DTYPES.get(name, self.header.layout.uint if name == "patch_val" else np.uint8)
                arr = blob[off:off + nb].view(dt)
                out[name] = arr.reshape(rows, cols) if name == "offsets" else arr
            self._np_sections = out
        return self._np_sections
