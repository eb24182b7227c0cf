"""Planning glue: layer sizes and costs for the policy, the smallest budget, moving tensors to tiers,
and ``Planner``, the scheduler's planning and placing callbacks for one block."""
from __future__ import annotations

import warnings

from .. import osmem, policies
from ..budget import format_bytes
from ..policies import Auto, BudgetError, Costs, LayerInfo, Offload, Tier
from .accounting import is_mapped


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
        # on disk only with a file behind it: a compressed tensor the caller holds in memory
        # (not memory-mapped) is memory, and the budget counts it where the host is the device
        on_disk = all(tensors[k].on_disk and is_mapped(tensors[k].home) for k in keys)
        out[unit] = LayerInfo(unit, dense, comp, on_disk)
    return out


def costs_for(device, seconds: dict, decode_bps: float | None = None) -> Costs:
    cpu = device.type == "cpu"
    return Costs(decode_bps=decode_bps or (1.5e9 if cpu else 200e9), h2d_bps=12e9, disk_bps=1.5e9,
                 layer_seconds=dict(seconds), overlap=0.5 if cpu else 1.0, host_is_device=cpu)


def smallest_budget_for(policy, layers: dict, costs, fixed_bytes: int) -> int:
    """The exact smallest budget (bytes) for ``policy`` (the user's, not the best of others): its
    entry plan fits and the on-demand fallback of every later replan fits, for any trace; one byte
    less is refused at entry. See ``nzrt.policies.smallest_budget_for``."""
    return policies.smallest_budget_for(policy, layers, costs, fixed_bytes)


def _label(policy) -> str:
    name = getattr(policy, "name", None) or str(policy)
    return f"'{name}'"


def _alternatives(policy, layers, costs) -> list:
    """(label, policy) of the named policies that may fit a smaller budget than ``policy``."""
    alts = [("auto", Auto()), ("offload", Offload())]
    if any(i.on_disk for i in layers.values()):
        alts.append(("offload-disk", Offload(tier=Tier.DISK)))
    return [(n, p) for n, p in alts if p != policy]


def budget_error(policy, layers, budget, fixed_bytes, costs, need: int | None = None) -> BudgetError:
    """The BudgetError for ``budget`` below ``policy``'s smallest budget: it names the policy,
    gives the smallest budget rounded up (passing the printed text back works) and in bytes,
    what it is made of, and a policy or tier that fits a smaller budget, if any."""
    if need is None:
        need = smallest_budget_for(policy, layers, costs, fixed_bytes)
    unit_need = need - fixed_bytes
    entry = policies.entry_need(policy, layers, costs)
    try:
        plan = policy.plan((), layers, max(unit_need, entry), costs)
        static, working = plan.static_bytes, plan.peak_bytes - plan.static_bytes
        counted = (Tier.DEVICE, Tier.DENSE) + ((Tier.HOST,) if costs.host_is_device else ())
        where = sorted({t for _, t in plan.tiers if t in counted})
    except BudgetError:  # pragma: no cover - entry_need says it fits
        static, working, where = 0, unit_need, []
    parts = [f"{format_bytes(static, up=True)} of compressed weights the budget counts"
             + (f" (tiers {', '.join(where)})" if where else ""),
             f"{format_bytes(working, up=True)} for the dense layers decoded at once",
             f"{format_bytes(fixed_bytes, up=True)} of uncompressed parameters and buffers"]
    why = ""
    if entry < unit_need:
        why = "; that much also lets it fall back to decoding one layer at a time, whatever the execution order"
    hint = ""
    best = None
    for label, alt in _alternatives(policy, layers, costs):
        try:
            n = smallest_budget_for(alt, layers, costs, fixed_bytes)
        except BudgetError:  # pragma: no cover
            continue
        if n < need and (best is None or n < best[1]):
            best = (label, n)
    if best is not None:
        label, n = best
        alt = dict(_alternatives(policy, layers, costs))[label]
        tiers = set(alt.plan((), layers, n - fixed_bytes, costs).tier_of.values())
        tier = (" with the disk tier (compressed weights read from the memory-mapped file)" if Tier.DISK in tiers
                else " with the host tier (compressed weights in host memory)" if Tier.HOST in tiers
                and not costs.host_is_device else "")
        hint = f"; policy '{label}'{tier} needs only {format_bytes(n, up=True)} ({n} bytes)"
    shown = "none" if budget is None else f"{format_bytes(budget)} ({budget} bytes)"
    return BudgetError(
        f"budget {shown} is too small for this model under policy {_label(policy)}: the smallest "
        f"budget for it is {format_bytes(need, up=True)} ({need} bytes) = {' + '.join(parts)}{why}{hint}",
        need)


def check_budget(policy, layers, budget, fixed_bytes, costs) -> int | None:
    """The entry check, on layer sizes alone (no weight needs to have been read): raises
    ``budget_error`` if ``budget`` is below ``policy``'s smallest budget; returns that smallest
    budget (None without a budget)."""
    if budget is None:
        return None
    need = smallest_budget_for(policy, layers, costs, fixed_bytes)
    if budget < need:
        raise budget_error(policy, layers, budget, fixed_bytes, costs, need)
    return need


def initial_plan(policy, layers, budget, fixed_bytes, costs):
    """The entry plan. The budget is checked here, once: the policy's own plan and the on-demand
    fallback must both fit, so that ``replan`` never has to refuse a forward."""
    check_budget(policy, layers, budget, fixed_bytes, costs)
    unit_budget = None if budget is None else budget - fixed_bytes
    return policy.plan((), layers, unit_budget, costs)


def replan(policy, trace, layers, budget, fixed_bytes, costs, device=None, note=None):
    """The plan for a traced order. A plan that does not fit falls back to decoding on demand
    (``nzrt.policies.fallback_plan``), which ``initial_plan`` checked fits: this never raises
    BudgetError. ``device`` is unused (the costs say whether the host is the device)."""
    unit_budget = None if budget is None else budget - fixed_bytes
    name = getattr(policy, "name", policy)
    try:
        plan = policy.plan(trace, layers, unit_budget, costs)
        if unit_budget is None or plan.peak_bytes <= unit_budget:
            return plan
        why = f"its plan needs {format_bytes(plan.peak_bytes + fixed_bytes, up=True)}"
    except BudgetError as e:
        why = f"it needs {format_bytes(e.needed + fixed_bytes, up=True)} with this order"
    try:
        plan = policies.fallback_plan(trace, layers, unit_budget, costs)
        msg = (f"nzrt: policy '{name}' does not fit the budget of {format_bytes(budget)} with the traced "
               f"execution order ({why}); decoding one layer at a time ({plan.policy}) instead")
    except BudgetError:  # only if the entry check was skipped: run over budget rather than fail a forward
        plan = min((p.plan(trace, layers, None, costs) for p in policies.on_demand_fallbacks(layers, costs)),
                   key=lambda p: p.peak_bytes)
        msg = (f"nzrt: policy '{name}' does not fit the budget of {format_bytes(budget)} and neither does "
               f"decoding on demand; running {plan.policy} over the budget")
    warnings.warn(msg, stacklevel=3)
    if note is not None:
        note(msg)
    return plan


def place(plan, units: dict, tensors: dict, tier_now: dict, device) -> None:
    """Move every compressed tensor to its tier: the tier of the unit whose LayerInfo carries its
    compressed bytes (the first unit using it, as in ``layer_infos``), so that a tied tensor lives
    where the plan counts it (a unit sharing it reads it from there)."""
    tiers = plan.tier_of
    key_tier: dict = {}
    for unit, keys in units.items():
        t = tiers.get(unit, Tier.DEVICE)
        for k in keys:
            key_tier.setdefault(k, t)
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


class Planner:
    """The scheduler's ``planner`` and ``place`` callbacks for one block: the policy, the layer
    sizes, the budget and the uncompressed bytes bound in, and where each tensor is now.
    ``tier_now`` (key -> tier) and what the decoder reads from files are kept up to date by ``place``;
    replanning notes go to ``warnings``."""

    def __init__(self, policy, layers: dict, budget, fixed_bytes: int, device, units: dict, shared, warnings: list):
        self.policy = policy
        self.layers = layers
        self.budget = budget
        self.fixed_bytes = fixed_bytes
        self.device = device
        self.units = units
        self.shared = shared
        self.warnings = warnings
        self.costs = costs_for(device, {})

    def initial(self):
        """The entry plan (the budget checked here, once; see ``initial_plan``)."""
        return initial_plan(self.policy, self.layers, self.budget, self.fixed_bytes, self.costs)

    def _measured_decode_bps(self) -> float | None:
        s = self.shared.scheduler
        secs = sum(st.decode_s for st in s.stats.values())
        nbytes = sum(st.decodes * self.layers[u].dense_bytes for u, st in s.stats.items())
        return nbytes / secs if secs > 0 and nbytes > 0 else None

    def replan(self, trace, seconds):
        """The scheduler's ``planner(trace, seconds)``: a plan for the traced order, measured costs."""
        self.costs = costs_for(self.device, seconds, self._measured_decode_bps())
        osmem.release_idle_code()  # the recorded pass loaded the decoders' code: LLVM is idle again
        return replan(self.policy, trace, self.layers, self.budget, self.fixed_bytes, self.costs,
                      self.device, self.warnings.append)

    def place(self, plan) -> None:
        """The scheduler's ``place(plan)``: every compressed tensor to its tier."""
        tensors, tier_now = self.shared.tensors, self.shared.tier_now
        place(plan, self.units, tensors, tier_now, self.device)
        # blobs read straight from a memory-mapped file (disk tier)
        from_file = {k: s.ct for k, s in tensors.items()
                     if tier_now.get(k) == Tier.DISK and s.on_disk and s.ct.device.type == "cpu"}
        # a lookup-only embedding's row chunks in a file are read from it each time, whatever the
        # tier: ids fall all over the table, so their pages would soon hold all of it, where plain
        # PyTorch keeps only the rows it read
        from_file.update({k: tensors[k].ct for mp in self.shared.params if mp.chunked for k in mp.keys
                          if tensors[k].on_disk and tensors[k].ct.device.type == "cpu"})
        self.shared.decoder.read_from_file_each_time(from_file.values())
