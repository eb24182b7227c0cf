"""Policies are pure functions: checked by invariants on randomized synthetic traces."""
import random
import sys

import pytest

from nzrt.policies import (Auto, Belady, BudgetError, Costs, LayerInfo, Lru, Offload, Plan, PlanError,
                           Resident, Step, Tier, get_policy, simulate)


def _synthetic(rng, n_units=None, repeats=True):
    n = n_units or rng.randint(1, 40)
    layers = {}
    for i in range(n):
        dense = rng.choice([256, 1024, 4096, 4096, 16384, 65536]) * rng.randint(1, 4)
        layers[f"u{i}"] = LayerInfo(f"u{i}", dense, int(dense * rng.uniform(0.6, 0.75)),
                                    on_disk=rng.random() < 0.3)
    trace = list(layers)
    if repeats and rng.random() < 0.5:  # shared modules: a unit runs more than once per pass
        for _ in range(rng.randint(1, 5)):
            trace.insert(rng.randrange(len(trace) + 1), rng.choice(list(layers)))
    if rng.random() < 0.2 and len(trace) > 2:  # a unit that never runs
        trace.remove(trace[-1]) if trace.count(trace[-1]) > 1 else None
    costs = Costs(decode_bps=rng.choice([1e8, 1e9, 1e10]), h2d_bps=rng.choice([1e9, 1e10]),
                  layer_seconds={u: rng.uniform(1e-5, 1e-3) for u in layers},
                  overlap=rng.choice([0.5, 1.0]), host_is_device=rng.random() < 0.5)
    return trace, layers, costs


POLICY_OBJECTS = [Resident(0), Resident(1), Resident(3), Offload(1), Offload(2, tier="disk"),
                  Belady(1), Belady(2), Lru(1), Auto()]


@pytest.mark.parametrize("seed", range(60))
def test_invariants_on_random_traces(seed):
    rng = random.Random(seed)
    trace, layers, costs = _synthetic(rng)
    for policy in POLICY_OBJECTS:
        free = policy.plan(trace, layers, None, costs)
        sim = simulate(free, layers, None, costs)
        assert sim.peak_bytes <= free.peak_bytes
        # a budget between the smallest and a roomy one
        budget = int(free.peak_bytes * rng.uniform(1.0, 1.6))
        plan = policy.plan(trace, layers, budget, costs)
        sim = simulate(plan, layers, budget, costs)  # raises PlanError on any violation
        assert max(sim.step_bytes, default=0) <= budget
        assert all(s.unit == trace[i % len(trace)] for i, s in enumerate(plan.steps))
        assert set(plan.tier_of) == set(layers)
        too_small = free.peak_bytes - 1
        if not isinstance(policy, Auto):
            with pytest.raises(BudgetError) as e:
                policy.plan(trace, layers, too_small, costs)
            assert e.value.needed == free.peak_bytes


@pytest.mark.parametrize("seed", range(60))
def test_belady_never_decodes_more_than_lru(seed):
    rng = random.Random(1000 + seed)
    trace, layers, costs = _synthetic(rng)
    base = Resident(1).plan(trace, layers, None, costs).peak_bytes
    for extra in (0.05, 0.2, 0.5, 1.0):
        budget = int(base + extra * sum(i.dense_bytes for i in layers.values()))
        b = Belady(1).plan(trace, layers, budget, costs)
        lru = Lru(1).plan(trace, layers, budget, costs)
        sb, sl = simulate(b, layers, budget, costs, cycles=4), simulate(lru, layers, budget, costs, cycles=4)
        assert sb.decodes_per_pass <= sl.decodes_per_pass
        assert b.decodes_per_cycle <= lru.decodes_per_cycle


def test_belady_beats_lru_on_a_loop():
    """A loop larger than the cache: LRU misses every time, MIN keeps part of the loop."""
    layers = {f"u{i}": LayerInfo(f"u{i}", 100, 70) for i in range(10)}
    trace = list(layers)
    budget = Resident(1).plan(trace, layers).peak_bytes + 400
    b = simulate(Belady(1).plan(trace, layers, budget), layers, budget, cycles=5)
    lru = simulate(Lru(1).plan(trace, layers, budget), layers, budget, cycles=5)
    # 10 units, 2 in the lookahead window, 4 more fit the cache: LRU decodes all 10 every pass
    assert lru.decodes_per_pass == 10 and b.decodes_per_pass == 5


def test_auto_picks_fast_plan_and_uses_budget():
    layers = {f"u{i}": LayerInfo(f"u{i}", 1000, 700) for i in range(8)}
    trace = list(layers)
    costs = Costs(decode_bps=1e6, layer_seconds={u: 1e-4 for u in layers}, host_is_device=True)
    small = Auto().plan(trace, layers, None, costs)
    assert small.peak_bytes <= Resident(1).plan(trace, layers, None, costs).peak_bytes
    roomy = Auto().plan(trace, layers, 10 ** 6, costs)
    assert roomy.est_seconds < small.est_seconds
    assert roomy.decodes_per_cycle == 0  # everything stays dense (dense tier or cache)
    simulate(roomy, layers, 10 ** 6, costs)
    with pytest.raises(BudgetError) as e:
        Auto().plan(trace, layers, 100, costs)
    assert e.value.needed == Resident(0).plan(trace, layers, None, costs).peak_bytes


def test_offload_uses_host_memory_on_gpu_costs():
    layers = {f"u{i}": LayerInfo(f"u{i}", 1000, 700) for i in range(5)}
    trace = list(layers)
    p = Offload(2).plan(trace, layers, None, Costs(host_is_device=False))
    assert set(p.tier_of.values()) == {Tier.HOST} and p.static_bytes == 0
    p2 = Offload(2).plan(trace, layers, None, Costs(host_is_device=True))
    assert p2.static_bytes == 3500


def test_simulate_catches_broken_plans():
    layers = {"a": LayerInfo("a", 10, 7), "b": LayerInfo("b", 10, 7)}
    good = Resident(1).plan(["a", "b"], layers)
    simulate(good, layers)
    tiers = good.tiers
    bad = [
        Plan("x", ("a", "b"), (Step("a"), Step("b")), tiers, static_bytes=14),  # never dense
        Plan("x", ("a", "b"), (Step("a", ("a",), ()), Step("b", ("b",), ("b",))), tiers,
             static_bytes=14),  # a never released: the cycle does not close
        Plan("x", ("a", "b"), (Step("a", ("a",), ("a",)), Step("a", ("b",), ("b",))), tiers,
             static_bytes=14),  # wrong unit
        Plan("x", ("a", "b"), (Step("a", ("a",), ("a", "b")), Step("b", ("b",), ("b",))), tiers,
             static_bytes=14),  # release of something not dense
    ]
    for p in bad:
        with pytest.raises(PlanError):
            simulate(p, layers)
    with pytest.raises(PlanError):
        simulate(good, layers, budget=good.peak_bytes - 1)


def test_names_and_purity():
    assert isinstance(get_policy("belady"), Belady)
    assert get_policy(Offload(3)) == Offload(3)
    with pytest.raises(ValueError):
        get_policy("fastest")
    with pytest.raises(Exception):
        Resident().lookahead = 2  # frozen
    import nzrt.policies  # noqa: F401
    # the policies never import torch (checked in a fresh interpreter)
    import subprocess
    code = "import sys, nzrt.policies; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_empty_trace_gives_placement_only():
    layers = {"a": LayerInfo("a", 10, 7)}
    for pol in POLICY_OBJECTS:
        p = pol.plan([], layers, None, Costs(host_is_device=True))
        assert p.steps == () and set(p.tier_of) == {"a"}
        assert p.peak_bytes >= 10  # one unit decoded on demand must fit


@pytest.mark.parametrize("seed", range(5))
def test_auto_says_why_it_chose_its_plan(seed):
    """Under a budget, ``Auto`` takes the fastest plan that fits by its cost model, and its ``why``
    says so: how many fit, the runner-up's estimate (never faster than the chosen one), and for a
    plan with a dense cache, the fastest plan without one (never faster either)."""
    import re

    rng = random.Random(seed)
    layers = {f"l{i}": LayerInfo(f"l{i}", d, d * 2 // 3, on_disk=True)
              for i, d in enumerate(rng.choice([2, 8, 22]) << 20 for _ in range(12))}
    trace = tuple(layers)
    costs = Costs(host_is_device=True, overlap=0.5, decode_bps=1.5e9, disk_bps=1.5e9,
                  layer_seconds={u: rng.uniform(1e-3, 5e-3) for u in layers})
    budget = rng.choice([80, 120, 200]) << 20
    plan = Auto().plan(trace, layers, budget=budget, costs=costs)
    assert plan.peak_bytes <= budget
    m = re.search(r"of (\d+) plans that fit", plan.why)
    assert m and int(m.group(1)) >= 2, plan.why
    for est in re.findall(r"est ([\d.]+) ms/pass", plan.why):
        assert float(est) >= round(plan.est_seconds * 1e3, 1) - 0.05, plan.why
    assert ("+dense" in plan.policy or "belady" in plan.policy) == ("without a dense cache" in plan.why)
    assert plan.why in plan.summary()
    assert Auto().plan(trace, layers, costs=costs).why == ""  # no budget: nothing was weighed
