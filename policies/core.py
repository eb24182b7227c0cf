"""The policies: frozen dataclasses whose ``plan(trace, layers, budget, costs)`` is a pure function.

* ``Resident(lookahead=1)``: every unit compressed on the device (NeuZip's default); each unit is
  decoded ``lookahead`` steps before it runs and dropped right after.
* ``Offload(lookahead=2)``: compressed in host memory (pinned), copied and decoded ahead.
* ``Belady(lookahead=1, cache_bytes=None)``: resident, plus a dense cache that fills the rest of
  the budget; the trace repeats, so the future is known and the cache evicts the unit whose next
  use is furthest away (MIN). MIN is optimal only for equal sizes, so the plan also evaluates LRU
  on the same cache, and a fixed cache of the units with the most runs per byte (MIN's steady
  state can have a long period on long traces), and keeps whichever decodes least: it never
  decodes more than LRU.
* ``Lru(lookahead=1, cache_bytes=None)``: the same cache with least-recently-used eviction (a baseline).
* ``Auto(max_lookahead=3)``: a cost model (measured decode and transfer bandwidths, layer times)
  over tier placements, lookaheads and caches; the fastest plan that fits the budget. Without a
  budget it stays within the memory of ``Resident()``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping, Sequence

from .plan import (BudgetError, Costs, LayerInfo, Plan, Step, Tier, estimate_seconds, static_bytes,
                   validate_inputs)

_MAX_CYCLES = 16


def _window(trace, g, k, pinned):
    n = len(trace)
    return {trace[(g + j) % n] for j in range(k + 1)} - pinned


def _static_set(trace, layers, pinned, extra) -> frozenset:
    """Units a fixed cache of ``extra`` bytes should keep: most runs per byte first."""
    uses: dict = {}
    for u in trace:
        if u not in pinned:
            uses[u] = uses.get(u, 0) + 1
    keep, room = [], extra
    for u in sorted(uses, key=lambda u: (-uses[u] / max(layers[u].dense_bytes, 1), u)):
        if layers[u].dense_bytes <= room:
            keep.append(u)
            room -= layers[u].dense_bytes
    return frozenset(keep)


def _timeline(trace: tuple, layers: Mapping[str, LayerInfo], pinned: set, k: int, extra: int,
              rule: str) -> tuple[tuple[Step, ...], frozenset, int]:
    """Cache simulation from a cold start until the state at a trace boundary repeats; the
    repeating stretch is the cyclic timeline. ``k``: lookahead; ``extra``: bytes of dense copies
    that may stay beyond the lookahead window; ``rule``: "min" or "lru" eviction.
    Returns (steps, initial_dense, max dense bytes)."""
    n = len(trace)
    if n == 0:
        return (), frozenset(), 0
    size = {u: layers[u].dense_bytes for u in set(trace)}
    positions: dict = {}
    for i, u in enumerate(trace):
        positions.setdefault(u, []).append(i)

    def next_use(u, g):
        """Steps from g to the next run of u (strictly after g)."""
        i = g % n
        best = None
        for p in positions[u]:
            d = p - i if p > i else p - i + n
            if best is None or d < best:
                best = d
        return best

    static = _static_set(trace, layers, pinned, extra) if rule == "static" else frozenset()
    dense: set = set()
    last_run: dict = {}
    prefetch_log, release_log, max_bytes = [], [], 0
    keys = {}
    g = 0
    for cycle in range(_MAX_CYCLES + 1):
        for i in range(n):
            w = _window(trace, g, k, pinned)
            # phase A: evictions (they belong to the previous step's release list)
            cached = [u for u in dense if u not in w]
            cbytes = sum(size[u] for u in cached)
            evicted = []
            if rule == "static":  # keep the fixed set, drop everything else
                for u in sorted(cached):
                    if u not in static:
                        dense.discard(u)
                        evicted.append(u)
            elif cbytes > extra:
                if rule == "min":
                    cached.sort(key=lambda u: (-next_use(u, g), u))
                else:
                    cached.sort(key=lambda u: (last_run.get(u, -1), u))
                for u in cached:
                    if cbytes <= extra:
                        break
                    dense.discard(u)
                    cbytes -= size[u]
                    evicted.append(u)
            release_log.append(tuple(sorted(evicted)))
            if i == 0:
                if rule in ("min", "static"):
                    key = frozenset(dense)
                else:
                    key = tuple(sorted(dense, key=lambda u: (last_run.get(u, -1), u)))
                if key in keys:
                    c0 = keys[key]
                    start, stop = c0 * n, cycle * n
                    steps = tuple(Step(trace[j % n], prefetch_log[j], release_log[j + 1])
                                  for j in range(start, stop))
                    init = frozenset(key)
                    return steps, init, max_bytes
                keys[key] = cycle
                if cycle == _MAX_CYCLES:
                    break
            # phase B: prefetch what the window needs
            p = tuple(sorted(w - dense))
            dense |= w
            prefetch_log.append(p)
            max_bytes = max(max_bytes, sum(size[u] for u in dense))
            last_run[trace[i]] = g
            g += 1
    raise RuntimeError("cache simulation did not reach a steady state")  # pragma: no cover


def _untraced_default(layers, trace, tier):
    seen = set(trace)
    return {u: tier for u in layers if u not in seen}


def _build(name: str, trace, layers, tiers: dict, costs: Costs, k: int, extra: int, rule: str) -> Plan:
    pinned = {u for u, t in tiers.items() if t == Tier.DENSE}
    steps, init, dense_peak = _timeline(trace, layers, pinned, k, extra, rule)
    static = static_bytes(tiers, layers, costs)
    plan = Plan(policy=name, trace=trace, steps=steps, tiers=tuple(sorted(tiers.items())),
                initial_dense=init, static_bytes=static,
                peak_bytes=static + max(dense_peak, max((layers[u].dense_bytes for u in layers
                                                         if tiers[u] != Tier.DENSE), default=0)))
    # The peak includes one on-demand unit: before a trace exists (or after it changed) the
    # scheduler decodes one unit at a time, and that must fit too.
    decodes = sum(len(s.prefetch) for s in steps) / plan.period
    est = estimate_seconds(plan, layers, costs) if steps else 0.0
    return Plan(**{**plan.__dict__, "decodes_per_cycle": decodes, "est_seconds": est})


def _check(plan: Plan, budget, needed=None) -> Plan:
    if budget is not None and plan.peak_bytes > budget:
        need = plan.peak_bytes if needed is None else needed
        raise BudgetError(f"policy {plan.policy} needs {need} bytes, the budget is {budget}", need)
    return plan


def _costs(costs):
    return costs if costs is not None else Costs()


@dataclass(frozen=True)
class Resident:
    """All units compressed on the device; decode ``lookahead`` steps ahead, drop after use."""

    lookahead: int = 1

    @property
    def name(self) -> str:
        return f"resident(lookahead={self.lookahead})"

    def plan(self, trace: Sequence[str], layers: Mapping[str, LayerInfo], budget: int | None = None,
             costs: Costs | None = None) -> Plan:
        trace = validate_inputs(trace, layers)
        costs = _costs(costs)
        tiers = {u: Tier.DEVICE for u in layers}
        return _check(_build(self.name, trace, layers, tiers, costs, self.lookahead, 0, "min"), budget)


@dataclass(frozen=True)
class Offload:
    """All units compressed in host memory (``tier="host"``) or read from their file
    (``tier="disk"``, where they have one); copied, decoded ``lookahead`` steps ahead."""

    lookahead: int = 2
    tier: str = Tier.HOST

    @property
    def name(self) -> str:
        return f"offload(lookahead={self.lookahead}, tier={self.tier})"

    def plan(self, trace, layers, budget=None, costs=None) -> Plan:
        trace = validate_inputs(trace, layers)
        costs = _costs(costs)
        if self.tier not in (Tier.HOST, Tier.DISK):
            raise ValueError(f"Offload tier must be 'host' or 'disk', got {self.tier!r}")
        tiers = {u: (Tier.DISK if self.tier == Tier.DISK and info.on_disk else Tier.HOST)
                 for u, info in layers.items()}
        return _check(_build(self.name, trace, layers, tiers, costs, self.lookahead, 0, "min"), budget)


def _cache_plan(name, rules, lookahead, cache_bytes, trace, layers, budget, costs) -> Plan:
    trace = validate_inputs(trace, layers)
    costs = _costs(costs)
    tiers = {u: Tier.DEVICE for u in layers}
    base = _check(_build(name, trace, layers, tiers, costs, lookahead, 0, rules[0]), budget)
    if cache_bytes is not None:
        extra = int(cache_bytes)
    elif budget is None:
        extra = 0
    else:
        extra = max(budget - base.peak_bytes, 0)
    best = None
    for rule in rules:
        try:
            p = _build(name, trace, layers, tiers, costs, lookahead, extra, rule)
        except RuntimeError:  # MIN can cycle with a long period on long traces: skip it
            continue
        key = (p.decodes_per_cycle, p.peak_bytes)
        if best is None or key < best[0]:
            best = (key, p)
    return _check(best[1], budget, needed=base.peak_bytes)


@dataclass(frozen=True)
class Belady:
    """Resident plus a dense cache in the rest of the budget, evicting by the known future (MIN)."""

    lookahead: int = 1
    cache_bytes: int | None = None

    @property
    def name(self) -> str:
        return f"belady(lookahead={self.lookahead})"

    def plan(self, trace, layers, budget=None, costs=None) -> Plan:
        return _cache_plan(self.name, ("min", "static", "lru"), self.lookahead, self.cache_bytes, trace, layers,
                           budget, costs)


@dataclass(frozen=True)
class Lru:
    """Resident plus a dense cache in the rest of the budget, evicting the least recently used."""

    lookahead: int = 1
    cache_bytes: int | None = None

    @property
    def name(self) -> str:
        return f"lru(lookahead={self.lookahead})"

    def plan(self, trace, layers, budget=None, costs=None) -> Plan:
        return _cache_plan(self.name, ("lru",), self.lookahead, self.cache_bytes, trace, layers,
                           budget, costs)


def _why(ranked: list, budget: int) -> str:
    """One line for the report: why ``ranked[0]`` (the plans that fit, fastest first)."""
    best = ranked[0]
    text = (f"the fastest by the cost model of {len(ranked)} plans that fit {_mib(budget)} "
            f"(lookahead 0-3, tiers, a dense cache promoted by time saved per byte)")
    for c in ranked[1:2]:
        text += f"; next: {c.policy}, est {c.est_seconds * 1e3:.1f} ms/pass, peak {_mib(c.peak_bytes)}"
    plain = [c for c in ranked if "+dense" not in c.policy and "belady" not in c.policy]
    if ("+dense" in best.policy or "belady" in best.policy) and plain:
        text += (f"; the fastest without a dense cache: {plain[0].policy}, est "
                 f"{plain[0].est_seconds * 1e3:.1f} ms/pass, peak {_mib(plain[0].peak_bytes)}")
    return text


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


@dataclass(frozen=True)
class Auto:
    """The fastest plan under the budget by the cost model (see ``plan.estimate_seconds``), over:
    lookahead 0..``max_lookahead``; compressed tier device, host or disk (host where the host is
    not the device; disk for units with a file behind them: on a GPU when the file reads faster
    than the host copies, on the CPU always, as the budget does not count a memory-mapped file),
    and a mix of those; units promoted to the dense tier with the budget left (greedy by time
    saved per byte); and a Belady cache. Without a budget: the memory of ``Resident()``."""

    max_lookahead: int = 3

    @property
    def name(self) -> str:
        return "auto"

    def plan(self, trace, layers, budget=None, costs=None) -> Plan:
        trace = validate_inputs(trace, layers)
        costs = _costs(costs)
        if budget is None:
            # no budget: the memory of Resident() -- its tier, no dense cache, no promotion. (A
            # "free" budget would be spent on dense copies: on the CPU the disk tier frees the
            # compressed bytes from the count, and a cache would fill them with dense weights.)
            return min((_build(f"auto:resident(lookahead={k})", trace, layers, {u: Tier.DEVICE for u in layers},
                               costs, k, 0, "min") for k in range(min(self.max_lookahead, 1) + 1)),
                       key=lambda c: (c.est_seconds, c.peak_bytes, c.policy))
        uses: dict = {}
        for u in trace:
            uses[u] = uses.get(u, 0) + 1
        base_tiers = [{u: Tier.DEVICE for u in layers}]
        if costs.host_is_device and any(i.on_disk for i in layers.values()):
            # the CPU is the device: host memory counts, a memory-mapped file does not. The disk
            # tier (units read from their file, the rest in memory) fits budgets below the
            # compressed size; mixed: the units that cost most to fetch stay in memory
            disk = {u: (Tier.DISK if i.on_disk else Tier.DEVICE) for u, i in layers.items()}
            base_tiers += [disk, self._mixed(disk, layers, uses, budget, costs)]
        elif not costs.host_is_device:
            base_tiers.append({u: (Tier.DISK if i.on_disk and costs.disk_bps > costs.h2d_bps else Tier.HOST)
                               for u, i in layers.items()})
            # mixed: the units that cost most to fetch stay on the device while room lasts
            base_tiers.append(self._mixed(base_tiers[-1], layers, uses, budget, costs))
        cands, needed = [], []
        for tiers0 in base_tiers:
            for k in range(self.max_lookahead + 1):
                try:
                    p = _build(f"auto:resident(lookahead={k})", trace, layers, dict(tiers0), costs, k, 0, "min")
                except RuntimeError:
                    continue
                needed.append(p.peak_bytes)
                if p.peak_bytes > budget:
                    continue
                cands.append(p)
                promoted = self._promote(trace, layers, dict(tiers0), costs, k, budget, uses, p)
                if promoted is not None:
                    cands.append(promoted)
                if k == 1 and budget > p.peak_bytes:
                    for rule in ("min", "static"):
                        try:
                            cands.append(_build(f"auto:belady(lookahead={k})", trace, layers, dict(tiers0),
                                                costs, k, budget - p.peak_bytes, rule))
                        except RuntimeError:
                            pass
        cands = [c for c in cands if c.peak_bytes <= budget]
        if not cands:
            need = min(needed) if needed else 0
            raise BudgetError(f"no plan fits the budget of {budget} bytes; the smallest needs {need}", need)
        ranked = sorted(cands, key=lambda c: (c.est_seconds, c.peak_bytes, c.policy))
        return replace(ranked[0], why=_why(ranked, budget))

    def _mixed(self, tiers, layers, uses, budget, costs) -> dict:
        """``tiers`` with the units that cost most to fetch moved to the device while room lasts
        (room for ``max_lookahead + 1`` of the largest dense units is kept)."""
        mixed = dict(tiers)
        room = budget - static_bytes(tiers, layers, costs) \
            - max((i.dense_bytes for i in layers.values()), default=0) * (self.max_lookahead + 1)
        order = sorted(layers, key=lambda u: -uses.get(u, 0) * layers[u].compressed_bytes)
        for u in order:
            if uses.get(u) and mixed[u] != Tier.DEVICE and layers[u].compressed_bytes <= room:
                mixed[u] = Tier.DEVICE
                room -= layers[u].compressed_bytes
        return mixed

    def _promote(self, trace, layers, tiers, costs, k, budget, uses, base) -> Plan | None:
        """Promote units to the dense tier while the budget allows (greedy by seconds saved per byte)."""
        room = budget - base.peak_bytes
        if room <= 0 or not trace:
            return None

        def added(u):
            info = layers[u]
            if costs.host_is_device or tiers[u] != Tier.DEVICE:
                return info.dense_bytes
            return info.dense_bytes - info.compressed_bytes  # the compressed copy moves to the host

        order = sorted((u for u in uses), key=lambda u: -uses[u] * costs.fetch_s(layers[u], tiers[u])
                       / max(added(u), 1))
        chosen = []
        for u in order:
            if added(u) <= room:
                chosen.append(u)
                room -= added(u)
        while chosen:
            t = dict(tiers)
            for u in chosen:
                t[u] = Tier.DENSE
            p = _build(f"auto:resident(lookahead={k})+dense({len(chosen)})", trace, layers, t, costs, k, 0, "min")
            if p.peak_bytes <= budget:
                return p
            chosen.pop()
        return None


@dataclass(frozen=True)
class Fused:
    """``base`` for placement and prefetch, plus fused generation: a ``Linear`` whose input has at
    most ``max_rows`` rows (a generated token, a small batch) multiplies straight from its
    compressed weight, and an ``Embedding`` reads only the rows it looks up; such a pass never
    writes a weight densely and the scheduler decodes nothing for it. Inputs with more rows (a
    prompt) take ``base``'s decode-then-matmul path. The fused sum runs in a fixed order of its
    own (``nzrt.kernels.fused_reference``), not torch's GEMM order: outputs are exact for the
    weights but no longer bit-identical to plain PyTorch (greedy text usually matches; logits
    differ in the last bits). CPU only for now (on a GPU the base path runs).

    ``widths`` asks for the exponent code ``managed()`` compresses the weights with: ``"auto"``
    (the default), ``None`` (the smallest code, as every other policy) or level widths such as
    ``(4,)``. This package only records the request; what it means on a machine (``"auto"``: the
    4-bit window code where the fused kernel's fast path runs) is the runtime's codec choice
    (``nzrt.runtime.decoder.choose_widths``). Weights that arrive compressed (a ``.nzrt`` file)
    keep their code (``nzrt compress --fused`` writes the window code); every code gives the same
    bits."""

    base: object = None  # a policy value or name; None: Auto()
    max_rows: int = 16
    widths: object = "auto"  # "auto", None, or level widths such as (4,)

    def __post_init__(self):
        base = Auto() if self.base is None else get_policy(self.base)
        if isinstance(base, Fused):
            raise ValueError("Fused(base=...) takes a placement policy, not another Fused")
        object.__setattr__(self, "base", base)
        if not isinstance(self.max_rows, int) or isinstance(self.max_rows, bool) or not 1 <= self.max_rows <= 64:
            raise ValueError(f"Fused.max_rows must be an int in 1..64, got {self.max_rows!r}")
        if self.widths is not None and self.widths != "auto":
            w = self.widths
            if (not isinstance(w, (tuple, list)) or not 1 <= len(w) <= 4
                    or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 5 for v in w)):
                raise ValueError(f"Fused.widths must be 'auto', None or 1..4 level widths of 1..5 bits, "
                                 f"e.g. (4,); got {w!r}")
            object.__setattr__(self, "widths", tuple(w))

    @property
    def name(self) -> str:
        return f"fused:{getattr(self.base, 'name', type(self.base).__name__.lower())}"

    def plan(self, trace, layers, budget=None, costs=None) -> Plan:
        return self.base.plan(trace, layers, budget, costs)


POLICIES = {"resident": Resident, "offload": Offload, "belady": Belady, "lru": Lru, "auto": Auto}
# names for policies that are not a class's defaults (CLI ``--policy offload-disk`` too)
ALIASES = {"offload-disk": lambda: Offload(tier=Tier.DISK)}


def get_policy(policy) -> object:
    """A policy value from a name ("resident", "offload", "offload-disk" (``Offload(tier="disk")``),
    "belady", "lru", "auto"; "fused" (``Fused()``) or "fused:NAME" (``Fused(NAME)``)) or an object
    with a ``plan`` method (returned as is)."""
    if isinstance(policy, str):
        key = policy.strip().lower()
        if key == "fused" or key.startswith("fused:"):
            rest = key[len("fused:"):] if ":" in key else ""
            if rest.startswith("fused"):
                raise ValueError(f"unknown policy {policy!r}: fused: takes a placement policy's name")
            return Fused(get_policy(rest) if rest else None)
        if key in ALIASES:
            return ALIASES[key]()
        try:
            return POLICIES[key]()
        except KeyError:
            raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join([*POLICIES, *ALIASES])} "
                             f"or pass a policy object") from None
    if not callable(getattr(policy, "plan", None)):
        raise TypeError(f"a policy is a name or an object with a plan() method, got {policy!r}")
    return policy


# --- the smallest budget ------------------------------------------------------------------------
# A plan is checked once, when the model is entered (no trace yet). Later plans, made from the
# traced order, may not fit (a lookahead window or a cache needs more than one unit at a time);
# then the runtime decodes on demand: one unit at a time, in a tier whose bytes do not depend on
# the trace. So the smallest budget of a policy is the larger of what its own entry plan needs and
# what the cheapest on-demand fallback needs, and nothing a forward does can exceed it.

def on_demand_fallbacks(layers: Mapping[str, LayerInfo], costs: Costs | None = None) -> list:
    """The on-demand plans (lookahead 0, no cache) the runtime falls back to, preferred first:
    compressed on the device (``Resident(0)``) on the CPU, in host memory (``Offload(0)``) on a
    GPU; then, where units have a file behind them, read from it (``Offload(0, tier="disk")``).
    Their peak is static bytes + the largest dense unit, whatever the trace."""
    costs = _costs(costs)
    out = [Resident(0) if costs.host_is_device else Offload(0)]
    if any(i.on_disk for i in layers.values()):
        out.append(Offload(0, tier=Tier.DISK))
    return out


def fallback_plan(trace, layers: Mapping[str, LayerInfo], budget: int | None, costs: Costs | None = None) -> Plan:
    """The first on-demand fallback (see ``on_demand_fallbacks``) whose plan for ``trace`` fits
    ``budget``; BudgetError (``needed``: the smallest of them) if none does."""
    costs = _costs(costs)
    plans = [pol.plan(trace, layers, None, costs) for pol in on_demand_fallbacks(layers, costs)]
    for p in plans:
        if budget is None or p.peak_bytes <= budget:
            return p
    need = min(p.peak_bytes for p in plans)
    raise BudgetError(f"decoding on demand needs {need} bytes, the budget is {budget}", need)


def fallback_need(layers: Mapping[str, LayerInfo], costs: Costs | None = None) -> int:
    """Bytes the cheapest on-demand fallback needs (the same for every trace)."""
    costs = _costs(costs)
    return min(pol.plan((), layers, None, costs).peak_bytes for pol in on_demand_fallbacks(layers, costs))


def _fits(policy, layers, budget, costs) -> bool:
    try:
        return policy.plan((), layers, budget, costs).peak_bytes <= budget
    except BudgetError:
        return False


def entry_need(policy, layers: Mapping[str, LayerInfo], costs: Costs | None = None) -> int:
    """The smallest budget for which ``policy.plan((), layers, budget, costs)`` (the entry plan,
    no trace yet) succeeds. Taken from the policy's BudgetError and verified (one byte less must
    fail); a policy object whose ``needed`` is not exact is searched by bisection (plans are
    assumed to fit every budget above one that fits)."""
    costs = _costs(costs)
    try:
        policy.plan((), layers, 0, costs)
        return 0
    except BudgetError as e:
        need = max(int(e.needed), 1)
    if _fits(policy, layers, need, costs) and not _fits(policy, layers, need - 1, costs):
        return need
    lo, hi = 0, need  # lo fails; find a hi that fits
    while not _fits(policy, layers, hi, costs):
        lo, hi = hi, hi * 2 + 1
        if hi > 2 ** 63:
            raise BudgetError(f"policy {getattr(policy, 'name', policy)} fits no budget", hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _fits(policy, layers, mid, costs) else (mid, hi)
    return hi


def smallest_budget_for(policy, layers: Mapping[str, LayerInfo], costs: Costs | None = None,
                        fixed_bytes: int = 0) -> int:
    """The smallest budget (bytes) under which ``policy`` works for these layers: its entry plan
    fits, and so does the on-demand fallback that every later plan (any trace) can fall back to.
    ``fixed_bytes``: bytes the budget pays for besides the units (uncompressed parameters and
    buffers). Exact: this budget works, one byte less is refused."""
    costs = _costs(costs)
    return max(entry_need(policy, layers, costs), fallback_need(layers, costs)) + int(fixed_bytes)
