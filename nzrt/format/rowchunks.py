"""Lookup-only embeddings stored as row chunks in a ``.nzrt``.

A plain ``nn.Embedding`` lookup copies rows, so its weight can be split by rows with no effect on
the result (a GEMM's cannot: see ``nzrt.runtime.params.chunkable_embedding``). The runtime already
splits such weights into chunks decoded only where the ids fall; ``nzrt compress`` writes them
that way too, so a memory-mapped checkpoint pages in only the chunks a forward looks up, instead
of the whole table. Each chunk is its own compressed entry, named ``f"{name}{SEP}{start}-{stop}"``;
the model metadata lists the spans under ``row_chunks`` (``{name: [[start, stop], ...]}``).
"""
from __future__ import annotations

SEP = ".__rows__"
META_KEY = "row_chunks"


def entry_name(name: str, start: int, stop: int) -> str:
    return f"{name}{SEP}{start}-{stop}"


class RowChunks:
    """A 2-D weight held as row chunks, each a ``CompressedTensor`` (rows ``spans[i]``)."""

    def __init__(self, name: str, spans, parts):
        spans = [(int(a), int(b)) for a, b in spans]
        if not spans or len(spans) != len(parts):
            raise ValueError(f"{name!r}: {len(spans)} row spans for {len(parts)} chunks")
        pos = 0
        for (a, b), ct in zip(spans, parts):
            if a != pos or b <= a:
                raise ValueError(f"{name!r}: row spans must tile the rows in order, got {spans}")
            if len(ct.shape) != 2 or ct.shape[0] != b - a or ct.shape[1] != parts[0].shape[1] \
                    or ct.dtype != parts[0].dtype:
                raise ValueError(f"{name!r}: chunk rows {a}-{b} is {ct.dtype} {tuple(ct.shape)}, "
                                 f"not {b - a} rows like the others")
            pos = b
        self.name = name
        self.spans = spans
        self.parts = list(parts)

    @property
    def shape(self):
        import torch

        return torch.Size((self.spans[-1][1], self.parts[0].shape[1]))

    @property
    def dtype(self):
        return self.parts[0].dtype

    @property
    def device(self):
        return self.parts[0].device

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(ct.nbytes for ct in self.parts)

    def __repr__(self) -> str:
        return f"RowChunks({self.name!r}, {tuple(self.shape)}, {self.dtype}, {len(self.parts)} chunks)"


def gather(tensors: dict, row_chunks: dict, source: str = "") -> dict:
    """``{name: RowChunks}`` from a loaded ``.nzrt``'s entries and its metadata's ``row_chunks``."""
    from .tensor import FormatError

    out = {}
    if not isinstance(row_chunks, dict):
        raise FormatError(f"{source}: metadata {META_KEY!r} must be an object")
    for name, spans in row_chunks.items():
        try:
            spans = [(int(a), int(b)) for a, b in spans]
            parts = [tensors[entry_name(name, a, b)] for a, b in spans]
            out[name] = RowChunks(name, spans, parts)
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{source}: the row chunks of {name!r} are incomplete or malformed ({e}); "
                              f"re-create the file with `nzrt compress`") from None
    return out
