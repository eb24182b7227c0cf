"""compress / decompress / decode_into: torch tensors in and out, a kernel backend underneath."""
from __future__ import annotations

import numbers

import numpy as np
import torch

from .format import CompressedTensor
from .format.rowchunks import RowChunks
from .kernels import backends, env, spec

BACKENDS = backends.NAMES


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend that will run: the argument, else $NZRT_BACKEND, else the best for the device."""
    name = backend or env.get("NZRT_BACKEND") or None
    if name:
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r} (from {'argument' if backend else 'NZRT_BACKEND'}); "
                             f"choose one of {', '.join(BACKENDS)}")
        return name
    if device.type == "cuda":
        return "triton"
    return "numba" if _numba_available() else "reference"


def _numba_available() -> bool:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def layout_of(dtype: torch.dtype) -> spec.FloatLayout:
    name = str(dtype).removeprefix("torch.")
    if name not in spec.LAYOUTS:
        kind = ("an integer" if not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool
                else "a bool" if dtype == torch.bool else "a complex" if dtype.is_complex else "this")
        raise TypeError(f"nzrt compresses bfloat16, float16 and float32 tensors; got {kind} tensor "
                        f"of dtype {dtype}. Convert it first (e.g. t.to(torch.bfloat16)) or leave it uncompressed.")
    return spec.LAYOUTS[name]


def check_mantissa_bits(mantissa_bits, dtype) -> int | None:
    """``mantissa_bits`` checked for ``dtype`` (a torch dtype, a dtype name or a FloatLayout):
    None stays None (lossless); otherwise an int in 0..(the dtype's mantissa bits), returned as
    a plain int (the dtype's own count means lossless). Anything else raises, with a one-line
    message naming the accepted range: TypeError for a bool, a float (2.5, even 3.0), a string
    ("3") or another non-integer; ValueError for an integer out of range."""
    if isinstance(dtype, spec.FloatLayout):
        layout = dtype
    elif isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in spec.LAYOUTS:
            raise TypeError(f"nzrt compresses bfloat16, float16 and float32; got dtype {dtype!r}")
        layout = spec.LAYOUTS[dtype.removeprefix("torch.")]
    else:
        layout = layout_of(dtype)
    accepted = (f"an int in 0..{layout.man_bits} for {layout.name} (kept mantissa bits; "
                f"{layout.man_bits} or None = lossless)")
    if mantissa_bits is None:
        return None
    if isinstance(mantissa_bits, bool) or not isinstance(mantissa_bits, numbers.Integral):
        raise TypeError(f"mantissa_bits must be {accepted}, got {mantissa_bits!r} "
                        f"({type(mantissa_bits).__name__})")
    k = int(mantissa_bits)
    if not 0 <= k <= layout.man_bits:
        raise ValueError(f"mantissa_bits must be {accepted}, got {k}")
    return k


WINDOW4 = spec.WINDOW4  # compress(..., widths=WINDOW4): the fused kernel's fast exponent code


def int_dtype(layout: spec.FloatLayout) -> torch.dtype:
    """The signed torch integer type whose view gives a float's bit patterns (int16 / int32)."""
    return {2: torch.int16, 4: torch.int32}[layout.itemsize]


def compress(tensor: torch.Tensor, *, mantissa_bits: int | None = None,
             backend: str | None = None, tile: int = spec.DEFAULT_TILE,
             widths: tuple | None = None) -> CompressedTensor:
    """Compress a float tensor. Lossless unless ``mantissa_bits`` (kept mantissa bits) is given.

    ``widths``: the exponent code's levels instead of the planner's (the fewest bits), e.g.
    ``WINDOW4`` = ``(4,)``, one 4-bit level: ~12 bits a bf16 weight instead of ~10.7, and the
    code the fused CPU kernel multiplies fastest from. Every decoder reads either.

    Returns a CompressedTensor on the tensor's device.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"compress() takes a torch.Tensor, got {type(tensor).__name__}")
    layout = layout_of(tensor.dtype)
    keep = check_mantissa_bits(mantissa_bits, layout)
    keep = layout.man_bits if keep is None else keep
    if tile <= 0 or tile % 8:
        raise ValueError(f"tile must be a positive multiple of 8, got {tile}")
    if widths is not None:
        widths = spec.check_widths(widths, layout.exp_bits)
    device = tensor.device
    name = resolve_backend(backend, device)
    bits = tensor.detach().contiguous().view(int_dtype(layout)).reshape(-1)
    fields = dict(dtype=layout.name, shape=tuple(tensor.shape), mantissa_bits=keep, tile=tile)
    enc = backends.get(name).encode(bits, layout, keep, tile, widths)
    fields = _fields(fields, enc.widths, enc.has_raw, enc.symbols)
    if enc.blob is not None:  # the backend wrote the blob in place: no copy of the sections
        ct = CompressedTensor.from_blob(fields, enc.blob, enc.table, enc.crc)
    else:
        ct = CompressedTensor.from_sections(fields, enc.sections)
    return ct.to(device) if device.type != "cpu" else ct


def _fields(fields: dict, widths, has_raw, symbols) -> dict:
    """Header fields: the tensor's, plus the codebook as plain ints."""
    return dict(fields, widths=tuple(int(w) for w in widths), has_raw=bool(has_raw),
                symbols=tuple(np.asarray(symbols).tolist()))


def decode_into(ct: CompressedTensor, out: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Decode into ``out`` (contiguous, ct's dtype, ct.numel() elements, any shape). No allocation
    on the fast backends; on CUDA it runs on the current stream with no host synchronisation."""
    if not isinstance(ct, CompressedTensor):
        raise TypeError(f"expected a CompressedTensor, got {type(ct).__name__}")
    if out.dtype != ct.dtype or out.numel() != ct.numel() or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {ct.dtype} tensor of {ct.numel()} elements; "
                         f"got {out.dtype}, {out.numel()} elements, contiguous={out.is_contiguous()}")
    if out.device != ct.device:
        raise ValueError(f"out is on {out.device} but the compressed tensor is on {ct.device}; "
                         f"move one of them (ct.to(device))")
    ct.verify()
    name = resolve_backend(backend, ct.device)
    layout = spec.LAYOUTS[ct.header.dtype]
    flat = out.view(-1).view(int_dtype(layout))
    try:
        backends.get(name).decode_into(ct, flat, layout)
    except spec.FormatError as e:  # a decoder's content check: name the file and the tensor
        label = getattr(ct, "label", "")
        if label and not str(e).startswith(label):
            raise spec.FormatError(f"{label}: {e}") from None
        raise
    return out


def decompress(ct: CompressedTensor | RowChunks, *, out: torch.Tensor | None = None,
               backend: str | None = None) -> torch.Tensor:
    """The dense tensor, bit-identical to what was compressed (lossless mode). A ``RowChunks``
    (a weight stored as row chunks) is decoded chunk by chunk into its rows."""
    if out is None:
        out = torch.empty(tuple(ct.shape), dtype=ct.dtype, device=ct.device)
    if isinstance(ct, RowChunks):
        for (a, b), part in zip(ct.spans, ct.parts):
            decode_into(part, out[a:b].reshape(-1), backend=backend)
        return out
    decode_into(ct, out, backend=backend)
    return out
