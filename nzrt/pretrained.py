"""``nzrt.from_pretrained``: from a checkpoint to a running model, never dense as a whole.

    model = nzrt.from_pretrained("path/to/llama")       # a transformers directory (safetensors)
    model = nzrt.from_pretrained("llama.nzrt")          # from `nzrt compress`: memory-mapped
    out = model.generate(**inputs)                      # managed from here on
    print(nzrt.report(model))
    nzrt.release(model)                                 # or let it be garbage-collected

* A transformers directory: the model is built with its parameters on the meta device (buffers
  are real: rotary tables are computed as transformers computes them), then each tensor is read
  from the safetensors files on its own (``nzrt.loading.safetensors_io``, no memory map), compressed,
  and dropped before the next is read.
* A ``.nzrt``: the compressed blobs stay in the file's memory map (file-backed pages, which the
  runtime gives back after reading them); on the CPU none is copied into anonymous memory.
* A ``.gguf``: transformers de-quantizes it into a dense model, which entry then compresses one
  tensor at a time, freeing each original as its compressed copy is made.

The model that comes back is managed until ``nzrt.release(model)`` (which gives the parameters
back to the meta device for a model built from a checkpoint, or restores them for a loaded one)
or until nothing refers to it any more.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["from_pretrained", "report", "release"]


def from_pretrained(path, *, policy="auto", budget=None, device=None, mantissa_bits: int | None = None,
                    dtype=None, **options):
    """The model at ``path`` (a transformers directory, a ``.nzrt`` or a ``.gguf``; or ``"smollm2"`` /
    ``"minilm"``, the trained models that ship inside packages), managed.

    policy, budget, device, mantissa_bits: as ``nzrt.managed``. dtype: the dtype of the weights
    (default: the checkpoint's; a ``.nzrt`` keeps its own). ``options`` go to ``nzrt.managed``
    (``prefetch``, ``min_numel``, ``chunk_bytes``, ``backend``, ``optimizer``: with an optimizer
    every parameter is made trainable and the model is put in train mode).
    """
    from .loading.embedded import EMBEDDED, load_embedded
    from .loading.loaded import parse_dtype
    from .loading.open_model import open_model

    if isinstance(path, Path):
        path = str(path)
    if not isinstance(path, str):
        raise TypeError(f"from_pretrained takes a path (str or Path), got {type(path).__name__}")
    if path.lower() in EMBEDDED:
        lm = load_embedded(path.lower(), parse_dtype(dtype), lazy=True)
    else:
        lm = open_model(path, dtype=dtype, lazy=True)
    if options.get("optimizer") is not None:  # to be trained: every parameter, in train mode
        lm.model.requires_grad_(True)
        lm.model.train()
    return manage_loaded(lm, policy=policy, budget=budget, device=device, mantissa_bits=mantissa_bits,
                         **options)


def manage_loaded(lm, **kwargs):
    """Enter ``nzrt.managed`` on a ``nzrt.loading.loaded.LoadedModel`` and keep it entered: the
    model is returned, its handle reachable through ``report``/``release``. A meta model (from a
    ``.nzrt`` or read from safetensors) hands over its weights, so the dense model never exists
    whole. An option given as None takes ``managed``'s default (``chunk_bytes``, ``min_numel``)."""
    from .runtime import managed

    options = {k: v for k, v in kwargs.items() if v is not None or k == "policy"}
    run = managed(lm.model, weights=lm.compressed, **options)
    run.attach()  # the model's wrapped forwards keep the handle alive from here on
    return lm.model


def _handle(model):
    from .runtime.handle import handle_of

    run = handle_of(model)
    if run is None:
        raise ValueError("this model is not managed by nzrt (from_pretrained or an entered managed() block)")
    return run


def report(model):
    """The runtime report of a managed model (bytes held, decodes, stalls, peaks)."""
    return _handle(model).report()


def release(model) -> None:
    """End the management of ``model``: a model built from a checkpoint goes back to the meta
    device (its weights are freed), a model that was loaded gets its dense weights back."""
    _handle(model).detach()
