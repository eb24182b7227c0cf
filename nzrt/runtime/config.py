"""What ``nzrt.managed()`` accepts, in one value checked once.

``managed()`` keeps its explicit keywords (the documented API); they become a ``ManagedConfig``
here, whose construction resolves the policy and the optimizer and refuses what cannot work, with
the messages the runtime has always given. Every part of the runtime reads the config, never the
keywords again.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import codec
from ..policies import Fused, get_policy
from .params import DEFAULT_CHUNK_BYTES, DEFAULT_MIN_NUMEL
from .training import OptimizerConfig, as_config


@dataclass(frozen=True, eq=False)
class ManagedConfig:
    """``managed()``'s arguments (see its docstring), validated. After construction ``policy`` is
    a policy object (``get_policy``) and ``optimizer`` an ``OptimizerConfig`` or None."""

    policy: object = "auto"
    budget: object = None               # None, bytes, "6GiB" or "80%": parsed at entry (free memory)
    mantissa_bits: int | None = None    # None: lossless
    device: object = None               # None: where the parameters are
    weights: object = None              # name -> CompressedTensor | Tensor (meta models)
    prefetch: bool = True
    min_numel: int = DEFAULT_MIN_NUMEL
    chunk_bytes: int | None = DEFAULT_CHUNK_BYTES
    backend: str | None = None
    optimizer: object = None

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "optimizer", as_config(self.optimizer))
        set_(self, "policy", get_policy(self.policy))
        # the type and the widest range (fp32's) at once; each weight's dtype before compressing
        set_(self, "mantissa_bits", codec.check_mantissa_bits(self.mantissa_bits, torch.float32))
        if self.optimizer is not None and self.mantissa_bits is not None:
            raise ValueError("nzrt: training with mantissa_bits (lossy weights) is not supported: each "
                             "update would be rounded to the kept mantissa bits, so small steps would be "
                             "lost. Train losslessly (mantissa_bits=None), or freeze the lossy base "
                             "(requires_grad_(False)) and train adapters on it without `optimizer`")
        set_(self, "min_numel", int(self.min_numel))

    @property
    def fused(self) -> Fused | None:
        """The ``Fused`` policy when generation multiplies from compressed weights, else None."""
        return self.policy if isinstance(self.policy, Fused) else None

    @property
    def training(self) -> OptimizerConfig | None:
        return self.optimizer
