"""Planning glue: layer sizes and costs for the policy, the smallest budget, moving tensors to tiers."""
from __future__ import annotations

import warnings

from ..budget import format_bytes
from ..policies import BudgetError, Costs, LayerInfo, Offload, Resident, Tier


def layer_infos(units: dict, tensors: dict) -> dict:
    out = {}
    seen_keys: set = set()
    for unit, keys in units.items():
        dense = sum(tensors[k].dense_bytes for k in keys)
        comp = 0
        for k in keys:
            if k not in seen_keys:  # tied tensors: the compressed bytes count once
                comp += tensors[k].ct.nbytes
                seen_keys.add(k)
        on_disk = all(tensors[k].on_disk for k in keys)
        out[unit] = LayerInfo(unit, dense, comp, on_disk)
    return out


def costs_for(device, seconds: dict, decode_bps: float | None = None) -> Costs:
    cpu = device.type == "cpu"
    return Costs(decode_bps=decode_bps or (1.5e9 if cpu else 200e9), h2d_bps=12e9, disk_bps=1.5e9,
                 layer_seconds=dict(seconds), overlap=0.5 if cpu else 1.0, host_is_device=cpu)


def smallest_budget(layers: dict, costs, fixed_bytes: int) -> int:
    best = None
    for pol in (Resident(0), Offload(0), Offload(0, tier=Tier.DISK)):
        try:
            p = pol.plan((), layers, None, costs)
        except BudgetError:  # pragma: no cover
            continue
        best = p.peak_bytes if best is None else min(best, p.peak_bytes)
    return (best or 0) + fixed_bytes


def initial_plan(policy, layers, budget, fixed_bytes, costs):
    unit_budget = None if budget is None else budget - fixed_bytes
    try:
        if unit_budget is not None and unit_budget <= 0:
            raise BudgetError("fixed bytes exceed the budget", 0)
        return policy.plan((), layers, unit_budget, costs)
    except BudgetError:
        smallest = smallest_budget(layers, costs, fixed_bytes)
        raise BudgetError(
            f"budget {format_bytes(budget)} ({budget} bytes) is too small for this model "
            f"under policy {getattr(policy, 'name', policy)!s}: the smallest budget that works is "
            f"{format_bytes(smallest)} ({smallest} bytes) "
            f"(compressed weights, the largest layer decoded, and {format_bytes(fixed_bytes)} of "
            f"uncompressed parameters and buffers)", smallest) from None


def replan(policy, trace, layers, budget, fixed_bytes, costs, device, note):
    """The plan for a traced order; a plan that does not fit falls back to decoding on demand."""
    unit_budget = None if budget is None else budget - fixed_bytes
    try:
        return policy.plan(trace, layers, unit_budget, costs)
    except BudgetError as e:
        msg = (f"nzrt: policy {getattr(policy, 'name', policy)} does not fit the budget "
               f"with the traced execution order ({e}); decoding on demand instead")
        warnings.warn(msg, stacklevel=3)
        note(msg)
        tier = Tier.DEVICE if device.type == "cpu" else Tier.HOST
        fallback = Resident(0) if tier == Tier.DEVICE else Offload(0)
        return fallback.plan(trace, layers, unit_budget, costs)


def place(plan, units: dict, tensors: dict, tier_now: dict, device) -> None:
    """Move every compressed tensor to its tier (the best tier among the units that use it)."""
    rank = {Tier.DENSE: 0, Tier.DEVICE: 1, Tier.HOST: 2, Tier.DISK: 3}
    tiers = plan.tier_of
    key_tier: dict = {}
    for unit, keys in units.items():
        t = tiers.get(unit, Tier.DEVICE)
        for k in keys:
            if k not in key_tier or rank[t] < rank[key_tier[k]]:
                key_tier[k] = t
    cuda = device.type == "cuda"
    for k, t in key_tier.items():
        s = tensors[k]
        if tier_now.get(k) == t:
            continue
        ct = s.ct
        if t == Tier.DISK and s.on_disk:
            new = s.home
        elif t == Tier.DEVICE:
            if cuda:
                new = ct if ct.device.type == "cuda" else ct.to(device)
            else:  # a memory-mapped blob stays mapped: a copy would hold its bytes twice
                new = ct
        else:  # host, dense (the compressed copy waits in host memory), or disk without a file
            if cuda:
                host = ct if ct.device.type == "cpu" else ct.to("cpu")
                new = host if host.is_pinned() or t == Tier.DENSE else host.pin_memory()
            else:
                new = ct
        s.ct = new
        if not s.on_disk:
            s.home = new  # one copy: the old placement is freed (a file-backed home stays)
        tier_now[k] = t
