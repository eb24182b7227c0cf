"""Whole-model compression into a ``.nzrt``: a loaded model, or a transformers directory streamed
one tensor at a time (the dense model never built)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .. import osmem
from ..format import rowchunks
from ..runtime.params import DEFAULT_MIN_NUMEL, row_chunk_plan
from .entries import INPUTS_PREFIX, MODEL_META_KEY, model_metadata, tokenizer_entries
from .errors import ModelError
from .loaded import LoadedModel, Progress, kind_of, parse_dtype
from .transformers_dir import meta_transformers_model, quiet_transformers


@dataclass
class CompressStats:
    params: int
    dense_bytes: int
    compressed_bytes: int
    file_bytes: int
    seconds: float
    tensors: int
    name: str = ""
    dtype: str = ""
    streamed: bool = False  # written tensor by tensor from safetensors (the dense model never built)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.compressed_bytes / max(self.params, 1)

    @property
    def ratio(self) -> float:
        return self.compressed_bytes / max(self.dense_bytes, 1)


def check_widths(widths) -> tuple | None:
    """``widths`` (the exponent code to write, e.g. ``codec.WINDOW4``; None: the planner's smallest)
    as a tuple of ints that fits every float dtype nzrt compresses, checked before a file is
    opened: ValueError naming what is accepted otherwise."""
    if widths is None:
        return None
    from ..kernels import spec

    try:
        if isinstance(widths, (str, bytes)):
            raise ValueError(f"widths must be a sequence of level widths, got {widths!r}")
        return spec.check_widths(widths, min(lay.exp_bits for lay in spec.LAYOUTS.values()))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{e}; e.g. widths=nzrt.codec.WINDOW4 = (4,) (the fused kernel's fast code), "
                         f"or None (the smallest code)") from None


def compress_model(lm, out, *, mantissa_bits: int | None = None,
                   progress: Progress | None = None, dtype=None, widths=None) -> CompressStats:
    """Write ``lm`` to ``out`` as a ``.nzrt``: every float parameter compressed (tied weights once),
    buffers and non-float parameters dense, the config and tokenizer beside them.

    ``lm`` is a LoadedModel, or the path of a transformers directory: with safetensors weights whose
    names are the model's parameters, that is streamed (``compress_transformers_dir``: one tensor in
    memory at a time, the dense model never built); otherwise it is loaded whole first. ``dtype``
    (only with a path) converts the weights, as ``--dtype`` does.

    ``widths``: the exponent code of every compressed float weight (``codec.compress``'s), e.g.
    ``codec.WINDOW4``, which the fused CPU kernel multiplies from fastest (``nzrt compress
    --fused``): ~12 bits a bf16 weight instead of ~10.7, as lossless, and every policy reads it.
    None: the planner's smallest code; weights that arrive compressed are then kept as they are,
    otherwise those in another code are compressed again."""
    widths = check_widths(widths)
    if not isinstance(lm, LoadedModel):
        path = Path(lm).expanduser()
        if path.is_file() and path.name == "config.json":
            path = path.parent
        st = compress_transformers_dir(path, out, mantissa_bits=mantissa_bits, progress=progress,
                                       dtype=dtype, source=str(lm), widths=widths)
        if st is not None:
            return st
        from .open_model import open_model

        lm = open_model(str(lm), dtype=dtype)
    elif dtype is not None:
        raise ValueError("dtype applies only when compress_model is given a path")
    return _compress_loaded(lm, out, mantissa_bits=mantissa_bits, progress=progress, widths=widths)


def _compress_loaded(lm: LoadedModel, out, *, mantissa_bits: int | None = None,
                     progress: Progress | None = None, widths=None) -> CompressStats:
    import torch

    from ..format.checkpoint import save
    from ..codec import compress, decompress
    from ..format import CompressedTensor

    out = Path(out)
    metadata = model_metadata(lm, mantissa_bits)
    params = list(lm.model.named_parameters())
    total = sum(p.numel() for _, p in params)
    tensors: dict = {}
    done = 0
    dense_bytes = comp_bytes = 0
    t0 = time.perf_counter()
    chunks = row_chunk_plan(lm.model)  # lookup-only embeddings: written as row chunks
    if chunks:
        metadata[MODEL_META_KEY][rowchunks.META_KEY] = {n: [list(s) for s in sp] for n, sp in chunks.items()}
    for name, p in params:
        src = lm.compressed.get(name) if lm.compressed is not None else None
        # kept as it is: compressed at least as finely, in the code asked for (any, if none was)
        bits_ok = lambda ct: ((mantissa_bits is None or mantissa_bits >= ct.header.mantissa_bits)  # noqa: E731
                              and (widths is None or tuple(ct.header.widths) == widths))
        if isinstance(src, rowchunks.RowChunks) and [tuple(x) for x in chunks.get(name, ())] == src.spans \
                and all(bits_ok(ct) for ct in src.parts):
            for (a, b), ct in zip(src.spans, src.parts):  # already chunked as wanted: as it is
                tensors[rowchunks.entry_name(name, a, b)] = ct
                comp_bytes += ct.nbytes
        elif isinstance(src, CompressedTensor) and name not in chunks and bits_ok(src):
            tensors[name] = src  # already compressed at least as finely: keep it as is
            comp_bytes += src.nbytes
        else:
            kept = None  # the source's kept mantissa bits: compressing again with them is exact
            if isinstance(src, (CompressedTensor, rowchunks.RowChunks)):
                dense = decompress(src)
                parts = src.parts if isinstance(src, rowchunks.RowChunks) else [src]
                kept = min(ct.header.mantissa_bits for ct in parts)
            else:
                dense = src if src is not None else p.detach()
            if dense.is_floating_point():
                # lossy mode rounds only what the runtime would: small parameters (norms) stay exact
                k = mantissa_bits if dense.numel() >= DEFAULT_MIN_NUMEL else None
                if kept is not None and (k is None or k > kept):
                    k = kept
                for entry, part in _parts(name, dense.cpu(), chunks):
                    ct = compress(part, mantissa_bits=k, widths=widths)
                    tensors[entry] = ct
                    comp_bytes += ct.nbytes
            else:
                tensors[name] = dense.cpu()
                comp_bytes += dense.numel() * dense.element_size()
        dense_bytes += p.numel() * p.element_size()
        done += p.numel()
        if progress:
            progress(done, total, name)
    for name, b in lm.model.named_buffers():
        if b.device.type != "meta":
            tensors[name] = b.detach().cpu()
    for name, t in tokenizer_entries(lm.tokenizer):
        tensors[name] = t
    if lm.inputs is not None:
        inputs = lm.inputs
        if isinstance(inputs, torch.Tensor):
            inputs = (inputs,)
        items = inputs.items() if isinstance(inputs, dict) else enumerate(inputs)
        if all(isinstance(v, torch.Tensor) and v.device.type != "meta" for _, v in items):
            metadata[MODEL_META_KEY]["inputs"] = "dict" if isinstance(inputs, dict) else "tuple"
            for k, v in (inputs.items() if isinstance(inputs, dict) else enumerate(inputs)):
                tensors[f"{INPUTS_PREFIX}{k}"] = v.detach().cpu()
    save(out, tensors, metadata)
    return CompressStats(params=total, dense_bytes=dense_bytes, compressed_bytes=comp_bytes,
                         file_bytes=out.stat().st_size, seconds=time.perf_counter() - t0,
                         tensors=len(params), name=lm.name,
                         dtype=str(lm.dtype).removeprefix("torch."))


def compress_transformers_dir(path, out, *, mantissa_bits: int | None = None,
                              progress: Progress | None = None, dtype=None,
                              source: str | None = None, widths=None) -> CompressStats | None:
    """Stream a transformers directory with safetensors weights into ``out``: the config comes from
    config.json, each tensor is read (no mmap), compressed, written and dropped before the next, so
    memory holds about one tensor. Returns None (nothing written) where the directory cannot be
    streamed faithfully (no safetensors, checkpoint names that are not the model's parameter names,
    a quantized model ...): the caller loads it whole instead. The file holds what
    ``compress_model`` writes for the loaded model, in the same order (``widths``: its exponent code)."""
    from ..format.checkpoint import Writer
    from ..codec import compress
    from .safetensors_io import has_safetensors

    path = Path(path)
    if not (path / "config.json").is_file() or not has_safetensors(path):
        return None
    dtype = parse_dtype(dtype)
    built = meta_transformers_model(path, dtype)
    if built is None:
        return None
    model, st = built
    params = dict(model.named_parameters())
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - set(params)
    buffers = dict(model.named_buffers())
    names = set(st)
    if not set(params) <= names or not names - set(params) <= aliases | set(buffers):
        return None  # renamed keys (transformers' conversions): only from_pretrained knows them
    lm = LoadedModel(model, None, kind_of(model), name=path.name, source=source or str(path))
    if mantissa_bits is not None:
        from ..codec import check_mantissa_bits

        try:
            check_mantissa_bits(mantissa_bits, lm.dtype)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--mantissa-bits {mantissa_bits} does not fit {lm.name}: {e}") from None
    widths = check_widths(widths)
    metadata = model_metadata(lm, mantissa_bits)
    chunks = row_chunk_plan(model)  # lookup-only embeddings: written as row chunks
    if chunks:
        metadata[MODEL_META_KEY][rowchunks.META_KEY] = {n: [list(s) for s in sp] for n, sp in chunks.items()}
    tokenizer = None
    try:
        tokenizer = quiet_transformers().AutoTokenizer.from_pretrained(str(path))
    except Exception:
        tokenizer = None
    total = sum(p.numel() for p in params.values())
    done = dense_bytes = comp_bytes = 0
    small = DEFAULT_MIN_NUMEL  # smaller parameters stay exact in lossy mode, as under the runtime
    t0 = time.perf_counter()
    out = Path(out)
    with Writer(out, metadata) as w:
        for name, p in params.items():  # parameter order, as compress_model writes a loaded model
            t = st[name]
            if tuple(t.shape) != tuple(p.shape):
                raise ModelError(f"{path}: tensor {name!r} has shape {list(t.shape)}, "
                                 f"{type(model).__name__} expects {list(p.shape)}")
            if t.dtype != p.dtype and (t.is_floating_point() or p.is_floating_point()):
                t = t.to(p.dtype)  # what from_pretrained does
            if t.is_floating_point():
                k = mantissa_bits if t.numel() >= small else None
                for entry, part in _parts(name, t, chunks):
                    ct = compress(part, mantissa_bits=k, widths=widths)
                    comp_bytes += ct.nbytes
                    w.add(entry, ct)
            else:
                ct = t
                comp_bytes += t.numel() * t.element_size()
                w.add(name, ct)
            dense_bytes += p.numel() * p.element_size()
            done += p.numel()
            del ct, t
            osmem.trim()  # the tensor and its temporaries leave the process, not glibc's arenas
            if progress:
                progress(done, total, name)
        for name, b in buffers.items():  # persistent ones from the checkpoint, the rest as built
            if name in names:
                t = st[name]
                w.add(name, t.to(b.dtype) if t.dtype != b.dtype and t.is_floating_point() else t)
                del t
            elif b.device.type != "meta":
                w.add(name, b.detach().cpu())
        # checkpoint names left over are tied aliases of parameters written once above
        for name, t in tokenizer_entries(tokenizer):
            w.add(name, t)
    return CompressStats(params=total, dense_bytes=dense_bytes, compressed_bytes=comp_bytes,
                         file_bytes=out.stat().st_size, seconds=time.perf_counter() - t0,
                         tensors=len(params), name=lm.name, dtype=str(lm.dtype).removeprefix("torch."),
                         streamed=True)


def _parts(name: str, t, chunks: dict):
    """(entry name, tensor) to write for parameter ``name``: its row chunks, or itself."""
    spans = chunks.get(name)
    if not spans:
        return [(name, t)]
    return [(rowchunks.entry_name(name, a, b), t[a:b]) for a, b in spans]
