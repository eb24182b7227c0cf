"""FSDP2 models under ``nzrt.managed()``: each rank's shards compressed, all-gathers of compressed bytes.

The user's FSDP2 code stays as it is (``fully_shard`` on each block and on the root, then
``with nzrt.managed(model, optimizer=...)``). At entry, for every parameter FSDP2 shards evenly
on dim 0, this part compresses the rank's local shard (lossless) and puts a ``CompressedShard``
in the DTensor in place of the dense rows (``shard_tensor``); FSDP2 then all-gathers the shards'
frames (uint8) and each rank decodes them into the unsharded weight just before the forward (and
the backward) that needs it. Gradients go through FSDP2's reduce-scatter unchanged; the trainer
steps each sharded parameter from its post-accumulate-grad hook and compresses the new shard.

All ranks must send the same number of bytes in an all-gather, and a step changes a shard's
compressed size; so before each forward of a root FSDP module the ranks agree on every shard's
capacity (one ``all_reduce(MAX)`` of a vector of sizes, in a forward pre-hook that runs before
FSDP2's own). Exit is entry's exact inverse: dense local shards, FSDP2's default all-gather path,
the hooks removed.

Left dense (with a warning): a parameter FSDP2 shards unevenly (its rows do not divide by the
world size: FSDP2 pads it), sharded on another dim, offloaded to the CPU by FSDP2, or already a
tensor subclass (e.g. float8); small ones (below ``min_numel``) silently, as on one device.
"""
from __future__ import annotations

import sys

import torch

from .params import FLOATS
from .shard_tensor import CompressedShard, ShardWeight

_ALIGN = 16  # capacities are rounded up to this many bytes


def fsdp_modules(model) -> list:
    """The modules of ``model`` that ``fully_shard`` wrapped ([] without importing FSDP)."""
    if "torch.distributed.fsdp" not in sys.modules:
        return []  # nothing can have been sharded: keep ``import nzrt`` and plain models cheap
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _roots(modules) -> list:
    """The FSDP modules that no other one contains (the ones users call forward on)."""
    inner = {id(sub) for m in modules for sub in m.modules() if sub is not m}
    return [m for m in modules if id(m) not in inner]


def _reset_gather_state(fp) -> None:
    """Forget FSDP2's all-gather buffers and unsharded parameter of ``fp``, so the next gather
    builds them afresh for the local tensor it holds now (compressed, or dense again)."""
    fp.all_gather_outputs = []
    fp._unsharded_inner_tensors = []
    if hasattr(fp, "_unsharded_param"):
        del fp._unsharded_param


class ShardedWeights:
    """The compressed local shards of one managed FSDP2 model (built at entry, undone at exit)."""

    def __init__(self, model, decoder, min_numel: int, warnings: list):
        self.model = model
        self.decoder = decoder
        self.min_numel = min_numel
        self.warnings = warnings
        self.weights: list[ShardWeight] = []
        self._by_param: dict = {}      # id(DTensor parameter) -> ShardWeight
        self._seen: set = set()        # id() of every FSDP2 parameter, compressed or not
        self._hooks: list = []
        self.modules: list = []        # the model's FSDP2 modules (fsdp_modules), set by take()

    def get(self, param):
        """The ShardWeight standing for ``param`` (a sharded parameter), or None."""
        return self._by_param.get(id(param))

    def __contains__(self, param) -> bool:
        """Whether ``param`` is an FSDP2 parameter (compressed here, or kept dense with a reason)."""
        return id(param) in self._seen

    # -- entry ----------------------------------------------------------------------------------
    def reshard(self) -> None:
        """Every FSDP2 module sharded (FSDP2 keeps the root's weights gathered after a forward:
        ``model.named_parameters()`` would list the unsharded ones)."""
        for m in self.modules:
            m.reshard()

    def take(self, modules) -> None:
        from torch.distributed.fsdp._fully_shard._fsdp_param import ExtensionsData
        from torch.distributed.fsdp._fully_shard._fsdp_param import ShardedState

        self.modules = modules
        roots = _roots(modules)
        for root in roots:
            root._get_fsdp_state()._lazy_init()  # FSDP2 pads and re-views shards here: before the swap
        self.reshard()
        names = {}
        for name, p in self.model.named_parameters():
            names.setdefault(id(p), name)
        for m in modules:
            for group in m._get_fsdp_state()._fsdp_param_groups:
                for fp in group.fsdp_params:
                    if fp.sharded_state != ShardedState.SHARDED:  # pragma: no cover (reshard() above)
                        raise RuntimeError("an FSDP2 parameter is not sharded after reshard()")
                    if id(fp.sharded_param) in self._seen:  # fully_shard([a, b]): one state, two modules
                        continue
                    name = names.get(id(fp.sharded_param), fp._module_info.param_name)
                    self._seen.add(id(fp.sharded_param))
                    if not self._eligible(fp, name):
                        continue
                    local = fp._sharded_local_tensor
                    w = ShardWeight(name, fp, self.decoder.compress_lossless(local), self.decoder)
                    self.weights.append(w)  # before the swap: a failure from here on is restored
                    self._by_param[id(fp.sharded_param)] = w
                    fp._sharded_param_data = torch.empty(0, dtype=local.dtype, device=local.device)
                    fp.sharded_param._local_tensor = CompressedShard(w)
                    fp._extensions_data = ExtensionsData()
                    _reset_gather_state(fp)
                    del local
        self.agree()
        for root in roots:
            self._hooks.append(root.register_forward_pre_hook(self._before_forward, prepend=True))

    def _eligible(self, fp, name: str) -> bool:
        # every test below gives the same answer on every rank (the shard's padded size, never its
        # own rows): the ranks must agree on which shards they gather compressed
        local = fp._sharded_local_tensor
        if local.dtype not in FLOATS or fp.padded_sharded_param_size.numel() < self.min_numel:
            return False
        why = None
        if type(local) is not torch.Tensor:
            why = f"its local shard is a {type(local).__name__}"
        elif fp.offload_to_cpu:
            why = "FSDP2 offloads it to the CPU (CPUOffloadPolicy)"
        elif fp.is_dtensor:
            why = "it is a DTensor already (tensor parallel)"
        elif fp.mesh_info.mesh.ndim != 1:
            why = f"its mesh has {fp.mesh_info.mesh.ndim} dimensions (HSDP): nzrt compresses shards of 1-D meshes"
        elif fp.fsdp_placement.dim != 0:
            why = f"FSDP2 shards it on dim {fp.fsdp_placement.dim}"
        elif fp._orig_size[0] % fp.mesh_info.shard_mesh_size:  # decided alike on every rank
            why = (f"FSDP2 shards it unevenly ({tuple(fp._orig_size)} over {fp.mesh_info.shard_mesh_size} "
                   f"ranks: the rows do not divide by the world size)")
        if why is not None:
            self.warnings.append(f"{name!r}: kept dense under FSDP2: {why}")
            return False
        return True

    # -- the ranks' agreement on capacities ----------------------------------------------------
    def _before_forward(self, module, args):
        self.agree()

    def agree(self) -> None:
        """Every shard's all-gather capacity = the largest frame any rank holds for it now."""
        import torch.distributed as dist

        by_group: dict = {}
        for w in self.weights:
            pg = w.fsdp_param.mesh_info.shard_process_group
            by_group.setdefault(id(pg), (pg, []))[1].append(w)
        for pg, ws in by_group.values():
            sizes = torch.tensor([w.needed() for w in ws], dtype=torch.int64)
            if ws[0].device.type == "cuda":  # NCCL reduces device tensors
                sizes = sizes.to(ws[0].device)
            dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=pg)
            for w, need in zip(ws, sizes.tolist()):
                cap = -(-int(need) // _ALIGN) * _ALIGN
                if cap != w.capacity:
                    w.capacity = cap
                    w.fsdp_param.all_gather_outputs = []  # FSDP2 sizes its buffers at the first gather

    # -- exit -----------------------------------------------------------------------------------
    def restore(self) -> None:
        """Dense local shards again (exact), FSDP2's default all-gather, no hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.reshard()
        for w in self.weights:
            if not w.active:
                continue
            fp = w.fsdp_param
            dense = w.dense_copy()
            fp._sharded_param_data = dense.view(-1)
            fp.sharded_param._local_tensor = dense
            _reset_gather_state(fp)
            w.active = False

    # -- the report -----------------------------------------------------------------------------
    def summary(self) -> str:
        from ..budget import format_bytes

        dense = sum(w.dense_bytes for w in self.weights)
        comp = sum(w.ct.nbytes for w in self.weights)
        sent = sum(w.sent_bytes for w in self.weights)
        # what plain FSDP2 would have sent: the dense shards, in param_dtype under mixed precision
        dense_sent = sum(w.gathers * w.ct.numel() * (w.wire_dtype or w.dtype).itemsize for w in self.weights)
        ratio = f" ({sent / dense_sent:.2f}x plain FSDP2's)" if dense_sent else ""
        return (f"fsdp2: {len(self.weights)} local shards compressed, {format_bytes(dense)} -> "
                f"{format_bytes(comp)} on this rank; all-gathers sent {format_bytes(sent)}{ratio}")
