"""Plans: the timeline a policy hands to the scheduler, the facts a policy plans from, and a
pure simulator that checks a plan's invariants. No torch, no CUDA: plain Python values.

Vocabulary
  * a *unit* is a group of tensors made dense together (the weights of one module, or one row
    chunk of a large embedding / output head); the runtime calls them layers in reports;
  * the *trace* is the order in which units run during one forward pass of the model; it repeats
    (``generate()`` calls the forward once per token), so plans are cyclic;
  * a *tier* is where a unit's compressed bytes live between uses (see ``Tier``).

A plan says, for every step of its (cyclic) timeline, which unit runs, which units the scheduler
starts decoding before it runs (prefetch), and which dense copies it drops after it has run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence


class Tier:
    """Where a unit's weights live between uses."""

    DENSE = "dense"    # dense on the execution device, decoded once and kept (a cache)
    DEVICE = "device"  # compressed on the execution device
    HOST = "host"      # compressed in (pinned) host memory, copied over before decoding
    DISK = "disk"      # compressed in a memory-mapped .nzrt file
    ALL = (DENSE, DEVICE, HOST, DISK)


class PlanError(AssertionError):
    """A plan that breaks an invariant (raised by ``simulate``)."""


class BudgetError(ValueError):
    """No plan of this policy fits the budget. ``needed`` is the smallest budget (bytes) that works."""

    def __init__(self, message: str, needed: int):
        super().__init__(message)
        self.needed = int(needed)


@dataclass(frozen=True)
class LayerInfo:
    """Sizes of one unit. ``dense_bytes``: its dense weights; ``compressed_bytes``: its compressed
    blobs; ``on_disk``: its compressed bytes can be read from a memory-mapped file."""

    name: str
    dense_bytes: int
    compressed_bytes: int
    on_disk: bool = False


@dataclass(frozen=True)
class Costs:
    """Measured (or guessed) speeds. Bandwidths in bytes/second; ``decode_bps`` counts dense bytes
    written. ``layer_seconds``: compute time of each unit (missing units: ``default_layer_s``).
    ``overlap``: how much decoding can run beside compute (1: separate engines, as on a GPU;
    about 0.5 on a CPU whose cores are shared). ``host_is_device``: the execution device is the
    host (CPU), so host-tier bytes count against the budget too."""

    decode_bps: float = 2e9
    h2d_bps: float = 12e9
    disk_bps: float = 1e9
    layer_seconds: Mapping[str, float] = field(default_factory=dict)
    default_layer_s: float = 1e-4
    overlap: float = 1.0
    host_is_device: bool = False

    def layer_s(self, unit: str) -> float:
        return float(self.layer_seconds.get(unit, self.default_layer_s))

    def fetch_s(self, info: LayerInfo, tier: str) -> float:
        """Seconds to make one unit dense from its tier (transfer + decode)."""
        if tier == Tier.DENSE:
            return 0.0
        t = info.dense_bytes / self.decode_bps
        if tier == Tier.HOST and not self.host_is_device:
            t += info.compressed_bytes / self.h2d_bps
        elif tier == Tier.DISK:
            t += info.compressed_bytes / self.disk_bps
        return t


@dataclass(frozen=True)
class Step:
    """One step of a plan: ``prefetch`` starts before ``unit`` runs, ``release`` after it ran."""

    unit: str
    prefetch: tuple[str, ...] = ()
    release: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """A cyclic timeline. ``steps`` covers a whole number of trace repetitions (usually one);
    ``initial_dense`` is what is dense (beyond the ``dense`` tier) when the timeline starts, and
    what is dense again when it ends. ``tiers`` maps every unit to its tier."""

    policy: str
    trace: tuple[str, ...]
    steps: tuple[Step, ...]
    tiers: tuple[tuple[str, str], ...]
    initial_dense: frozenset = frozenset()
    static_bytes: int = 0          # compressed bytes (and dense-tier bytes) the budget pays for always
    peak_bytes: int = 0            # static_bytes + the largest dense working set
    decodes_per_cycle: float = 0.0
    est_seconds: float = 0.0       # the cost model's time for one trace repetition
    why: str = ""                  # how the policy chose it among others (``Auto`` under a budget)

    @property
    def tier_of(self) -> dict:
        return dict(self.tiers)

    @property
    def period(self) -> int:
        """Trace repetitions covered by ``steps``."""
        return max(len(self.steps) // max(len(self.trace), 1), 1)

    def summary(self) -> str:
        counts = {}
        for _, t in self.tiers:
            counts[t] = counts.get(t, 0) + 1
        tiers = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
        text = (f"{self.policy}: {len(self.trace)} steps, tiers {tiers}, peak {self.peak_bytes} B, "
                f"{self.decodes_per_cycle:g} decodes/pass, est {self.est_seconds * 1e3:.2f} ms/pass")
        return f"{text}\n    why: {self.why}" if self.why else text


# --- accounting -------------------------------------------------------------------------------

def static_bytes(tiers: Mapping[str, str], layers: Mapping[str, LayerInfo], costs: Costs) -> int:
    """Bytes the budget pays for regardless of the step: compressed blobs that live on the
    device (or on the host when the host is the device) and dense-tier copies."""
    total = 0
    for name, tier in tiers.items():
        info = layers[name]
        if tier == Tier.DENSE:
            total += info.dense_bytes
            if costs.host_is_device:
                total += info.compressed_bytes  # the compressed copy is kept to restore the model
        elif tier == Tier.DEVICE or (tier == Tier.HOST and costs.host_is_device):
            total += info.compressed_bytes
    return total


@dataclass(frozen=True)
class SimResult:
    peak_bytes: int
    decodes: int              # decodes over all simulated cycles
    decoded_bytes: int
    cycles: int               # repetitions of the plan's timeline simulated
    passes: int               # trace repetitions simulated (cycles x the plan's period)
    step_bytes: tuple[int, ...]

    @property
    def decodes_per_pass(self) -> float:
        return self.decodes / max(self.passes, 1)


def simulate(plan: Plan, layers: Mapping[str, LayerInfo], budget: int | None = None,
             costs: Costs | None = None, *, cycles: int = 3) -> SimResult:
    """Run the plan's timeline ``cycles`` times and check every invariant; raise ``PlanError`` on
    the first violation. Invariants:
      * every unit of the trace has a tier, and every step runs the trace's unit;
      * a unit is dense (a dense-tier unit, or prefetched and not released) when it runs;
      * prefetch only what is not dense; release only what is dense; dense-tier units never move;
      * the timeline is cyclic: what is dense at its end is ``initial_dense``;
      * static bytes plus the dense working set never exceed ``budget`` at any step.
    """
    costs = costs or Costs()
    tiers = plan.tier_of
    for u in plan.trace:
        if u not in tiers:
            raise PlanError(f"unit {u!r} has no tier")
    for u, t in tiers.items():
        if t not in Tier.ALL:
            raise PlanError(f"unit {u!r} has unknown tier {t!r}")
        if t == Tier.DISK and not layers[u].on_disk:
            raise PlanError(f"unit {u!r} is planned on disk but has no file behind it")
    n = len(plan.trace)
    if n and len(plan.steps) % n:
        raise PlanError("the timeline is not a whole number of trace repetitions")
    for i, s in enumerate(plan.steps):
        if s.unit != plan.trace[i % n]:
            raise PlanError(f"step {i} runs {s.unit!r}, the trace says {plan.trace[i % n]!r}")
    pinned = {u for u, t in tiers.items() if t == Tier.DENSE}
    static = static_bytes(tiers, layers, costs)
    if static != plan.static_bytes:
        raise PlanError(f"plan claims {plan.static_bytes} static bytes, the tiers cost {static}")
    if plan.initial_dense & pinned:
        raise PlanError("dense-tier units are listed in initial_dense")
    dense = set(plan.initial_dense)
    peak, decodes, dbytes, per_step = 0, 0, 0, []
    for c in range(cycles):
        for i, s in enumerate(plan.steps):
            for u in s.prefetch:
                if u in pinned:
                    raise PlanError(f"step {i}: prefetch of dense-tier unit {u!r}")
                if u in dense:
                    raise PlanError(f"step {i}: prefetch of {u!r}, which is already dense")
                dense.add(u)
                decodes += 1
                dbytes += layers[u].dense_bytes
            if s.unit not in dense and s.unit not in pinned:
                raise PlanError(f"step {i}: {s.unit!r} runs but is not dense")
            held = static + sum(layers[u].dense_bytes for u in dense)
            per_step.append(held)
            peak = max(peak, held)
            if budget is not None and held > budget:
                raise PlanError(f"step {i}: {held} bytes planned, budget {budget}")
            for u in s.release:
                if u not in dense:
                    raise PlanError(f"step {i}: release of {u!r}, which is not dense")
                dense.discard(u)
        if dense != set(plan.initial_dense):
            raise PlanError(f"cycle {c}: the timeline ends with {sorted(dense)} dense, "
                            f"it started with {sorted(plan.initial_dense)}")
    if not plan.steps:
        peak = static
    return SimResult(peak, decodes, dbytes, cycles, cycles * plan.period, tuple(per_step))


def estimate_seconds(plan: Plan, layers: Mapping[str, LayerInfo], costs: Costs, *, cycles: int = 3) -> float:
    """Cost model: one decode engine (FIFO, like the scheduler's worker) beside one compute engine.
    A unit's decode starts when it is prefetched and the engine is free; the unit runs when the
    previous unit finished and its decode is done. On a shared CPU (``overlap`` < 1) the part of
    the decode time that cannot overlap is added. Returns seconds per trace repetition (the last
    of ``cycles`` simulated ones, i.e. the steady state)."""
    tiers = plan.tier_of
    ready: dict = {}
    engine = 0.0
    clock = 0.0
    for u in plan.initial_dense:
        ready[u] = 0.0
    fetch_total = 0.0
    start_last = 0.0
    for c in range(cycles):
        start_last = clock
        fetch_total = 0.0
        for s in plan.steps:
            for u in s.prefetch:
                f = costs.fetch_s(layers[u], tiers[u])
                fetch_total += f
                engine = max(engine, clock) + f
                ready[u] = engine
            if tiers.get(s.unit) != Tier.DENSE:
                clock = max(clock, ready.get(s.unit, clock))
            clock += costs.layer_s(s.unit)
    per_cycle = (clock - start_last) / plan.period
    return per_cycle + (1.0 - costs.overlap) * fetch_total / plan.period


def validate_inputs(trace: Sequence[str], layers: Mapping[str, LayerInfo]) -> tuple[str, ...]:
    trace = tuple(trace)
    for u in trace:
        if u not in layers:
            raise KeyError(f"trace names unit {u!r}, which has no LayerInfo")
    return trace
