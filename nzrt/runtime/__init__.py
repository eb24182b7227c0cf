"""``nzrt.managed(model)``: keep a model's weights compressed and decode each layer just in time.

    with nzrt.managed(model, budget="6GiB", policy="auto") as run:
        out = model.generate(**inputs)
    print(run.report())

On entry every floating-point parameter of at least ``min_numel`` elements (bf16, fp16, fp32;
Linear, Embedding, Conv, norms, the output head; tied weights once) is compressed and its dense
storage freed. The parameter object stays the same; its class becomes ``ManagedParameter``
(``nzrt.runtime.weight``): any read of it anywhere gives the exact values (decoded on demand
outside its module's forward), any write raises ``ManagedError``. Each module that owns such a
parameter runs with its weights bound to dense slots that the scheduler decoded just in time
(``nzrt.runtime.passes``); forwards are serialised, so threads may share a managed model.
Large plain ``nn.Embedding`` weights are split into row chunks decoded only where the ids fall
(``nzrt.runtime.embedding``); a Linear always multiplies its whole weight (a GEMM's result may
depend on how its output is split).

Entry and exit are transactions (``nzrt.runtime.transaction``): an exception or Ctrl-C during
entry leaves the model exactly as it was; exit restores every parameter bit for bit (lossy mode
keeps a lossless copy in an unnamed temporary file for that, ``nzrt.runtime.spill``), with its
device, dtype and class.

Memory as the operating system sees it (``nzrt.osmem``): entry compresses one weight at a time
and frees each original as its copy is made (the file pages of a memory-mapped original are
reclaimed at once); exit restores one weight at a time and frees its compressed copy; both end
by giving the allocator's free memory back (``malloc_trim``). A ``weights`` mapping is read one
entry at a time (``nzrt.loading.safetensors_io.SafetensorsDir`` reads each tensor from disk when asked).

Autograd works through managed weights (``nzrt.runtime.saved``): the backward decodes each weight
again, so a frozen compressed base under trainable adapters (LoRA) gets exact gradients, and
``optimizer=`` trains the weights themselves, bit-identical to plain PyTorch with per-parameter
optimizers stepped in the backward (``nzrt.runtime.training``):

    with nzrt.managed(model, optimizer=functools.partial(torch.optim.AdamW, lr=1e-4)) as run:
        for batch in loader:
            model(**batch).loss.backward()   # each weight updated as its gradient is complete

Models without weights in memory: build the model on the meta device and pass ``weights=`` a
mapping of parameter (or buffer) name -> CompressedTensor or tensor, e.g. ``nzrt.load(path)``.

``budget``: bytes on the execution device for the model's weights (compressed blobs, the dense
working set, and the parameters and buffers left uncompressed). Bytes, "6GiB", or "80%" of the
memory free at entry.
"""
from __future__ import annotations

from ..policies import BudgetError
from .config import ManagedConfig
from .errors import ManagedError
from .handle import Managed, check_model, handle_of
from .params import DEFAULT_CHUNK_BYTES, DEFAULT_MIN_NUMEL
from .training import OptimizerConfig

__all__ = ["managed", "Managed", "BudgetError", "ManagedError", "OptimizerConfig", "handle_of"]


def managed(model, *, policy="auto", budget=None, mantissa_bits: int | None = None,
            device=None, weights=None, prefetch: bool = True, min_numel: int = DEFAULT_MIN_NUMEL,
            chunk_bytes: int | None = DEFAULT_CHUNK_BYTES, backend: str | None = None,
            optimizer=None) -> Managed:
    """Keep ``model``'s weights compressed inside a ``with`` block; see the module docstring.

    policy: "auto" | "resident" | "offload" | "belady" | "lru" or a policy object
        (``nzrt.policies.Resident(lookahead=2)``, ...).
    budget: None, bytes, "6GiB" or "80%" (of the free device memory).
    mantissa_bits: None for lossless; k keeps k mantissa bits (rounded to nearest).
    device: where the model runs (default: where its parameters are; cpu for a meta model).
    weights: name -> CompressedTensor | Tensor for parameters (and buffers) on the meta device.
    prefetch: False decodes every layer on demand in the calling thread (for comparisons).
    min_numel: smaller parameters stay dense. chunk_bytes: row-chunk size for large plain
        embeddings (None: no chunking). backend: the codec backend (default: automatic).
    optimizer: train: a callable taking a list of parameters and returning a torch.optim
        optimizer (one per trainable parameter, stepped in the backward as each gradient is
        complete), or an ``OptimizerConfig``. Lossless only. See ``nzrt.runtime.training``.
    """
    check_model(model)  # before the options: a wrong first argument is the error to report
    return Managed(model, ManagedConfig(policy=policy, budget=budget, mantissa_bits=mantissa_bits, device=device,
                                        weights=weights, prefetch=prefetch, min_numel=min_numel,
                                        chunk_bytes=chunk_bytes, backend=backend, optimizer=optimizer))
