"""GGUF files: checked cheaply (header, metadata, tensor table) before transformers de-quantizes them."""
from __future__ import annotations

from pathlib import Path

from .errors import MODEL_HELP, GGUFError, ModelError
from .loaded import LoadedModel, finish, kind_of
from .transformers_dir import quiet_transformers

GGUF_MAGIC = b"GGUF"
# GGUF metadata value types with a fixed size: uint8 .. float64 (8 = string, 9 = array)
_GGUF_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def check_gguf(path) -> None:
    """Read a GGUF file's header, metadata and tensor table (not the tensors) and check that the
    file holds every tensor the table names. Raises GGUFError, naming the file, when it is empty,
    truncated or not a GGUF file. Cheap: the file is memory-mapped, the tensor data never read."""
    import mmap
    import struct

    try:  # (values per block, bytes per block) of each ggml tensor type
        from gguf.constants import GGML_QUANT_SIZES
    except ImportError:
        raise ModelError("reading GGUF files needs the `gguf` package: pip install gguf") from None
    block_sizes = {int(t): v for t, v in GGML_QUANT_SIZES.items()}
    path = Path(path)
    size = path.stat().st_size
    bad = f"{path} is not a valid GGUF file"
    cut = f"{path} is truncated ({size:,} bytes) or not a valid GGUF file"
    if size == 0:
        raise GGUFError(f"{path} is empty (0 bytes): truncated or not a GGUF file")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        if blob[:4] != GGUF_MAGIC:
            raise GGUFError(f"{bad} (bad magic bytes)")
        pos = 4
        part = "its header"

        def take(fmt):
            nonlocal pos
            try:
                out = struct.unpack_from("<" + fmt, blob, pos)
            except struct.error:
                raise GGUFError(f"{cut}: it ends inside {part} at byte {pos:,}") from None
            pos += struct.calcsize("<" + fmt)
            return out

        def skip(nbytes, what):
            nonlocal pos
            if nbytes < 0 or pos + nbytes > size:
                raise GGUFError(f"{cut}: it ends inside {what} at byte {pos:,}")
            pos += nbytes

        def string(what):
            (n,) = take("Q")
            start = pos
            skip(n, what)
            return bytes(blob[start:pos])

        def value(vtype, key, depth=0):
            if vtype in _GGUF_SCALAR:
                return take(_GGUF_SCALAR[vtype])[0]
            if vtype == 8:
                return string(f"metadata {key!r}")
            if vtype == 9 and depth == 0:
                etype, count = take("IQ")
                if etype in _GGUF_SCALAR:
                    skip(count * struct.calcsize(_GGUF_SCALAR[etype]), f"metadata {key!r}")
                else:
                    for _ in range(count):
                        value(etype, key, 1)
                return None
            raise GGUFError(f"{bad}: metadata {key!r} has an unknown value type {vtype}")

        version, n_tensors, n_kv = take("IQQ")
        if version not in (2, 3):
            raise GGUFError(f"{bad} (GGUF version {version}; nzrt reads versions 2 and 3)")
        if n_tensors > size or n_kv > size:  # each needs more than a byte
            raise GGUFError(f"{cut}: its header claims {n_tensors:,} tensors and {n_kv:,} metadata entries")
        alignment = 32
        part = "the metadata"
        for _ in range(n_kv):
            key = string("the metadata").decode("utf-8", "replace")
            (vtype,) = take("I")
            v = value(vtype, key)
            if key == "general.alignment" and isinstance(v, int) and v > 0:
                alignment = v
        end = 0
        part = "the tensor table"
        for _ in range(n_tensors):
            name = string("the tensor table").decode("utf-8", "replace")
            (ndim,) = take("I")
            if ndim > 8:
                raise GGUFError(f"{bad}: tensor {name!r} has {ndim} dimensions")
            dims = take(f"{ndim}Q")
            ttype, offset = take("IQ")
            if ttype in block_sizes:
                block, nbytes = block_sizes[ttype]
                count = 1
                for d in dims:
                    count *= d
                end = max(end, offset + (count + block - 1) // block * nbytes)
        data_start = (pos + alignment - 1) // alignment * alignment
        if data_start + end > size:
            raise GGUFError(f"{path} is truncated: {size:,} bytes, but its tensor table needs "
                            f"{data_start + end:,}; download or copy it again")


def load_gguf(path: Path, dtype=None, source: str | None = None) -> LoadedModel:
    """A .gguf de-quantized by transformers into a dense model (bf16 unless ``dtype``), checked first."""
    check_gguf(path)
    transformers = quiet_transformers()
    import torch

    dtype = dtype or torch.bfloat16  # GGUF weights are quantized; bf16 holds them well
    import contextlib
    import io
    import struct

    try:  # transformers' own tqdm bar while it de-quantizes goes nowhere
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                      dtype=dtype)
    except (OSError, ValueError, KeyError, struct.error) as e:
        raise ModelError(f"{path}: transformers cannot load this GGUF file ({str(e).splitlines()[0]}); "
                         f"{MODEL_HELP}") from None
    model = finish(model)  # not .to(dtype): that would also cast the fp32 rotary buffers
    return LoadedModel(model, tokenizer, kind_of(model), name=path.stem, source=source or str(path))
