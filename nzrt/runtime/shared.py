"""What the parts of one entered ``managed()`` block share while it runs.

The wrapped forwards (``passes``, ``fused``, ``blocked``, ``embedding``), autograd's saved weights
(``saved``, through ``Param.manager``), the training steps (``training``) and the report all read
the same few things: the pass lock, the compressed tensors, the scheduler, the decoder. They get
this object -- not the ``Managed`` handle, whose entry and exit orchestration is none of their
business. The handle builds it at entry and drops it at exit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..policies import Tier
from .decoder import Decoder, decode_chunks
from .fused import FusedStats
from .passes import PassLock


@dataclass(eq=False)
class Shared:
    device: torch.device
    decoder: Decoder
    fused: object = None            # the Fused policy (fused generation), else None
    lock: PassLock = field(default_factory=PassLock)  # one pass at a time (passes.py)
    params: list = field(default_factory=list)   # committed (managed) Params, in commit order
    tensors: dict = field(default_factory=dict)  # key -> scheduler.TensorSlot
    tier_now: dict = field(default_factory=dict)  # key -> the tier its compressed copy is on now
    scheduler: object = None
    tracker: object = None          # nzrt.memory.MemoryTracker
    trainer: object = None          # per-parameter optimizers (optimizer=...)
    sharded: object = None          # an FSDP2 model's compressed local shards (fsdp.ShardedWeights)
    fused_pass: bool = False        # inside a fused pass (policies.Fused; fused.py)
    fused_stats: FusedStats = field(default_factory=FusedStats)
    blocked_stats: dict = field(default_factory=lambda: {"blocked": 0, "whole": 0})  # head calls by path
    rss_after_trim: int = 0         # RSS after the last end-of-pass trim (passes.py)
    last_saved: object = None       # weakref to the weight token autograd saved last (saved.py)
    weights_compressed_bytes: int = 0  # the managed weights' compressed bytes now (training changes them)
    # the ``Managed`` handle, held only to keep it alive as long as the model's wrapped forwards
    # (which hold this object) are: ``from_pretrained`` keeps no other reference to it. Never read.
    owner: object = None

    def lock_held(self) -> bool:
        return self.lock.held_here()

    def dense_copy(self, mp) -> torch.Tensor:
        """A fresh dense tensor with the parameter's values (what its module computes with)."""
        return self.dense_into(mp, torch.empty(mp.shape, dtype=mp.dtype, device=self.device))

    def dense_into(self, mp, out) -> torch.Tensor:
        """The parameter's values decoded into ``out`` (contiguous, its shape and dtype)."""
        return decode_chunks(mp, out, lambda key: self.tensors[key].ct, self.decoder.decode)

    def fused_weight(self, key):
        return self.decoder.fused_weight(key, self.tensors[key].ct)

    def update_weight(self, mp, dense) -> None:
        """A training step changed ``mp``'s weight to ``dense`` (exact, on the device): compress
        each chunk again (lossless), put it on its tier, and give held dense copies the new values."""
        rows = dense.view(mp.shape[0], -1) if dense.dim() else dense.view(1)
        cuda = self.device.type == "cuda"
        for key, (a, b) in zip(mp.keys, mp.rows):
            part = rows[a:b].reshape((b - a,) + tuple(mp.shape[1:])) if mp.chunked else dense
            ct = self.decoder.compress_lossless(part)
            s = self.tensors[key]
            tier = self.tier_now.get(key)
            if cuda and tier not in (None, Tier.DEVICE):  # host tiers: pinned host memory
                ct = ct.to("cpu").pin_memory()
            self.weights_compressed_bytes += ct.nbytes - s.ct.nbytes
            self.decoder.replaced(s.ct)
            s.ct = s.home = ct
            s.on_disk = False
            self.scheduler.refresh(key, part.reshape(-1))
        mp.file_original = None  # the trained values are in the compressed copy now
        mp.version += 1
