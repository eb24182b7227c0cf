"""Training on compressed weights is plain PyTorch's training, bit for bit.

The exactness matrix runs in child processes (tests/_train_child.py): a model trained plainly
(one optimizer per parameter, stepped from its post-accumulate-grad hook, as PyTorch's tutorial
does) and the same model trained under ``nzrt.managed(model, optimizer=...)``; every step's
loss (float32 bits), every final weight and every optimizer state are compared. Hidden 1024 and
64-token batches, 20 steps, under each ONEDNN_MAX_CPU_ISA cap this CPU supports for the
cases whose backward GEMMs differ (AdamW, activation checkpointing, LoRA on a frozen base).
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nzrt
from nzrt.runtime import ManagedError

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib
from test_managed_safety import _isa_caps  # noqa: E402
from test_runtime import bits, same, tiny_llama  # noqa: E402

CHILD = Path(__file__).with_name("_train_child.py")
STEPS = 20
ADAMW = functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1)


def train_child(case, model, steps=STEPS, cap="DEFAULT") -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if cap != "DEFAULT":
        env["ONEDNN_MAX_CPU_ISA"] = cap
    r = subprocess.run([sys.executable, str(CHILD), case, model, str(steps)], capture_output=True,
                       text=True, env=env, timeout=1500, cwd=CHILD.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def assert_identical(res: dict, case: str) -> None:
    plain, ours = res["plain"], res["nzrt"]
    assert len(plain["losses"]) >= STEPS
    assert ours["losses"] == plain["losses"], case
    assert len(set(plain["losses"])) > 1, "the loss must move, or the comparison proves little"
    assert ours["weights"] == plain["weights"], [n for n in plain["weights"]
                                                 if ours["weights"].get(n) != plain["weights"][n]][:5]
    assert ours["states"] == plain["states"], [n for n in plain["states"]
                                               if ours["states"].get(n) != plain["states"][n]][:5]


CAPPED = ["adamw", "checkpointing", "lora"]


@pytest.mark.parametrize("cap", _isa_caps())
@pytest.mark.parametrize("case", CAPPED)
def test_tied_llama_1024_trains_bit_identically(case, cap):
    res = train_child(case, "tied1024", cap=cap)
    assert_identical(res, case)
    assert res["nzrt"]["info"]["managed"] == 15  # the embedding (tied head) and 2 x 7 projections
    if case != "lora":
        assert len(res["plain"]["states"]) >= 2 * 15  # AdamW: exp_avg and exp_avg_sq of each


@pytest.mark.parametrize("case", ["sgd", "accumulate", "resume"])
def test_tied_llama_1024_other_optimizers_and_modes(case):
    """SGD with momentum; gradients kept for accumulation over 2 micro-batches and global-norm
    clipping (run.step()); a resume from run.save() + run.state_dict() through torch.save."""
    assert_identical(train_child(case, "tied1024"), case)


def test_untied_llama_1024_row_chunked_embedding_trains_bit_identically():
    res = train_child("adamw", "untied1024")
    assert_identical(res, "untied")
    assert res["nzrt"]["info"]["chunked"] == 1  # the input embedding, in row chunks, trained


@pytest.mark.parametrize("case", ["adamw", "sgd", "lora"])
def test_smollm2_trains_bit_identically(case):
    """The embedded SmolLM2-135M (real trained weights, bf16): AdamW, SGD with momentum, and peft
    LoRA on its frozen compressed base against plain peft."""
    res = train_child(case, "smollm2")
    assert_identical(res, case)
    if case != "lora":
        comp, dense = res["nzrt"]["info"]["state_bytes"]
        assert comp > 0 and dense < comp / 100  # the states are held compressed between steps


# -- in-process checks (small models) -----------------------------------------------------------
def plain_in_backward(model, factory=ADAMW) -> dict:
    """PyTorch's optimizer step in backward: {parameter: its optimizer}."""
    opts = {p: factory([p]) for p in model.parameters()}

    def hook(p):
        opts[p].step()
        opts[p].zero_grad(set_to_none=True)
    for p in opts:
        p.register_post_accumulate_grad_hook(hook)
    return opts


def ids(vocab=1000, n=64, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, n), generator=g)


def test_lossy_training_is_refused_before_anything_changes():
    m = tiny_llama()
    before = {n: bits(p).clone() for n, p in m.named_parameters()}
    with pytest.raises(ValueError, match="lossy"):
        nzrt.managed(m, optimizer=ADAMW, mantissa_bits=3)
    assert all(torch.equal(bits(p), before[n]) for n, p in m.named_parameters())


@pytest.mark.parametrize("bad", [3, "adamw", lambda params: "not an optimizer"],
                         ids=["int", "str", "returns-no-optimizer"])
def test_a_bad_optimizer_is_a_clear_error_and_the_model_is_untouched(bad):
    m = tiny_llama()
    before = {n: (type(p), bits(p).clone()) for n, p in m.named_parameters()}
    with pytest.raises(TypeError, match="optimizer"):
        with nzrt.managed(m, optimizer=bad):
            pass
    for n, p in m.named_parameters():
        assert type(p) is before[n][0] and torch.equal(bits(p), before[n][1])
        assert not p._post_accumulate_grad_hooks


def test_exit_removes_the_hooks_and_keeps_the_trained_weights():
    m = tiny_llama()
    x = ids()
    with nzrt.managed(m, optimizer=ADAMW) as run:
        m(x, labels=x).loss.backward()
        assert run.trainer.steps == len(run.params)
        trained = {n: bits(p.detach().clone()) for n, p in m.named_parameters()}
    for n, p in m.named_parameters():
        assert type(p) is torch.nn.Parameter
        assert not p._post_accumulate_grad_hooks and p.grad is None
        assert torch.equal(bits(p), trained[n])
    with pytest.raises(ManagedError, match="optimizer"):
        run.step()


def test_frozen_parameters_get_no_optimizer_and_stay_as_they_were():
    m = tiny_llama()
    m.model.layers[0].requires_grad_(False)
    frozen = {n: bits(p).clone() for n, p in m.named_parameters() if not p.requires_grad}
    x = ids()
    with nzrt.managed(m, optimizer=ADAMW) as run:
        for _ in range(2):
            m(x, labels=x).loss.backward()
        assert not any(n.startswith("model.layers.0.") for n in run.optimizers)
        assert "model.layers.1.mlp.up_proj.weight" in run.optimizers
    for n, p in m.named_parameters():
        if n in frozen:
            assert torch.equal(bits(p), frozen[n]), n


def test_a_weight_updated_after_the_forward_that_saved_it_raises_as_plain_does():
    """Two forwards, then both backwards: the first backward steps the weights that the second
    graph saved. Plain PyTorch raises (a saved tensor modified in place); so does nzrt, rather
    than computing with the new values."""
    def two_graphs(m, x):
        a = m(x, labels=x).loss
        b = m(x, labels=x).loss
        b.backward()
        return a

    plain = tiny_llama()
    plain_in_backward(plain)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        two_graphs(plain, ids()).backward()
    m = tiny_llama()
    with nzrt.managed(m, optimizer=ADAMW):
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            two_graphs(m, ids()).backward()


def test_an_error_in_a_step_propagates_and_exit_restores_the_last_completed_weights():
    calls = []

    class Failing(torch.optim.SGD):
        def step(self, closure=None):
            calls.append(1)
            if len(calls) == 5:
                raise RuntimeError("optimizer failed on purpose")
            return super().step(closure)

    m = tiny_llama()
    x = ids()
    with nzrt.managed(m, optimizer=functools.partial(Failing, lr=0.1)):
        with pytest.raises(RuntimeError, match="on purpose"):
            m(x, labels=x).loss.backward()
        seen = {n: bits(p.detach().clone()) for n, p in m.named_parameters()}
    for n, p in m.named_parameters():
        assert type(p) is torch.nn.Parameter and torch.equal(bits(p), seen[n]), n


def test_lr_schedulers_over_all_optimizers_match_plain():
    sched = functools.partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda s: 1.0 / (1 + s))
    x = ids()
    plain = tiny_llama(hidden=128)
    scheds = [sched(o) for o in plain_in_backward(plain).values()]
    ref = []
    for _ in range(3):
        loss = plain(x, labels=x).loss
        loss.backward()
        ref.append(bits(loss.detach()))
        for s in scheds:
            s.step()
    m = tiny_llama(hidden=128)
    got = []
    with nzrt.managed(m, optimizer=ADAMW) as run:
        group = run.lr_scheduler(sched)
        for _ in range(3):
            loss = m(x, labels=x).loss
            loss.backward()
            got.append(bits(loss.detach()))
            group.step()
        lrs = group.get_last_lr()
        assert run.state_dict()["lr_schedulers"] is not None
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert all(same(p, q) for p, q in zip(m.parameters(), plain.parameters()))
    assert all(v == [1e-3 / 4] for v in lrs.values())


def test_train_eval_switching_inside_the_block():
    m = tiny_llama()
    x = ids()
    ref = tiny_llama()
    with nzrt.managed(m, optimizer=ADAMW):
        m.train()
        m(x, labels=x).loss.backward()
        m.eval()
        with torch.no_grad():
            out = m(x).logits
        m.train()
        m(x, labels=x).loss.backward()
    plain_in_backward(ref)
    ref(x, labels=x).loss.backward()
    with torch.no_grad():
        assert same(ref.eval()(x).logits, out)
    ref.train()(x, labels=x).loss.backward()
    assert all(same(p, q) for p, q in zip(m.parameters(), ref.parameters()))


def test_save_writes_compressed_weights_that_load_back_exactly(tmp_path):
    """A plain nn.Module (no transformers config): run.save writes its entries for
    managed(meta model, weights=nzrt.load(path))."""
    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 8)).to(torch.bfloat16)
    m = net()
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with nzrt.managed(m, optimizer=ADAMW) as run:
        for _ in range(2):
            m(x).float().square().mean().backward()
        run.save(tmp_path / "m.nzrt")
        blobs = nzrt.load(tmp_path / "m.nzrt")
        assert isinstance(blobs["0.weight"], nzrt.CompressedTensor)  # written compressed
    with torch.device("meta"):
        meta = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 8)).to(torch.bfloat16)
    with nzrt.managed(meta, weights=nzrt.load(tmp_path / "m.nzrt")):
        for (n, p), q in zip(meta.named_parameters(), m.parameters()):
            assert same(p.detach().clone(), q), n


@pytest.mark.parametrize("policy", ["resident", "offload", "belady", "lru", "auto", "belady-roomy", "lru-roomy"])
def test_every_policy_trains_like_plain(policy):
    """Each policy's plan holds dense copies across the step (prefetched units; with a roomy
    budget belady and lru cache every unit dense): an update must reach every copy held."""
    x = ids()
    ref = tiny_llama()
    plain_in_backward(ref)
    m = tiny_llama()
    kw = {"policy": policy.split("-")[0], "budget": "1GiB"} if policy.endswith("-roomy") else {"policy": policy}
    with nzrt.managed(m, optimizer=ADAMW, **kw) as run:
        for step in range(4):
            loss = m(x, labels=x).loss
            loss.backward()
            want = ref(x, labels=x).loss
            want.backward()
            assert same(loss.detach(), want.detach()), step
        held = len(run.scheduler.held)
    if policy.endswith("-roomy"):
        assert held >= len(run.units) // 2, (held, len(run.units))
    assert all(same(p, q) for p, q in zip(m.parameters(), ref.parameters()))


def test_ctrl_c_during_training_never_splits_a_step():
    res = train_child("interrupts", "tiny", steps=40)
    assert res["caught"] >= 10, res  # most interrupts land inside the backward
    assert res["mismatched"] == [], res
    assert res["restored"], res


def test_save_with_a_tokenizer_gives_a_file_generate_can_run(tmp_path):
    """A trained transformers model saved with its tokenizer: the .nzrt loads back with both (what
    `nzrt generate FILE` needs), and its weights are the trained ones."""
    from nzrt.cli import model_arg
    lm = model_arg.resolve(None)
    m = lm.model.to(torch.bfloat16).requires_grad_(True).train()
    x = lm.tokenizer("The quick brown fox jumps over the lazy dog. " * 6, return_tensors="pt")["input_ids"]
    with nzrt.managed(m, optimizer=functools.partial(torch.optim.SGD, lr=1e-3)) as run:
        m(x, labels=x).loss.backward()
        run.save(tmp_path / "tuned.nzrt", tokenizer=lm.tokenizer)
    back = model_arg.resolve(str(tmp_path / "tuned.nzrt"))
    assert back.tokenizer is not None
    assert back.tokenizer("Paris is")["input_ids"] == lm.tokenizer("Paris is")["input_ids"]
    back.materialize()  # a .nzrt comes back as a meta model with its compressed weights beside
    for (n, p), q in zip(back.model.named_parameters(), m.parameters()):
        assert same(p, q), n
