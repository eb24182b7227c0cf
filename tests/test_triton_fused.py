"""The Triton fused decode-matmul (window code) under TRITON_INTERPRET=1: bits identical to
``fused_reference.linear`` on random, edge and odd-sized inputs (rows not a multiple of the
block, rows crossing tiles, escapes everywhere). Outputs compared as integers."""
import os

_PREV = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module (and its @triton.jit) is imported

import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from nzrt import codec  # noqa: E402
from nzrt.kernels import fused_reference  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _triton_interpreted import _interpreted_triton  # noqa: E402

_interpreted_triton()
from nzrt.kernels.triton import fused as tf  # noqa: E402

from test_fused import ints, weights  # noqa: E402
from test_fused_w4 import noisy  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _interpreter_only_in_this_module():
    global tf
    _interpreted_triton()
    tf = sys.modules["nzrt.kernels.triton.fused"]
    yield
    if _PREV is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREV
    for name in [m for m in sys.modules if m == "nzrt.kernels.triton" or m.startswith("nzrt.kernels.triton.")]:
        del sys.modules[name]  # the next import (a real GPU's) compiles afresh


def same(a, b):
    diff = (ints(a) != ints(b)).nonzero()
    assert len(diff) == 0, f"{len(diff)} outputs differ, first at {diff[0].tolist()}"


@pytest.mark.parametrize("N,K,tile", [(1, 64, 64), (70, 128, 192), (33, 320, 128), (100, 1024, 8192)],
                         ids=lambda v: str(v))
def test_matches_reference(N, K, tile):
    gen = torch.Generator().manual_seed(N * 7 + K)
    w = noisy(weights(N, K, torch.bfloat16, gen), gen)  # NaN payloads, inf, subnormals, ±0, escapes
    ct = codec.compress(w, tile=tile, widths=codec.WINDOW4)
    assert ct.header.has_raw == (N * K > 64) and tf.eligible(ct)
    fw = tf.FusedWeightW4(ct, "cpu")
    b = torch.randn(N, generator=gen).bfloat16()
    for x, bias in ((torch.randn(3, K, generator=gen).bfloat16(), None),
                    (torch.randn(1, K, generator=gen).bfloat16(), b),
                    (torch.randn(2, K, generator=gen), b)):  # float32 x: float32 sums, no rounding to hide in
        same(fw.linear(x, bias), fused_reference.linear(ct, x, bias))


def test_without_raw_level_and_eligibility():
    gen = torch.Generator().manual_seed(5)
    w = (torch.randn(40, 128, generator=gen) * 0.02).bfloat16()
    w = torch.where(w.abs() < 2 ** -10, torch.zeros_like(w), w)
    ct = codec.compress(w, tile=256, widths=codec.WINDOW4)
    assert not ct.header.has_raw
    x = torch.randn(2, 128, generator=gen).bfloat16()
    same(tf.linear(ct, x), fused_reference.linear(ct, x))
    assert not tf.eligible(codec.compress(w))  # the smallest code
    assert not tf.eligible(codec.compress(w[:, :96].contiguous(), widths=codec.WINDOW4))  # K % 64
    with pytest.raises(ValueError, match="window code"):
        tf.FusedWeightW4(codec.compress(w), "cpu")


def test_every_bf16_pattern_as_a_weight():
    """All 65,536 patterns (NaN payloads, ±inf, subnormals, ±0; 241 exponents escape)."""
    gen = torch.Generator().manual_seed(9)
    w = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    w = w[torch.randperm(w.numel(), generator=gen)].reshape(512, 128).contiguous()
    ct = codec.compress(w, tile=1024, widths=codec.WINDOW4)
    fw = tf.FusedWeightW4(ct, "cpu")
    for x in (torch.randn(2, 128, generator=gen).bfloat16(), torch.randn(1, 128, generator=gen)):
        same(fw.linear(x), fused_reference.linear(ct, x))
