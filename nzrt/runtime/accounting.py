"""What a managed model holds (measured from storages) and the report of a run."""
from __future__ import annotations

from torch import nn

from ..memory import storage_bytes
from ..policies import Tier
from ..reports import LayerReport, Report


def is_mapped(ct) -> bool:
    """Whether a CompressedTensor's bytes come from a memory-mapped file (``nzrt.load``)."""
    return ct.source is not None


def fixed_bytes(model, managed_params, device) -> int:
    """Bytes of the parameters and buffers left uncompressed, on the execution device."""
    managed = {id(p) for p in managed_params}
    tensors = [p for p in model.parameters() if id(p) not in managed]
    tensors += list(model.buffers())
    return storage_bytes(t for t in tensors if t.device == device)


def held_bytes(shared, model, restore_bytes: int, attached: bool) -> dict:
    """Bytes actually held now, measured from the storages (not computed from shapes):
    compressed blobs by where they live, the dense slot pool, uncompressed parameters and
    buffers, and lossless restore copies (lossy mode: ``restore_bytes``, on disk).
    ``shared``: the block's shared state (``nzrt.runtime.shared``)."""
    blobs = {"device": 0, "host": 0, "mapped": 0}
    seen = set()
    for s in shared.tensors.values():
        for ct in (s.ct, s.home):
            if ct is None or id(ct.data) in seen:
                continue
            seen.add(id(ct.data))
            if is_mapped(ct):  # file-backed pages: the blob's own bytes, not the whole map
                blobs["mapped"] += ct.data.numel()
                continue
            place = "device" if ct.device == shared.device else "host"
            blobs[place] += storage_bytes([ct.data])
    dense = shared.scheduler.dense_bytes_held() if shared.scheduler is not None else 0
    return {"compressed_device": blobs["device"], "compressed_host": blobs["host"],
            "compressed_mapped": blobs["mapped"],
            "dense_slots": dense,
            "uncompressed": fixed_bytes(model, [mp.param for mp in shared.params], shared.device)
            if attached else 0,
            "restore_copies_on_disk": restore_bytes,  # on disk (a temporary file), not in RAM
            # what the managed parameters themselves hold: one element each (see weight.py)
            "placeholders": storage_bytes(mp.placeholder for mp in shared.params if mp.active)}


def build_report(shared, held: dict, *, policy, layers: dict, budget, fixed_bytes: int, mantissa_bits,
                 entry_seconds: float, warnings: list, weights_dense_bytes: int) -> Report:
    """The report of a block: ``shared`` (its scheduler, tracker, trainer and stats), ``held``
    (``held_bytes``), and what entry decided (policy, layers, budget, ...)."""
    s = shared.scheduler
    if s is not None and s.cuda:
        s.cuda_times()
    tiers = s.plan.tier_of if s is not None and s.plan is not None else {}
    layer_reports = []
    for unit, info in layers.items():
        st = s.stats[unit] if s is not None else None
        layer_reports.append(LayerReport(
            name=unit, tier=tiers.get(unit, Tier.DEVICE), dense_bytes=info.dense_bytes,
            compressed_bytes=info.compressed_bytes, decodes=st.decodes if st else 0,
            decode_s=st.decode_s if st else 0.0, transfer_s=st.transfer_s if st else 0.0,
            stall_s=st.stall_s if st else 0.0, hits=st.hits if st else 0, misses=st.misses if st else 0,
            runs=st.runs if st else 0))
    plan = s.plan if s is not None else None
    tracker = shared.tracker
    return Report(
        policy=getattr(policy, "name", str(policy)), device=str(shared.device),
        plan=plan.summary() if plan is not None else "", budget=budget,
        mantissa_bits=mantissa_bits, layers=layer_reports, held=held,
        peaks=dict(tracker.peaks) if tracker is not None else {},
        nvml=tracker.nvml_status if tracker is not None else "",
        runtime_peak_dense=s.runtime_peak if s else 0,
        pool_allocations=s.pool.allocations if s else 0,
        passes=s.passes if s else 0, divergences=s.divergences if s else 0,
        replans=s.replans if s else 0, mode=s.mode if s else "", entry_s=entry_seconds,
        warnings=list(warnings), fixed_bytes=fixed_bytes,
        weights_dense_bytes=weights_dense_bytes,
        weights_compressed_bytes=shared.weights_compressed_bytes,
        training=shared.trainer.summary() if shared.trainer is not None else "",
        sharded=shared.sharded.summary() if shared.sharded is not None else "",
        fused=shared.fused_stats.summary() if shared.fused is not None else "",
        blocked=blocked_summary(shared.params, shared.blocked_stats))


def blocked_summary(params: list, stats: dict) -> str:
    """What the report says of heads kept in row chunks (``blocked.py``): where, how large a slot,
    and how their calls ran (``stats``: calls by path)."""
    heads = [(mp, mp.rows) for mp in params
             if mp.chunked and any(isinstance(m, nn.Linear) for m, _ in mp.owners)]
    if not heads:
        return ""
    parts = [f"{mp.names[0]} in {len(rows)} row chunks of {rows[0][1] - rows[0][0]} rows" for mp, rows in heads]
    st = stats
    return (f"heads: {'; '.join(parts)} (no dense copy of the whole weight); calls: {st['blocked']} blocked "
            f"(the blocked product probed bit-identical here), {st['whole']} whole (a transient dense copy: "
            f"the probe differed, NZRT_BLOCKED_MATMUL=never, or autograd)")
