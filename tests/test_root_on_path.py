"""The project root on sys.path must not shadow installed packages.

Users put it there (a script, REPL or notebook in the root, ``python -c`` there,
``PYTHONPATH=<root>``); our root folders ``kernels/``, ``scheduler/``, ``policies/`` would then
hide Hugging Face's ``kernels`` (which transformers >= 5.25 imports for every model) and PyPI's
``scheduler``. Each case runs in a child process: transformers imports, ``from kernels import
CUDAProperties`` comes from the installed package, a small model loads plainly and through nzrt,
and our folders still import as ``nzrt.kernels`` and friends."""
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

PROBE = r'''
import importlib.metadata, os, sys
import transformers.activations, kernels
from kernels import CUDAProperties
root = sys.argv[1]
ours = lambda mod: os.path.dirname(os.path.realpath(mod.__file__)) == os.path.join(root, mod.__name__)
assert not ours(kernels), kernels.__file__
dist = importlib.metadata.distribution("kernels")
assert os.path.realpath(kernels.__file__).startswith(os.path.realpath(str(dist.locate_file("")))), kernels.__file__
for name in ("scheduler", "policies"):  # no such distribution here: absent, and the message says why
    try:
        __import__(name)
    except ModuleNotFoundError as e:
        assert "nzrt." + name in str(e) and e.name == name, str(e)
    else:
        assert not ours(sys.modules[name]), sys.modules[name].__file__
import torch, nzrt
import nzrt.kernels, nzrt.scheduler, nzrt.policies
assert nzrt.kernels.__file__ == os.path.join(root, "kernels", "__init__.py"), nzrt.kernels.__file__
assert nzrt.scheduler.Scheduler.__module__ == "nzrt.scheduler.engine"
from transformers import AutoModelForCausalLM
plain = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.bfloat16)
model = nzrt.from_pretrained(sys.argv[2])
ids = torch.arange(8).unsqueeze(0)
with torch.no_grad():
    a, b = plain(ids).logits, model(ids).logits
assert torch.equal(a.view(torch.int16), b.view(torch.int16))
nzrt.release(model)
print("ok", kernels.__file__)
'''


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    d = tmp_path_factory.mktemp("tiny")
    LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16).save_pretrained(d)
    return str(d)


def _check(p):
    assert p.returncode == 0 and p.stdout.startswith("ok "), p.stderr[-2000:]


def test_python_c_in_the_root(tiny_dir):
    _check(subprocess.run([sys.executable, "-c", PROBE, str(ROOT), tiny_dir], cwd=ROOT,
                          capture_output=True, text=True, timeout=600))


def test_script_in_the_root(tiny_dir):
    script = ROOT / f"_probe_{uuid.uuid4().hex[:8]}.py"
    script.write_text(PROBE)
    try:
        _check(subprocess.run([sys.executable, str(script), str(ROOT), tiny_dir], cwd="/",
                              capture_output=True, text=True, timeout=600))
    finally:
        script.unlink()


def test_pythonpath_root_from_elsewhere(tiny_dir, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    _check(subprocess.run([sys.executable, "-c", PROBE, str(ROOT), tiny_dir], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600))


def test_profile_children_never_get_the_root():
    from nzrt.cli import profile

    saved = list(sys.path)
    sys.path[:0] = [str(ROOT), ""]
    try:
        assert all(Path(p).resolve() != ROOT for p in profile._child_sys_path())
    finally:
        sys.path[:] = saved
