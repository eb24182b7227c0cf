"""CompressedTensor: one contiguous byte blob (aligned sections) plus a small versioned header.

The same layout serves device memory, pinned host buffers and ``.nzrt`` files; the header is
plain JSON (no pickle) and carries a CRC-32 of the blob.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..kernels import spec
from ..kernels.spec import FormatError
from . import header as H

SECTION_DTYPES = {"offsets": np.uint32, "patch_idx": np.int64}  # others: uint8, or the float's uint


_FIELDS = ("dtype", "shape", "mantissa_bits", "tile", "widths", "has_raw", "symbols", "sections",
           "crc32", "version", "header_crc32")
MAX_RANK = 32
_U32 = (1 << 32) - 1


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
    crc32: int = 0  # zlib.crc32 of the blob
    version: int = spec.FORMAT_VERSION
    header_crc32: int | None = None  # CRC-32 of every other field; computed when not given

    def __post_init__(self):
        if self.header_crc32 is None:
            try:
                object.__setattr__(self, "header_crc32", self.fields_checksum())
            except (TypeError, ValueError):
                pass  # fields that are not JSON: validate() reports them

    def fields_checksum(self) -> int:
        """CRC-32 of the canonical JSON of every field but ``header_crc32``."""
        d = {k: getattr(self, k) for k in _FIELDS[:-1]}
        d["sections"] = {k: list(v) for k, v in self.sections.items()}
        return zlib.crc32(H.dumps(d).encode())

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
        return H.dumps(d)

    @classmethod
    def from_dict(cls, d: dict) -> "Header":
        """A validated header from parsed JSON: exactly the format's fields, strictly typed."""
        if type(d) is dict and "version" in d and d["version"] != spec.FORMAT_VERSION:
            old = " (written by an older nzrt: re-create it with `nzrt compress`)" \
                if type(d["version"]) is int and 0 < d["version"] < spec.FORMAT_VERSION else ""
            raise FormatError(f"unknown format version {H._show(d['version'])}; this nzrt reads "
                              f"version {spec.FORMAT_VERSION}{old}")
        H.expect_keys(d, _FIELDS, "the codec header")
        tup = lambda v: tuple(v) if type(v) is list else v  # noqa: E731
        secs = d["sections"]
        if type(secs) is dict:
            secs = {k: tup(v) for k, v in secs.items()}
        h = cls(dtype=d["dtype"], shape=tup(d["shape"]), mantissa_bits=d["mantissa_bits"],
                tile=d["tile"], widths=tup(d["widths"]), has_raw=d["has_raw"],
                symbols=tup(d["symbols"]), sections=secs, crc32=d["crc32"], version=d["version"],
                header_crc32=d["header_crc32"])
        h.validate()
        h.check_seal()
        return h

    def check_seal(self) -> None:
        """``header_crc32`` must be the CRC-32 of the other fields (checked with the blob's CRC)."""
        if self.header_crc32 != self.fields_checksum():
            raise FormatError("header checksum mismatch: its fields were changed")

    def section_names(self) -> list[str]:
        """Every section, in the one order the blob lays them out."""
        return ["sm", *_level_names(self), "offsets", "patch_idx", "patch_val"]

    @property
    def blob_nbytes(self) -> int:
        off, nb = self.sections["patch_val"][:2]
        return _align(off + nb)

    def validate(self) -> None:
        """Every check that needs no buffer (done once per header object): strict types and
        ranges, then every section's size, shape and place as the other fields imply them,
        Anything a decoder indexes by is bounded here. (``header_crc32`` is checked with the
        blob's CRC: by ``from_dict`` and ``CompressedTensor.verify``.)"""
        if self.__dict__.get("_valid"):
            return
        self._check_fields()
        self._check_sections()
        object.__setattr__(self, "_valid", True)

    def _check_fields(self) -> None:
        H.as_int(self.version, "version", spec.FORMAT_VERSION, spec.FORMAT_VERSION)
        lay = spec.LAYOUTS[H.as_str(self.dtype, "dtype", spec.LAYOUTS)]
        shape = H.as_ints(self.shape, "shape", 0, spec.MAX_NUMEL, MAX_RANK)
        if math.prod(shape) > spec.MAX_NUMEL:
            raise FormatError(f"shape {shape} holds more than {spec.MAX_NUMEL} values")
        H.as_int(self.mantissa_bits, "mantissa_bits", 0, lay.man_bits)
        H.as_int(self.tile, "tile", 8, spec.MAX_TILE)
        if self.tile % 8:
            raise FormatError(f"tile {self.tile} is not a multiple of 8")
        widths = H.as_ints(self.widths, "widths", 1, min(spec.MAX_WIDTH, lay.exp_bits), spec.MAX_LEVELS)
        H.as_bool(self.has_raw, "has_raw")
        symbols = H.as_ints(self.symbols, "symbols", 0, lay.exp_mask, sum((1 << w) - 1 for w in widths))
        if len(set(symbols)) != len(symbols):
            raise FormatError(f"symbols {symbols} name an exponent twice")
        n = math.prod(shape)
        if n and not widths and not self.has_raw:
            raise FormatError("no exponent level for a non-empty tensor")
        if not n and (widths or self.has_raw or symbols):
            raise FormatError("exponent levels for an empty tensor")
        H.as_int(self.crc32, "crc32", 0, _U32)
        if self.header_crc32 is None:
            raise FormatError("header fields are not JSON values")
        H.as_int(self.header_crc32, "header_crc32", 0, _U32)

    def _check_sections(self) -> None:
        secs, names = self.sections, self.section_names()
        if type(secs) is not dict:
            raise FormatError(f"sections must be an object, got {type(secs).__name__}")
        if set(secs) != set(names):
            raise FormatError(f"sections are {sorted(secs)}, the header implies {names}")
        n, lay = self.numel, self.layout
        widths = spec.level_widths(self.widths, self.has_raw, lay.exp_bits)
        tiles = spec.n_tiles(n, self.tile)
        groups = (n + 7) // 8  # level 0's groups of 8 entries; no deeper level has more
        patches = None
        pos = 0
        for name in names:
            got = H.as_ints(secs[name], f"section {name!r}", 0, 1 << 62, 4)
            if len(got) != 4:
                raise FormatError(f"section {name!r} must be [offset, nbytes, rows, cols]")
            off, nb, rows, cols = got
            shape = (0, 0)
            if name == "sm":
                want = spec.packed_nbytes(n, spec.sm_width(self.mantissa_bits))
            elif name.startswith("level"):
                w = widths[int(name[5:])]
                g = groups if name == "level0" else (nb - spec.STREAM_PAD) // w
                want = g * w + spec.STREAM_PAD
                if g > groups or g < 0:
                    raise FormatError(f"section {name!r} holds {g} groups, more than the "
                                      f"previous level's {groups}")
                groups = g
            elif name == "offsets":
                want, shape = (tiles + 1) * (len(widths) - 1) * 4 if widths else 0, \
                    (tiles + 1, max(len(widths) - 1, 0))
            elif name == "patch_idx":
                patches, want = nb // 8, nb // 8 * 8
                if patches > (0 if self.lossless else n):
                    raise FormatError(f"{patches} patches for {n} values "
                                      f"({'lossless' if self.lossless else 'lossy'})")
            else:
                want = patches * lay.itemsize
            if nb != want or (rows, cols) != shape:
                raise FormatError(f"section {name!r} is {list(got)}, the header implies "
                                  f"{want} bytes of shape {shape}")
            if off != pos:
                raise FormatError(f"section {name!r} starts at byte {off}, the layout puts it at {pos} "
                                  f"(moved or overlapping sections)")
            pos = _align(off + nb)


def checksum(blob: np.ndarray) -> int:
    """``zlib.crc32`` of a uint8 array: the numba backend's carry-less-multiply CRC-32 where
    numba is installed (same value, several times faster), else zlib's."""
    global _crc32
    if _crc32 is None:
        try:
            from ..kernels.cpu import crc32 as fast
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

    __slots__ = ("header", "data", "source", "name", "_verified", "_np_sections")

    def __init__(self, header: Header, data: torch.Tensor, *, verified: bool = False,
                 source: str | None = None, name: str | None = None):
        self.source = source  # the file whose memory map holds ``data``, if any
        self.name = name  # the tensor's name in that file (or in a model), if known
        if not isinstance(header, Header):
            raise TypeError(f"{self.label}: header must be a Header, got {type(header).__name__}")
        if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 1:
            raise FormatError(f"{self.label}: data must be a 1-D uint8 tensor")
        self.header = header
        self.data = data
        self._verified = verified
        self._np_sections = None
        try:
            header.validate()
            size, want = data.numel(), header.blob_nbytes
            if size != want:
                raise FormatError(f"the buffer holds {size} bytes, the header implies {want} "
                                  f"({'truncated?' if size < want else 'trailing bytes'})")
        except FormatError as e:
            raise FormatError(f"{self.label}: {e}") from None

    @property
    def label(self) -> str:
        """Where this tensor comes from, for error messages: ``FILE: tensor 'NAME'``."""
        who = f"tensor {self.name!r}" if self.name is not None else "compressed tensor"
        return f"{self.source}: {who}" if self.source else who

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
        table = {k: tuple(int(x) for x in v) for k, v in table.items()}
        header = Header(**header_fields, sections=table, crc32=int(crc32))
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
                                source=self.source if data is self.data else None, name=self.name)

    def pin_memory(self) -> "CompressedTensor":
        return CompressedTensor(self.header, self.data.pin_memory(), verified=self._verified,
                                name=self.name)

    def is_pinned(self) -> bool:
        return self.data.is_pinned()

    def __repr__(self) -> str:
        h = self.header
        mode = "lossless" if h.lossless else f"mantissa_bits={h.mantissa_bits}"
        return (f"CompressedTensor(shape={tuple(h.shape)}, dtype={h.dtype}, {mode}, "
                f"{self.bits_per_weight:.2f} bits/weight, device={self.device})")

    # -- integrity --------------------------------------------------------------------------
    def verify(self) -> None:
        """Check the blob's CRC-32 and its tables (offsets, patches): once, then cached. The
        header itself was checked whole when this object was made."""
        if self._verified:
            return
        h = self.header
        blob = self.data.cpu().numpy()
        try:
            h.check_seal()
            crc = checksum(blob)
            if crc != h.crc32:
                raise FormatError(f"checksum mismatch (stored {h.crc32:#010x}, computed "
                                  f"{crc:#010x}): the buffer is corrupted")
            spec.check_tables(h.numel, h.tile, spec.level_widths(h.widths, h.has_raw, h.layout.exp_bits),
                              h.mantissa_bits, h.layout, _views(h, blob))
        except FormatError as e:
            raise FormatError(f"{self.label}: {e}") from None
        self._verified = True

    # -- views for CPU backends -------------------------------------------------------------
    def np_sections(self) -> dict:
        """name -> numpy view into the blob (CPU only)."""
        if self._np_sections is None:
            if self.data.device.type != "cpu":
                raise ValueError("np_sections() needs a CPU CompressedTensor")
            self._np_sections = _views(self.header, self.data.numpy())
        return self._np_sections


def _views(h: Header, blob: np.ndarray) -> dict:
    """name -> numpy view of that section of ``blob`` (a validated header's layout)."""
    out = {}
    for name, (off, nb, rows, cols) in h.sections.items():
        dt = SECTION_DTYPES.get(name, h.layout.uint if name == "patch_val" else np.uint8)
        arr = blob[off:off + nb].view(dt)
        out[name] = arr.reshape(rows, cols) if name == "offsets" else arr
    return out
