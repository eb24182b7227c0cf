"""A model named by a path (a transformers directory or its config.json, a ``.gguf``, a ``.nzrt``) or
by ``package.module:factory``: what it names, read from the name and at most a file's first 8 bytes,
and loading it. ``nzrt.from_pretrained`` opens models this way; the CLI's MODEL argument adds the
embedded models on top."""
from __future__ import annotations

from pathlib import Path

from ..format.checkpoint import MAGIC as NZRT_MAGIC
from .errors import MODEL_HELP, ModelError
from .gguf import GGUF_MAGIC, load_gguf
from .loaded import LoadedModel, parse_dtype


def classify(spec: str) -> tuple[str, Path | None]:
    """``(kind, path)`` with kind one of dir, gguf, nzrt, config, factory. Raises ModelError with a
    one-line message for a missing path or a file of no known format."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return "dir", path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        raise ModelError(f"{spec} is a directory without config.json; {MODEL_HELP}")
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(8)
        if magic == NZRT_MAGIC or path.suffix == ".nzrt":
            if magic != NZRT_MAGIC:
                raise ModelError(f"{spec} is not a .nzrt checkpoint (bad magic bytes: corrupted or "
                                 f"another format); re-create it with `nzrt compress`")
            return "nzrt", path
        if magic[:4] == GGUF_MAGIC or path.suffix == ".gguf":
            return "gguf", path  # check_gguf (at load): empty, truncated, bad magic
        if path.name == "config.json":
            return "config", path.parent
        raise ModelError(f"{spec} is not a model file; {MODEL_HELP}")
    if ":" in spec and not spec.startswith((".", "/", "~")):
        return "factory", None
    raise ModelError(f"no such file or directory: {spec}; {MODEL_HELP}")


def open_model(spec: str, *, dtype=None, device=None, lazy: bool = False) -> LoadedModel:
    """Load what ``spec`` names (see ``classify``). Raises ModelError with a one-line message.

    ``lazy``: a transformers directory comes back as a meta model whose weights are read one
    tensor at a time when the runtime takes them (``from_pretrained``); otherwise it is loaded
    dense by transformers. A ``.nzrt`` is always a meta model over its memory-mapped blobs."""
    from .factory import load_factory
    from .nzrt_file import load_checkpoint
    from .transformers_dir import load_transformers_dir, load_transformers_dir_lazy

    dt = parse_dtype(dtype)
    kind, path = classify(spec)
    if kind in ("dir", "config"):
        load_dir = load_transformers_dir_lazy if lazy else load_transformers_dir
        return load_dir(path, dt, source=spec)
    if kind == "gguf":
        return load_gguf(path, dt, source=spec)
    if kind == "nzrt":
        lm = load_checkpoint(path, device)
        if dt is not None and lm.dtype != dt:
            raise ModelError(f"{spec} stores {lm.dtype}; --dtype cannot change a checkpoint's dtype "
                             f"(re-create it with `nzrt compress --dtype ...`)")
        return lm
    return load_factory(spec, dt)
