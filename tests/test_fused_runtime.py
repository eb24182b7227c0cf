"""Fused generation in the runtime (``policies.Fused``): generated tokens multiply straight from
the compressed weights, bit-identical to the fused arithmetic's numpy definition, and decode
nothing; prompts keep the bit-identical decode-then-GEMM path.

The generation cases run in child processes (tests/_fused_child.py), the hidden-1024 Llama under
each ONEDNN_MAX_CPU_ISA cap this CPU supports: its 64-token prompt goes through oneDNN's GEMMs
(compared with plain PyTorch's), its generated tokens through the fused kernel (compared with
``fused_reference.linear_f32`` on the dense weights), and both must hold on every cap.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nzrt
from nzrt.policies import Auto, Fused, Resident, get_policy
from nzrt.runtime.fused import input_rows

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib
from test_managed_safety import _isa_caps  # noqa: E402
from test_runtime import tiny_llama  # noqa: E402

CHILD = Path(__file__).with_name("_fused_child.py")
NEW = 6


def fused_child(model, cap="DEFAULT", prompt=64, new=NEW) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if cap != "DEFAULT":
        env["ONEDNN_MAX_CPU_ISA"] = cap
    r = subprocess.run([sys.executable, str(CHILD), model, str(prompt), str(new)], capture_output=True,
                       text=True, env=env, timeout=900, cwd=CHILD.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def check_generation(res: dict) -> None:
    assert res["prefill_equal"], "a prompt (64 rows) under Fused must stay bit-identical to plain"
    ref, got = res["ref"], res["fused"]
    assert len(got["steps"]) == NEW
    assert got["steps"] == ref["steps"], "logits of a fused step differ from the fused arithmetic's"
    assert got["tokens"] == ref["tokens"]
    assert len(set(got["steps"])) == NEW  # every step's logits are its own (the test can fail)
    st = res["stats"]
    assert st["passes"] == NEW - 1  # the first token comes from the prompt's pass
    assert st["linear_calls"] == (NEW - 1) * st["linears"]  # every Linear, the output head included


@pytest.mark.parametrize("cap", _isa_caps())
def test_tied_llama_1024_fused_generation_is_the_fused_arithmetic(cap):
    res = fused_child("tied1024", cap)
    check_generation(res)
    st = res["stats"]
    assert st["lookups"] == NEW - 1  # the tied embedding reads only the rows it looks up
    assert st["decodes"] == st["prompt_decodes"]  # the fused passes decoded nothing


def test_untied_llama_1024_fused_generation():
    res = fused_child("untied1024")
    check_generation(res)
    st = res["stats"]
    # the untied input embedding is in row chunks and a lookup on the CPU reads only the tiles of
    # its rows straight from the compressed chunk (no scheduler decode): the fused passes of the
    # generation decode nothing at all, as a pass over the prompt decodes only the other weights
    assert st["decodes"] == st["prompt_decodes"]


def test_smollm2_fused_generation():
    res = fused_child("smollm2")
    check_generation(res)
    assert res["stats"]["decodes"] == res["stats"]["prompt_decodes"]
    assert res["stats"]["lookups"] == NEW - 1


# -- the policy value ---------------------------------------------------------------------------

def test_fused_policy_values_and_names():
    assert get_policy("fused") == Fused(Auto())
    assert get_policy("fused:resident") == Fused(Resident())
    assert get_policy(" Fused:Offload-Disk ").base.tier == "disk"
    assert Fused("belady").name == f"fused:{get_policy('belady').name}" and Fused().max_rows == 16
    for bad in ("fused:fused", "fused:nope"):
        with pytest.raises(ValueError):
            get_policy(bad)
    for rows in (0, 65, 2.0, True):
        with pytest.raises(ValueError, match="max_rows"):
            Fused(max_rows=rows)
    with pytest.raises(ValueError, match="another Fused"):
        Fused(Fused())
    assert Fused(Resident()).plan((), {}, None).policy == Resident().plan((), {}, None).policy


def test_input_rows():
    assert input_rows((torch.zeros(2, 7, dtype=torch.long),), {}) == 14
    assert input_rows((), {"input_ids": torch.zeros(1, 1, dtype=torch.long)}) == 1
    assert input_rows((), {"inputs_embeds": torch.zeros(1, 3, 64)}) == 3
    assert input_rows((5,), {}) is None


def bits(t):
    return t.view(torch.int16)


def test_grad_enabled_and_long_inputs_keep_the_exact_path():
    """With autograd on, or more rows than max_rows, a Fused run is the bit-identical runtime."""
    model = tiny_llama(hidden=256, layers=2)
    ids = torch.randint(0, 1000, (1, 20))
    one = ids[:, :1]
    with torch.no_grad():
        want_long, want_one = model(ids).logits, model(one).logits
    want_grad = model(one).logits.detach()
    with nzrt.managed(model, policy=Fused(max_rows=16)) as run:
        with torch.no_grad():
            got_long = model(ids).logits
        assert run.fused_stats.passes == 0
        got_grad = model(one).logits.detach()  # grad mode: not fused
        assert run.fused_stats.passes == 0
        with torch.no_grad():
            got_one = model(one).logits  # fused
        assert run.fused_stats.passes == 1 and run.fused_stats.linear_calls > 0
        assert "fused: 1 passes" in run.report().summary()
    assert torch.equal(bits(got_long), bits(want_long))
    assert torch.equal(bits(got_grad), bits(want_grad))
    assert got_one.shape == want_one.shape and torch.isfinite(got_one).all()
    # detach left the model as it was
    with torch.no_grad():
        assert torch.equal(bits(model(ids).logits), bits(want_long))


def test_fused_pass_interrupted_leaves_the_run_usable():
    model = tiny_llama(hidden=256, layers=2)
    one = torch.randint(0, 1000, (1, 1))
    layer = model.model.layers[1].mlp.down_proj
    with nzrt.managed(model, policy="fused") as run:
        with torch.no_grad():
            want = model(one).logits
        h = layer.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt), torch.no_grad():
            model(one)
        h.remove()
        assert not run.fused_pass and run.lock.count == 0
        with torch.no_grad():
            assert torch.equal(bits(model(one).logits), bits(want))


def test_fused_reads_every_tier_the_same(tmp_path):
    """From a .nzrt: the fused passes read the compressed weights where they are (in memory, or
    the file map of the disk tier) and give the same bits either way."""
    from nzrt.loading.compress import compress_model
    from test_pretrained import _save_llama
    path = _save_llama(tmp_path / "m", tied=True, hidden=256)
    out = tmp_path / "m.nzrt"
    compress_model(str(path), out)
    ids = torch.randint(0, 4096, (1, 5), generator=torch.Generator().manual_seed(3))
    got = {}
    for policy in ("fused:resident", "fused:offload-disk"):
        model = nzrt.from_pretrained(out, policy=policy)
        try:
            with torch.no_grad():
                res = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                                     do_sample=False, output_scores=True, return_dict_in_generate=True,
                                     pad_token_id=0)
            rep = nzrt.report(model)
            assert "fused: 4 passes" in rep.summary()  # the 5-token prompt and 3 more
            # no Linear nor the embedding was decoded densely (from a checkpoint the small norm
            # weights are managed too: those units decode on demand, as in any on-demand pass)
            big = [x for x in rep.layers if "norm" not in x.name]
            assert len(big) == 16 and sum(x.decodes for x in big) == 0  # 14 projections, embedding, head
        finally:
            nzrt.release(model)
        got[policy] = torch.stack(res.scores).view(torch.int16)
    assert torch.equal(got["fused:resident"], got["fused:offload-disk"])
