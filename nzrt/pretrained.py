"""``nzrt.from_pretrained``: from a checkpoint to a running model, never dense as a whole.

    model = nzrt.from_pretrained("path/to/llama")       # a transformers directory (safetensors)
    model = nzrt.from_pretrained("llama.nzrt")          # from `nzrt compress`: memory-mapped
    out = model.generate(**inputs)                      # managed from here on
    print(nzrt.report(model))
    nzrt.release(model)                                 # or let it be garbage-collected

* A transformers directory: the model is built with its parameters on the meta device (buffers
  are real: rotary tables are computed as transformers computes them), then each tensor is read
  from the safetensors files on its own (``nzrt.safetensors_io``, no memory map), compressed,
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

import contextlib
from collections.abc import Mapping
from pathlib import Path

__all__ = ["from_pretrained", "report", "release"]


def from_pretrained(path, *, policy="auto", budget=None, device=None, mantissa_bits: int | None = None,
                    dtype=None, **options):
    """The model at ``path`` (a transformers directory, a ``.nzrt`` or a ``.gguf``), managed.

    policy, budget, device, mantissa_bits: as ``nzrt.managed``. dtype: the dtype of the weights
    (default: the checkpoint's; a ``.nzrt`` keeps its own). ``options`` go to ``nzrt.managed``
    (``prefetch``, ``min_numel``, ``chunk_bytes``, ``backend``, ``optimizer``: with an optimizer
    every parameter is made trainable and the model is put in train mode).
    """
    from . import models

    if isinstance(path, Path):
        path = str(path)
    if not isinstance(path, str):
        raise TypeError(f"from_pretrained takes a path (str or Path), got {type(path).__name__}")
    lm = models.resolve(path, dtype=dtype, lazy=True)
    if options.get("optimizer") is not None:  # to be trained: every parameter, in train mode
        lm.model.requires_grad_(True)
        lm.model.train()
    return manage_loaded(lm, policy=policy, budget=budget, device=device, mantissa_bits=mantissa_bits,
                         **options)


def manage_loaded(lm, **kwargs):
    """Enter ``nzrt.managed`` on a ``models.LoadedModel`` and keep it entered: the model is
    returned, its handle reachable through ``report``/``release``."""
    from . import models

    run = models.managed(lm, **kwargs)
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


@contextlib.contextmanager
def parameters_on_meta():
    """Build modules with their parameters on the meta device and their buffers real, without
    running weight initialisers (accelerate's ``init_empty_weights(include_buffers=False)``)."""
    import torch
    from torch import nn

    old = nn.Module.register_parameter

    def register(module, name, param):
        old(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = dict(param.__dict__) if type(param) is not nn.Parameter else {}
            kwargs["requires_grad"] = param.requires_grad
            module._parameters[name] = type(param)(module._parameters[name].to("meta"), **kwargs)

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        from transformers.modeling_utils import no_init_weights
    nn.Module.register_parameter = register
    try:
        with no_init_weights(), torch.no_grad():
            yield
    finally:
        nn.Module.register_parameter = old


class CastWeights(Mapping):
    """A read-one-at-a-time mapping whose float tensors are cast to ``dtype`` as they are read."""

    def __init__(self, inner, dtype):
        self.inner, self.dtype = inner, dtype

    def __getitem__(self, key):
        t = self.inner[key]
        if t.is_floating_point() and t.dtype != self.dtype:
            t = t.to(self.dtype)
        return t

    def __contains__(self, key):
        return key in self.inner

    def mapped(self, key):
        """The inner mapping's memory-mapped tensor, when it has the wanted dtype already."""
        fn = getattr(self.inner, "mapped", None)
        t = fn(key) if fn is not None else None
        return t if t is not None and (not t.is_floating_point() or t.dtype == self.dtype) else None

    def __iter__(self):
        return iter(self.inner)

    def __len__(self):
        return len(self.inner)

    def keys(self):
        return self.inner.keys()
