"""Saving and resuming an FSDP2 run: ``run.save(path)`` and ``run.state_dict()`` under FSDP2.

``save_sharded`` writes one ``.nzrt`` -- the file a single process writes for the same weights --
from the ranks' compressed shards: one weight at a time, rank 0 gathers every rank's frame (the
compressed bytes), decodes them into that one weight, compresses it whole as a single-process run
compresses it, and writes it; no rank ever holds the dense model. Every rank must call it (it
runs collectives); only rank 0 writes.

``sharded_state_dict`` gives what ``torch.distributed.checkpoint`` saves and loads: the weights
and the optimizer states of this rank's shards as DTensors (``Shard(0)`` over FSDP2's mesh; the
states of a shard stepped in row chunks as DTensors of those rows), dense for the checkpoint's
time, plus the optimizers' scalars and groups. ``load_sharded_state_dict`` takes it back and
compresses the shards and states again. The checkpoint resumes a run of the same world size.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from ..format import CompressedTensor, frame, rowchunks
from .errors import ManagedError
from .params import chunk_spans, chunkable_embedding, find_params
from .saving import add_buffers_and_tokenizer, run_metadata
from .shard_tensor import ShardWeight


def _gather_to_rank0(w: ShardWeight):
    """The whole weight of ``w`` on rank 0 (decoded from every rank's frame), None elsewhere."""
    pg = w.fsdp_param.mesh_info.shard_process_group
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    cap = torch.tensor([frame.framed_size(w.ct)], dtype=torch.int64, device=w.device)
    dist.all_reduce(cap, op=dist.ReduceOp.MAX, group=pg)  # the exact shard's frames (not the gathers')
    buf = w.frame_buffer(w.ct, int(cap.item()))
    parts = [torch.empty_like(buf) for _ in range(world)] if rank == 0 else None
    dist.gather(buf, parts, group_dst=0, group=pg)
    if rank != 0:
        return None
    full = torch.empty(w.full_shape, dtype=w.dtype, device=w.device)
    w.decode_gathered(torch.cat(parts), full, capacity=buf.numel())
    return full


def save_sharded(run, path, tokenizer=None) -> None:
    from ..format.checkpoint import Writer

    sharded = run.shared.sharded
    sharded.reshard()
    rank = dist.get_rank()
    model = run.model
    chunk_bytes = run.config.chunk_bytes
    # a weight a single process would keep in row chunks (a lookup-only embedding) is written so
    spans = {}
    for p, names, owners in find_params(model):
        w = sharded.get(p)
        if w is not None:
            if chunkable_embedding(w.full_shape, p.element_size(), owners, chunk_bytes):
                spans[names[0]] = chunk_spans(w.full_shape, p.element_size(), chunk_bytes)
    with Writer(path, run_metadata(run, spans)) if rank == 0 else contextlib.nullcontext() as writer:
        for name, p in model.named_parameters():
            w = sharded.get(p)
            if w is not None:
                full = _gather_to_rank0(w)
                if writer is not None:
                    for a, b in spans.get(name, [(None, None)]):
                        ct = run.shared.decoder.compress(full if a is None else full[a:b]).to("cpu")
                        writer.add(name if a is None else rowchunks.entry_name(name, a, b), ct)
                del full
            elif isinstance(p, DTensor):
                full = p.full_tensor()  # a collective: every rank
                if writer is not None:
                    writer.add(name, full.detach().cpu())
            elif writer is not None:
                writer.add(name, p.detach().cpu())
        if writer is not None:
            add_buffers_and_tokenizer(writer, model, tokenizer)
    dist.barrier()


def _as_dtensor(local: torch.Tensor, w: ShardWeight) -> DTensor:
    mesh = w.fsdp_param.mesh_info.mesh
    world = mesh.size()
    shape = (local.shape[0] * world,) + tuple(local.shape[1:])
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                              stride=torch.empty(shape, device="meta").stride())


def sharded_state_dict(run) -> dict:
    """{"model": {name: DTensor}, "optimizers": ..., "lr_schedulers": ...} for DCP."""
    shared = run.shared
    trainer, sharded = shared.trainer, shared.sharded
    sharded.reshard()
    model_sd = {}
    for name, p in run.model.named_parameters():
        w = sharded.get(p)
        model_sd[name] = _as_dtensor(w.dense_copy(), w) if w is not None else p.detach()
    out = {"model": model_sd}
    if trainer is not None:
        sd = trainer.state_dict()
        for n, osd in sd["optimizers"].items():
            e = trainer.entries[n]
            st = osd.get("state", {}).get(0)
            if st is None or not isinstance(e.mp, ShardWeight):
                continue
            st = dict(st)  # the optimizer's own state dict stays as it is
            for k, v in st.items():
                if isinstance(v, CompressedTensor):
                    v = shared.decoder.decompress(v)
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    st[k] = _as_dtensor(v, e.mp)
            sd["optimizers"][n] = dict(osd, state={0: st})
        out.update(sd)
    return out


def load_sharded_state_dict(run, sd: dict) -> None:
    shared = run.shared
    trainer, sharded = shared.trainer, shared.sharded
    if not isinstance(sd, dict) or "model" not in sd:
        raise ManagedError("expected a dict from run.state_dict() under FSDP2 (with a 'model' entry)")
    sharded.reshard()
    with shared.lock, torch.no_grad():
        for name, p in run.model.named_parameters():
            if name not in sd["model"]:
                raise ManagedError(f"the state_dict has no weight {name!r}")
            v = sd["model"][name]
            local = v.to_local() if isinstance(v, DTensor) else v
            w = sharded.get(p)
            if w is not None:
                if tuple(local.shape) != w.shape or local.dtype != w.dtype:
                    raise ManagedError(f"{name!r}: the state_dict's shard is {local.dtype} {tuple(local.shape)}, "
                                       f"this rank's is {w.dtype} {w.shape}")
                w.store(local.contiguous())
            else:
                (p.to_local() if isinstance(p, DTensor) else p).copy_(local)
    if trainer is not None and "optimizers" in sd:
        opts = {}
        for n, osd in sd["optimizers"].items():
            st = osd.get("state", {}).get(0)
            if st is not None:
                st = {k: v.to_local() if isinstance(v, DTensor) and n in trainer.entries and
                      isinstance(trainer.entries[n].mp, ShardWeight) else v for k, v in st.items()}
                osd = dict(osd, state={0: st})
            opts[n] = osd
        trainer.load_state_dict(dict(sd, optimizers=opts))
