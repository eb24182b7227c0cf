"""``run.save(path)``: a managed model's current weights as a ``.nzrt``, from their compressed copies.

A trained model is written without densifying it: each managed weight's blobs go to the file as
they are (a row-chunked embedding as its chunks, listed under the model metadata's
``row_chunks``), small parameters and buffers as dense entries. A transformers model gets the
metadata ``nzrt.from_pretrained(path)`` and ``nzrt generate`` rebuild it from (with the
tokenizer, if given, stored as ``nzrt compress`` stores it); any other model
is written as plain entries for ``nzrt.managed(meta_model, weights=nzrt.load(path))``, its
row-chunked weights compressed again whole, one at a time.
"""
from __future__ import annotations

import torch

from .. import codec
from ..format import rowchunks
from ..format.checkpoint import Writer
from .weight import lookup


def run_metadata(run, chunk_spans: dict) -> dict | None:
    """The model metadata of ``run``'s ``.nzrt`` (None for a model that is not a transformers one);
    ``chunk_spans``: {name: [(first, end) row]} of the weights written in row chunks."""
    from ..loading.entries import MODEL_META_KEY, model_metadata
    from ..loading.loaded import LoadedModel, class_name, kind_of

    model = run.model
    if not (hasattr(model, "config") and hasattr(model.config, "to_dict")):
        return None
    kind = kind_of(model)
    if kind == "module":
        return None
    name = getattr(model.config, "name_or_path", "") or class_name(model)
    lm = LoadedModel(model, None, kind, name=str(name).rsplit("/", 1)[-1],
                    source=f"nzrt.managed run of {class_name(model)}")
    meta = model_metadata(lm, None)
    if chunk_spans:
        meta[MODEL_META_KEY][rowchunks.META_KEY] = {n: [list(s) for s in sp] for n, sp in chunk_spans.items()}
    return meta


def save_run(run, path, tokenizer=None) -> None:
    model = run.model
    params = list(model.named_parameters())  # each parameter once, under its first name
    chunked = {}
    for name, p in params:
        mp = lookup(p)
        if mp is not None and mp.active and mp.chunked:
            chunked[name] = list(mp.rows)
    metadata = run_metadata(run, chunked)
    with Writer(path, metadata) as w:
        for name, p in params:
            mp = lookup(p)
            if mp is None or not mp.active:
                with torch._C.DisableTorchFunctionSubclass():
                    w.add(name, p.detach().cpu())
                continue
            cts = [run.tensors[k].home for k in mp.keys]
            if not mp.chunked:
                w.add(name, cts[0].to("cpu"))
            elif metadata is not None:
                for (a, b), ct in zip(mp.rows, cts):
                    w.add(rowchunks.entry_name(name, a, b), ct.to("cpu"))
            else:
                w.add(name, codec.compress(mp.dense_copy().cpu()))
        add_buffers_and_tokenizer(w, model, tokenizer)


def add_buffers_and_tokenizer(writer, model, tokenizer) -> None:
    """The model's buffers (dense, as they are) and, if given, the tokenizer -- what
    ``nzrt generate FILE`` reads the prompt with -- into ``writer``."""
    for name, b in model.named_buffers():
        if b.device.type != "meta":
            writer.add(name, b.detach().cpu())
    if tokenizer is not None:
        from ..loading.entries import tokenizer_entries

        for name, t in tokenizer_entries(tokenizer):
            writer.add(name, t)
