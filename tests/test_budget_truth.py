"""The smallest budget a policy names is the truth: it works (entry, and every forward after the
trace is recorded), one byte less is refused at entry, the printed text read back works; for every
policy, with and without a file behind the layers, on the CPU and on a GPU's accounting.

Pure tests on fake LayerInfo sets (placement's functions, no torch model), then real ones through
nzrt.managed on the CPU with small Llamas (one with hidden 1024), in memory and from a .nzrt."""
import os
import random
import re
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from nzrt.budget import format_bytes, parse_budget  # noqa: E402
from nzrt.policies import (Auto, BudgetError, Costs, LayerInfo, Offload, Resident, Tier,  # noqa: E402
                           fallback_need, fallback_plan, get_policy, simulate, smallest_budget_for)
from nzrt.runtime import placement  # noqa: E402

POLICY_NAMES = ("resident", "offload", "belady", "lru", "auto", "offload-disk")
PRINTED = re.compile(r"the smallest budget for it is ([0-9.]+ [KMGT]?i?B) \((\d+) bytes\)")


def _layers(rng, n, on_disk):
    out = {}
    for i in range(n):
        dense = rng.choice([256, 1024, 4096, 16384, 65536, 1 << 20]) * rng.randint(1, 4)
        disk = {"all": True, "none": False, "some": rng.random() < 0.5}[on_disk]
        out[f"u{i}"] = LayerInfo(f"u{i}", dense, int(dense * rng.uniform(0.6, 0.75)), on_disk=disk)
    return out


def _traces(rng, layers, k=6):
    names = list(layers)
    out = [tuple(names)]
    for _ in range(k):
        t = list(names)
        rng.shuffle(t)
        for _ in range(rng.randint(0, 4)):  # shared modules, skipped ones
            t.insert(rng.randrange(len(t) + 1), rng.choice(names))
        if len(t) > 2 and rng.random() < 0.3:
            t.pop(rng.randrange(len(t)))
        out.append(tuple(t))
    return out


def _costs(rng, cpu):
    return Costs(decode_bps=rng.choice([1e8, 1.5e9, 2e11]), h2d_bps=12e9, disk_bps=1.5e9,
                 layer_seconds={}, overlap=0.5 if cpu else 1.0, host_is_device=cpu)


def _printed(e: BudgetError) -> str:
    m = PRINTED.search(str(e))
    assert m, str(e)
    assert int(m.group(2)) == e.needed, str(e)
    return m.group(1)


CASES = [(seed, on_disk, cpu) for seed in range(8) for on_disk in ("none", "some", "all") for cpu in (True, False)]


@pytest.mark.parametrize("seed,on_disk,cpu", CASES)
def test_smallest_budget_is_exact_and_forwards_never_raise(seed, on_disk, cpu):
    rng = random.Random(seed)
    layers = _layers(rng, rng.randint(1, 24), on_disk)
    fixed = rng.choice([0, 1000, 12345])
    costs = _costs(rng, cpu)
    traces = _traces(rng, layers)
    for name in POLICY_NAMES:
        policy = get_policy(name)
        need = placement.smallest_budget_for(policy, layers, costs, fixed)
        # one byte less: refused at entry, naming this policy and exactly this budget
        with pytest.raises(BudgetError) as e:
            placement.initial_plan(policy, layers, need - 1, fixed, costs)
        assert e.value.needed == need
        assert policy.name in str(e.value) and str(need) in str(e.value)
        text = _printed(e.value)
        assert parse_budget(text) >= need
        # the smallest and the printed text both work: at entry and for every trace later
        for budget in {need, parse_budget(text)}:
            plan = placement.initial_plan(policy, layers, budget, fixed, costs)
            assert plan.peak_bytes + fixed <= budget
            for trace in traces:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    p = placement.replan(policy, trace, layers, budget, fixed, costs, None, None)
                sim = simulate(p, layers, budget - fixed, costs)  # PlanError on any step over budget
                assert max(sim.step_bytes, default=0) + fixed <= budget


@pytest.mark.parametrize("seed", range(6))
def test_fallback_peak_does_not_depend_on_the_trace(seed):
    rng = random.Random(100 + seed)
    for on_disk in ("none", "some", "all"):
        layers = _layers(rng, rng.randint(1, 20), on_disk)
        for cpu in (True, False):
            costs = _costs(rng, cpu)
            need = fallback_need(layers, costs)
            largest = max(i.dense_bytes for i in layers.values())
            counted = sum(i.compressed_bytes for i in layers.values() if not i.on_disk) if cpu else 0
            assert need == counted + largest
            for trace in _traces(rng, layers) + [()]:
                p = fallback_plan(trace, layers, need, costs)
                assert p.peak_bytes == need
                assert simulate(p, layers, need, costs).peak_bytes <= need
            with pytest.raises(BudgetError) as e:
                fallback_plan(_traces(rng, layers)[0], layers, need - 1, costs)
            assert e.value.needed == need


def test_auto_on_the_cpu_chooses_the_disk_tier_below_the_compressed_size():
    """A checkpoint's layers memory-mapped, the budget under the compressed size: auto (the
    default) takes the disk tier on the CPU; its smallest budget is the disk tier's."""
    layers = {f"u{i}": LayerInfo(f"u{i}", 10_000, 7_000, on_disk=True) for i in range(10)}
    trace = tuple(layers)
    costs = Costs(host_is_device=True, overlap=0.5)
    compressed = sum(i.compressed_bytes for i in layers.values())
    need = smallest_budget_for(Auto(), layers, costs, 500)
    assert need == 10_000 + 500 < compressed
    assert need == smallest_budget_for(Offload(tier="disk"), layers, costs, 500)
    plan = placement.initial_plan(Auto(), layers, need, 500, costs)
    assert set(plan.tier_of.values()) == {Tier.DISK}
    p = placement.replan(Auto(), trace, layers, need, 500, costs, None, None)
    simulate(p, layers, need - 500, costs)
    # more room: lookahead and device-tier units come back, still within the budget
    roomy = placement.replan(Auto(), trace, layers, compressed + 40_000, 0, costs, None, None)
    simulate(roomy, layers, compressed + 40_000, costs)
    assert roomy.est_seconds < p.est_seconds
    # with the budget below even the disk tier: auto's own number, not another policy's
    with pytest.raises(BudgetError) as e:
        placement.initial_plan(Auto(), layers, need - 1, 500, costs)
    assert e.value.needed == need and "'auto'" in str(e.value)


def test_offload_disk_on_the_cpu_counts_only_what_is_in_memory():
    layers = {"a": LayerInfo("a", 1000, 700, on_disk=True), "b": LayerInfo("b", 2000, 1400, on_disk=False)}
    costs = Costs(host_is_device=True)
    p = Offload(tier="disk").plan((), layers, None, costs)
    assert p.tier_of == {"a": Tier.DISK, "b": Tier.HOST}
    assert p.static_bytes == 1400 and p.peak_bytes == 1400 + 2000
    assert smallest_budget_for(Offload(tier="disk"), layers, costs) == 3400
    assert get_policy("offload-disk") == Offload(tier="disk")
    assert get_policy(" Offload-Disk ") == Offload(tier="disk")


def test_the_message_names_the_users_policy_and_a_smaller_tier():
    layers = {f"u{i}": LayerInfo(f"u{i}", 1 << 20, 700_000, on_disk=True) for i in range(8)}
    costs = Costs(host_is_device=True)
    need = smallest_budget_for(Resident(), layers, costs, 0)
    with pytest.raises(BudgetError) as e:
        placement.initial_plan(Resident(), layers, need - 1, 0, costs)
    msg = str(e.value)
    assert "resident(lookahead=1)" in msg and "auto:" not in msg
    m = re.search(r"policy '(offload-disk|auto)'.*? needs only ([0-9.]+ [KMGT]?i?B) \((\d+) bytes\)", msg)
    assert m, msg
    alt = get_policy(m.group(1))
    n = int(m.group(3))
    assert n == smallest_budget_for(alt, layers, costs, 0) < need
    placement.initial_plan(alt, layers, parse_budget(m.group(2)), 0, costs)  # the hint works


def test_a_replan_that_does_not_fit_falls_back_and_says_so():
    """Offload(2) at its smallest budget: the entry plan fits (one unit on demand), the traced plan
    (three units in the window) does not; the replan falls back with a warning, never raises."""
    layers = {f"u{i}": LayerInfo(f"u{i}", 1000, 700) for i in range(6)}
    costs = Costs(host_is_device=False)
    need = smallest_budget_for(Offload(2), layers, costs, 0)
    assert need == 1000
    notes = []
    with pytest.warns(UserWarning, match="offload\\(lookahead=2, tier=host\\)"):
        p = placement.replan(Offload(2), tuple(layers), layers, need, 0, costs, None, notes.append)
    assert p.policy.startswith("offload(lookahead=0") and notes
    simulate(p, layers, need, costs)


def test_format_bytes_rounds_up_and_reads_back():
    gib = 2 ** 30
    assert format_bytes(int(1.351 * gib), up=True) == "1.36 GiB"
    assert format_bytes(int(1.351 * gib)) == "1.35 GiB"  # the report's (nearest) stays
    assert format_bytes(int(1.35 * gib) + 1, up=True) == "1.36 GiB"
    assert format_bytes(135 * gib // 100, up=True) in ("1.35 GiB", "1.36 GiB")
    assert format_bytes(12, up=True) == "12 B" and format_bytes(1024, up=True) == "1.00 KiB"
    rng = random.Random(0)
    for n in [1, 1023, 1024, 1025, 2 ** 20 - 1, 2 ** 20, 2 ** 40 + 1, 2 ** 50 + 3] + \
            [rng.randrange(1, 2 ** 42) for _ in range(3000)]:
        assert parse_budget(format_bytes(n, up=True)) >= n


# --- real models through nzrt.managed on the CPU ----------------------------------------------------

def _llama(hidden, layers, vocab, seed=0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3 // 2,
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                      max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def _same(a, b):
    import torch
    return a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


def _truth_through_managed(model, policy, x, ref, **kw):
    """The smallest budget managed() names for ``policy``: one byte less is refused at entry; it
    and its printed text both run three forwards (trace recorded, plan installed) bit-exactly."""
    import nzrt
    import torch
    with pytest.raises(BudgetError) as e:
        with nzrt.managed(model, policy=policy, budget=1, **kw):
            pass
    need, text = e.value.needed, _printed(e.value)
    assert parse_budget(text) >= need
    with pytest.raises(BudgetError) as e:
        with nzrt.managed(model, policy=policy, budget=need - 1, **kw):
            pass
    assert e.value.needed == need and _printed(e.value) == text
    for budget in (need, text):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a fallback to on-demand decoding warns; it must not raise
            with nzrt.managed(model, policy=policy, budget=budget, **kw) as run:
                for _ in range(3):
                    with torch.inference_mode():
                        assert _same(model(x).logits, ref)
                rep = run.report()
        assert rep.replans >= 1
    return need, rep


@pytest.fixture(scope="module")
def wide():
    return _llama(1024, 1, 512)


@pytest.mark.parametrize("policy", ["resident", "offload", "belady", "lru", "auto"])
def test_managed_smallest_budget_hidden_1024(wide, policy):
    import torch
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 512, (1, 8), generator=g)
    with torch.inference_mode():
        ref = wide(x).logits
    need, rep = _truth_through_managed(wide, policy, x, ref)
    assert need >= rep.fixed_bytes


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small Llama saved as a .nzrt; its weights come back memory-mapped (on disk)."""
    import nzrt
    import torch
    src = _llama(128, 3, 1000, seed=3)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.nzrt"
    nzrt.save(path, {n: nzrt.compress(p.detach()) if p.numel() >= 2048 else p.detach().clone()
                     for n, p in src.named_parameters()})
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 1000, (1, 8), generator=g)
    with torch.inference_mode():
        ref = src(x).logits
    return src, path, x, ref


def _meta(src):
    import torch
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM
    with init_empty_weights():
        meta = LlamaForCausalLM(src.config)
    meta.to(torch.bfloat16).tie_weights()
    return meta.eval()


@pytest.mark.parametrize("policy", ["resident", "offload", "belady", "lru", "auto", "offload-disk"])
def test_managed_smallest_budget_from_a_checkpoint(checkpoint, policy):
    import nzrt
    src, path, x, ref = checkpoint
    weights = nzrt.load(path)
    meta = _meta(src)
    need, rep = _truth_through_managed(meta, policy, x, ref, weights=weights)
    # the device tier's smallest budget: every compressed blob counted, the largest layer, fixed bytes
    device_tier = (sum(x.compressed_bytes for x in rep.layers) + max(x.dense_bytes for x in rep.layers)
                   + rep.fixed_bytes)
    if policy in ("auto", "offload-disk"):  # the disk tier: the file is not counted
        assert need == max(x.dense_bytes for x in rep.layers) + rep.fixed_bytes < device_tier
        assert "disk" in {x.tier for x in rep.layers}
    else:
        assert need == device_tier


# --- the command line ------------------------------------------------------------------------------

_FACTORY = '''
import torch

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(100, 64)
        self.l1 = torch.nn.Linear(64, 256)
        self.l2 = torch.nn.Linear(256, 64)

    def forward(self, ids):
        return self.l2(torch.relu(self.l1(self.emb(ids))))

def make():
    g = torch.Generator().manual_seed(0)
    m = Tiny()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m.to(torch.bfloat16), (torch.randint(0, 100, (2, 16), generator=g),)
'''


@pytest.fixture(scope="module")
def tiny_nzrt(tmp_path_factory):
    import sys
    pytest.importorskip("typer")
    from typer.testing import CliRunner

    from nzrt.cli import app
    d = tmp_path_factory.mktemp("budget_factory")
    (d / "nzrt_budget_truth_factory.py").write_text(_FACTORY)
    sys.path.insert(0, str(d))
    out = d / "tiny.nzrt"
    res = CliRunner().invoke(app, ["compress", "nzrt_budget_truth_factory:make", str(out)])
    assert res.exit_code == 0, res.output
    yield str(out)
    sys.path.remove(str(d))


@pytest.mark.parametrize("policy", ["auto", "offload-disk", "resident"])
def test_cli_suggested_budget_works(tiny_nzrt, policy):
    """The budget the CLI suggests, passed back as --budget, runs; --policy offload-disk is the
    disk tier; auto on the CPU reaches it too (both suggest the same, below resident's)."""
    from typer.testing import CliRunner

    from nzrt.cli import app
    runner = CliRunner()
    args = ["profile", tiny_nzrt, "--policy", policy, "--device", "cpu", "--no-plain", "--repeats", "1"]
    res = runner.invoke(app, args + ["--budget", "1KiB"])
    assert res.exit_code == 2, res.output
    m = re.search(r"pass --budget (\S+) or more", res.output)
    assert m and f"'{get_policy(policy).name}'" in res.output, res.output
    res = runner.invoke(app, args + ["--budget", m.group(1)])
    assert res.exit_code == 0, res.output
    test_cli_suggested_budget_works.seen[policy] = parse_budget(m.group(1))
    seen = test_cli_suggested_budget_works.seen
    if len(seen) == 3:
        assert seen["auto"] == seen["offload-disk"] < seen["resident"]


test_cli_suggested_budget_works.seen = {}


def test_layer_infos_on_disk_means_a_file_and_tied_bytes_count_where_they_live():
    """A compressed tensor the caller holds in memory is not on disk (the CPU's budget counts it);
    a tied tensor's bytes are counted once, in the first unit, and placed in that unit's tier."""
    from types import SimpleNamespace as NS

    from nzrt.policies import Plan

    def slot(nbytes, mapped):
        ct = NS(nbytes=nbytes, source="file" if mapped else None)
        return NS(dense_bytes=2 * nbytes, ct=ct, home=ct, on_disk=True)

    tensors = {"e": slot(700, True), "h": slot(300, False), "w": slot(500, True)}
    units = {"emb": ("e",), "head": ("e", "h"), "mlp": ("w",)}
    layers = placement.layer_infos(units, tensors)
    assert layers["emb"] == LayerInfo("emb", 1400, 700, True)
    assert layers["head"] == LayerInfo("head", 2000, 300, False)  # "e" counted in emb, "h" in memory
    assert layers["mlp"].on_disk
    plan = Plan("x", (), (), (("emb", Tier.DISK), ("head", Tier.DEVICE), ("mlp", Tier.DISK)))
    tier_now = {}
    placement.place(plan, units, tensors, tier_now, NS(type="cpu"))
    assert tier_now == {"e": Tier.DISK, "h": Tier.DEVICE, "w": Tier.DISK}
