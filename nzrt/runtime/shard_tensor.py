"""A compressed FSDP2 shard: the local tensor inside a sharded parameter's DTensor.

FSDP2 (``fully_shard``) keeps each parameter as a DTensor whose ``_local_tensor`` is this rank's
rows. nzrt puts a ``CompressedShard`` there: a wrapper tensor subclass of the shard's shape and
dtype that holds no dense storage, only a reference to its ``ShardWeight`` (the compressed bytes,
which a training step replaces). FSDP2's all-gather extension points (torchao's float8 pattern):

* ``fsdp_pre_all_gather`` returns the shard's *frame* (``nzrt.format.frame``): uint8, zero-padded
  to the capacity every rank agreed on, so each rank sends the same number of bytes;
* ``fsdp_post_all_gather`` decodes every rank's frame into its rows of the unsharded weight (the
  forward's, and again the backward's after FSDP2 freed it: ``out=``).

Any other op on the shard (a read: ``p.full_tensor()``, ``state_dict()``, printing) sees its exact
dense values, decoded on demand; a write into it raises ``ManagedError``: the compressed shard is
the truth while managed, and nzrt's optimizer step is the one writer.
"""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_map_only

from ..format import frame
from .errors import ManagedError

_aten = torch.ops.aten
_ALIASES = (_aten.detach.default, _aten.alias.default)


class ShardWeight:
    """One parameter's local shard, compressed (the state a ``CompressedShard`` refers to).

    ``fsdp_param``: FSDP2's record of the parameter; ``ct``: the shard (shape = the local shard's,
    rows ``[rank * rows, (rank + 1) * rows)`` of the weight); ``decoder``: the session's codec.
    ``capacity`` is set by the ranks' agreement (``fsdp.ShardedWeights.agree``) before a gather.
    Under FSDP2's mixed precision (``param_dtype`` narrower than the weight's, e.g. fp32 weights and
    bf16 compute) the gathers carry the shard cast to ``param_dtype`` -- what plain FSDP2 gathers --
    compressed once per version of the shard (``wire_ct``), not the full-width shard.
    """

    def __init__(self, name: str, fsdp_param, ct, decoder):
        self.names = [name]
        self.fsdp_param = fsdp_param
        self.ct = ct
        self.decoder = decoder
        self.shape = tuple(ct.shape)
        self.dtype = ct.dtype
        self.device = ct.device
        wire = getattr(fsdp_param, "param_dtype", None)
        self.wire_dtype = wire if wire is not None and wire.itemsize < ct.dtype.itemsize else None
        self._wire = None         # (version, CompressedTensor of the shard cast to wire_dtype)
        self.capacity = 0
        self.version = 0
        self.active = True
        self.gathers = 0          # all-gathers this shard took part in
        self.sent_bytes = 0       # bytes it put into them (its frames, padding included)

    @property
    def dense_bytes(self) -> int:
        return self.ct.numel() * self.ct.dtype.itemsize

    @property
    def full_shape(self) -> tuple:
        """The whole weight's shape: the shards of every rank of FSDP2's shard group, stacked."""
        return (self.shape[0] * self.fsdp_param.mesh_info.shard_mesh_size,) + self.shape[1:]

    @property
    def wire_ct(self):
        """What the all-gathers carry: the shard, or (mixed precision) its cast to ``wire_dtype``."""
        if self.wire_dtype is None:
            return self.ct
        if self._wire is None or self._wire[0] != self.version:
            self._wire = None  # the old one goes before the new one is made
            self._wire = (self.version, self.decoder.compress_lossless(self.dense_copy().to(self.wire_dtype)))
        return self._wire[1]

    def needed(self) -> int:
        return frame.framed_size(self.wire_ct)

    def dense_copy(self) -> torch.Tensor:
        """The shard's exact values in a fresh tensor ``[shape]`` of its dtype."""
        if not self.active:
            raise ManagedError(f"nzrt: {self.names[0]!r} is no longer managed (the block has ended)")
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        self.decoder.decode(self.ct, out)
        return out

    def store(self, dense: torch.Tensor) -> None:
        """A training step's new shard (exact): compressed again, lossless."""
        self._wire = None
        self.ct = self.decoder.compress_lossless(dense)
        self.version += 1

    def wire(self) -> torch.Tensor:
        """This rank's all-gather input: the frame, zero-padded to ``capacity`` bytes."""
        if self.needed() > self.capacity:  # a step grew it after the last agreement
            raise ManagedError(f"nzrt: {self.names[0]!r}'s compressed shard ({self.needed()} bytes) "
                               f"outgrew the all-gather capacity ({self.capacity}); the ranks agree on "
                               f"capacities before each forward of the root module: gather only through it")
        buf = self.frame_buffer(self.wire_ct, self.capacity)
        self.gathers += 1
        self.sent_bytes += self.capacity
        return buf

    def frame_buffer(self, ct, capacity: int) -> torch.Tensor:
        """``ct``'s frame in a fresh uint8 buffer of ``capacity`` bytes."""
        buf = torch.empty(capacity, dtype=torch.uint8, device=self.device)
        frame.pack_into(ct, buf)
        return buf

    def decode_gathered(self, gathered: torch.Tensor, out: torch.Tensor, capacity: int | None = None) -> None:
        """Every rank's frame in ``gathered`` (uint8 ``[world * capacity]``) into its rows of
        ``out`` (the unsharded weight, contiguous, the frames' dtype: rank r's shard is its r-th
        block of rows)."""
        capacity = capacity or self.capacity
        world = gathered.numel() // capacity
        n = self.ct.numel()
        flat = out.view(-1)
        for r in range(world):
            # a copy: the decoder reads a blob through numpy, which would pin the size of FSDP2's
            # all-gather buffer (it frees and re-grows it: ``storage.resize_``)
            part = gathered[r * capacity:(r + 1) * capacity].clone()
            ct = frame.unpack(part, f"{self.names[0]!r}: rank {r}'s gathered shard")
            if tuple(ct.shape) != self.shape or ct.dtype != out.dtype:
                raise ManagedError(f"nzrt: rank {r} sent {self.names[0]!r} as {ct.dtype} {tuple(ct.shape)}, "
                                   f"this rank expects {out.dtype} {self.shape}")
            self.decoder.decode(ct, flat[r * n:(r + 1) * n])


def _written_args(func, args, kwargs):
    """The arguments an aten op writes (in-place or ``out=``)."""
    schema = func._schema
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            if i < len(args):
                yield args[i]
            elif a.name in kwargs:
                yield kwargs[a.name]


class CompressedShard(torch.Tensor):
    """The local shard of an FSDP2 parameter, held compressed (see the module docstring)."""

    @staticmethod
    def __new__(cls, weight: ShardWeight):
        return torch.Tensor._make_wrapper_subclass(cls, weight.shape, dtype=weight.dtype,
                                                   device=weight.device, requires_grad=False)

    def __init__(self, weight: ShardWeight):
        self._weight = weight

    def __repr__(self):
        w = self._weight
        return (f"CompressedShard({w.names[0]!r}, shape={w.shape}, dtype={w.dtype}, "
                f"{w.ct.nbytes} bytes for {w.dense_bytes})")

    def __reduce_ex__(self, protocol):  # pickles (torch.save) as its dense values
        return self._weight.dense_copy().__reduce_ex__(protocol)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ALIASES:  # DTensor and nn.Parameter detach their local tensor: the same shard
            return CompressedShard(args[0]._weight)
        for t in _written_args(func, args, kwargs):
            if isinstance(t, CompressedShard):
                raise ManagedError(f"nzrt: {t._weight.names[0]!r} is a compressed FSDP2 shard managed by "
                                   f"nzrt.managed(); it cannot be written in place ({func}): its optimizer "
                                   f"step is nzrt's (optimizer=...), or leave the block first")
        args, kwargs = tree_map_only(CompressedShard, lambda t: t._weight.dense_copy(), (args, kwargs))
        return func(*args, **kwargs)

    # -- FSDP2's all-gather extension ----------------------------------------------------------
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        return (self._weight.wire(),), None

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        (gathered,) = all_gather_outputs
        w = self._weight
        world = gathered.numel() // w.capacity
        full = (w.shape[0] * world,) + w.shape[1:]
        sent = w.wire_dtype or w.dtype      # the frames' dtype
        dtype = param_dtype or w.dtype      # the unsharded weight's (FSDP2's mixed precision)
        with torch.no_grad():
            # straight into FSDP2's unsharded weight when it has the frames' dtype (``out=``: the
            # backward's gather after FSDP2 freed it); else a new tensor, cast if need be
            direct = out is not None and dtype == sent
            target = out.data if direct else torch.empty(full, dtype=sent, device=w.device)
            w.decode_gathered(gathered, target)
            _free(gathered)
            if out is not None:
                if not direct:
                    out.data.copy_(target)
                return None
            dense = target if dtype == sent else target.to(dtype)
            return dense, (dense,)


def _free(gathered: torch.Tensor) -> None:
    """Give back the all-gather's buffer once it is decoded: FSDP2 would hold it beside the
    unsharded weight until the reshard (the root's: through the whole forward and backward);
    it re-grows it for the next gather (``alloc_storage``)."""
    storage = gathered.untyped_storage()
    if storage.size() != 0:
        storage.resize_(0)
