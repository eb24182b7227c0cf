"""Finding a model's parameters (each once, with every name and owner) and what is kept of each."""
from __future__ import annotations

import threading

import torch
from torch import nn

FLOATS = (torch.bfloat16, torch.float16, torch.float32)
DEFAULT_MIN_NUMEL = 2048          # smaller parameters stay dense
DEFAULT_CHUNK_BYTES = 2 << 20     # row-chunk size of a large plain embedding


class Param:
    """A managed parameter: its compressed chunks, how to restore it, and whether it is bound."""

    def __init__(self, param, names, owners, manager):
        self.param = param
        self.names = names          # every name it has in the model (tied weights: several)
        self.owners = owners        # [(module, attribute name)]
        self.shape = tuple(param.shape)
        self.dtype = param.dtype
        self.orig_device = param.device
        self.orig_class = type(param)
        self.was_meta = param.device.type == "meta"
        self.keys: list = []        # tensor keys of its chunks (one key when not chunked)
        self.rows: list = []        # (start, stop) rows of each chunk
        self.chunked = False
        self.row_lookup = None      # ids -> rows from the chunks (an Embedding with its own forward)
        self.placeholder = None
        self.manager = manager      # the block's Shared state (shared.py): decodes it, holds its chunks
        self.active = False         # True from commit (entry) to restore (exit)
        self.binds = 0              # > 0 while its data is a dense slot (inside a forward)
        self.bind_thread = None
        self.file_original = None   # a memory-mapped original kept to restore without a copy
        self.version = 0            # + 1 at each update (training): saved tokens check it

    def bound_here(self) -> bool:
        """Inside its module's forward, in the thread running that forward."""
        return self.binds > 0 and self.bind_thread == threading.get_ident()

    def dense_copy(self) -> torch.Tensor:
        return self.manager.dense_copy(self)


def find_params(model: nn.Module) -> list:
    """[(parameter, names, owners)]: every parameter once (tied weights: all names and owners)."""
    by_id: dict = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            entry = by_id.setdefault(id(p), (p, [], []))
            if full not in entry[1]:
                entry[1].append(full)
            if not any(o[0] is module and o[1] == pname for o in entry[2]):
                entry[2].append((module, pname))
    return list(by_id.values())


def plain_embedding(module) -> bool:
    """An ``nn.Embedding`` whose forward is ``nn.Embedding.forward``: the runtime may replace it."""
    return isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward and \
        module.max_norm is None and "forward" not in module.__dict__


def embedding_via_function(module) -> bool:
    """An ``nn.Embedding`` subclass with a forward of its own (Gemma3's scaled word embedding:
    ``super().forward(ids) * embed_scale``): its forward runs unchanged and its ``F.embedding``
    on the managed weight is answered from the row chunks (``weight.py``)."""
    return isinstance(module, nn.Embedding) and module.max_norm is None and not plain_embedding(module)


def chunkable_embedding(shape, itemsize, owners, chunk_bytes) -> bool:
    """Row chunks only for weights used solely as plain ``nn.Embedding`` lookups (a lookup copies
    rows: exact whatever the split). A weight that a Linear also uses (an output head) is chunked
    only as a head (``chunkable_head``), where a blocked product was probed exact."""
    if not chunk_bytes or len(shape) != 2 or shape[0] * shape[1] * itemsize <= chunk_bytes:
        return False
    return all(name == "weight" and plain_embedding(module) for module, name in owners)


HEAD_BLOCK_ROWS = 4096          # a head chunk: whole multiples of this many rows ...
HEAD_CHUNK_BYTES = 8 << 20      # ... about this many bytes (a slot the pool reuses)


def _plain_linear(module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward and \
        "forward" not in module.__dict__ and module.bias is None


def chunkable_head(shape, itemsize, owners, heads, requires_grad: bool) -> bool:
    """Row chunks for a large output head, tied to its embeddings or not (``blocked.py``): owned
    only by plain bias-free Linears (at least one; a tied one counts when an Embedding owns it too,
    an untied one when it is in ``heads``, the model's output embeddings) and Embeddings (plain, or
    with a forward of their own that looks up through ``F.embedding``), at
    least two head chunks large, and frozen (a trained head is multiplied whole: the backward of a
    blocked product would sum in another order)."""
    if requires_grad or len(shape) != 2 or shape[0] < 2 * HEAD_BLOCK_ROWS:
        return False
    if shape[0] * shape[1] * itemsize < 2 * HEAD_CHUNK_BYTES:
        return False
    linears = embeddings = 0
    for module, name in owners:
        if name != "weight":
            return False
        if _plain_linear(module):
            linears += 1
        elif plain_embedding(module) or embedding_via_function(module):
            embeddings += 1
        else:
            return False
    return linears > 0 and (embeddings > 0 or any(id(m) in heads for m, _ in owners))


def output_heads(model) -> set:
    """``{id(module)}`` of the model's output embeddings (transformers' ``get_output_embeddings``),
    the untied Linears ``chunkable_head`` accepts; empty where the model names none."""
    out = getattr(model, "get_output_embeddings", None)
    try:
        head = out() if callable(out) else None
    except Exception:  # noqa: BLE001 - a model's own hook: no head known
        head = None
    return {id(head)} if head is not None else set()


def head_spans(shape, itemsize) -> list:
    """Row spans of whole multiples of ``HEAD_BLOCK_ROWS`` rows, about ``HEAD_CHUNK_BYTES`` each."""
    per = HEAD_CHUNK_BYTES // max(1, shape[1] * itemsize) // HEAD_BLOCK_ROWS * HEAD_BLOCK_ROWS
    rows = max(HEAD_BLOCK_ROWS, per)
    return [(a, min(a + rows, shape[0])) for a in range(0, shape[0], rows)]


def chunk_spans(shape, itemsize, chunk_bytes) -> list:
    """Row spans of whole multiples of 256 rows, about ``chunk_bytes`` each."""
    rows = max(256, chunk_bytes // (shape[1] * itemsize) // 256 * 256)
    return [(a, min(a + rows, shape[0])) for a in range(0, shape[0], rows)]


def row_chunk_plan(model, chunk_bytes: int | None = None) -> dict:
    """``{parameter name: [(start, stop), ...]}`` for the model's lookup-only embedding weights
    large enough to be split, and its large output heads, tied or not (the runtime's own rules and
    chunk sizes; a file only stores: whether a head is multiplied in blocks is decided at load)."""
    chunk_bytes = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    heads = output_heads(model)
    out = {}
    for p, names, owners in find_params(model):
        if not p.is_floating_point() or not chunk_bytes:
            continue
        shape, itemsize = tuple(p.shape), p.element_size()
        if chunkable_embedding(shape, itemsize, owners, chunk_bytes):
            out[names[0]] = chunk_spans(shape, itemsize, chunk_bytes)
        elif chunkable_head(shape, itemsize, owners, heads, requires_grad=False):
            out[names[0]] = head_spans(shape, itemsize)
    return out
