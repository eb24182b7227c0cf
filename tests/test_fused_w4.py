"""The 4-bit window exponent code (``widths=WINDOW4``) and the fused kernel's fast path for it
(``fused_w4``): every encoder writes the reference's bytes, every decoder reads them back
bit for bit, and the fast path's outputs are the bits of ``fused_reference.linear`` and of the
general fused path, on random, edge and odd-sized inputs, at real sizes, with 1 or 2 threads.
Corrupted streams end in FormatError (checked in a child process).
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest
import torch

import nzrt
from nzrt import codec
from nzrt.kernels import fused_reference, reference, spec
from nzrt.kernels import cpu as cpu_backend
from nzrt.kernels.cpu import fused as cpu_fused, fused_w4
from nzrt.policies import Fused

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from test_fused import POISON, ints, special, weights  # noqa: E402

W4 = codec.WINDOW4


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(4321)


def fast(ct, x, bias=None) -> torch.Tensor:
    """The fused output through a FusedWeight that must take the window path where the CPU has
    AVX-512BW (and the general path where it has not), into a poisoned buffer."""
    fw = cpu_fused.FusedWeight(ct)
    assert (fw._w4 is not None) == fused_w4.HAS_AVX512BW
    out = torch.empty((x.shape[0], ct.shape[0]), dtype=x.dtype)
    ints(out).fill_(POISON[out.element_size()])
    return fw.linear(x, bias, out=out)


def noisy(w: torch.Tensor, gen, frac=0.03) -> torch.Tensor:
    """``special(w, frac / 10)`` with a further ``frac`` of the weights finite values of random
    sign, mantissa and exponent in 2**-37 .. 2**8: rare exponents, so the raw level (escapes) is
    used throughout, and few infs and NaNs that would hide a wrong escape in their row's sum."""
    b = ints(special(w, gen, frac / 10)).clone().reshape(-1)
    pos = torch.randperm(b.numel(), generator=gen)[: max(1, int(frac * b.numel()))]
    k = len(pos)
    e = torch.randint(90, 136, (k,), generator=gen, dtype=torch.int32)
    v = (torch.randint(0, 2, (k,), generator=gen, dtype=torch.int32) << 15) | (e << 7) | torch.randint(
        0, 128, (k,), generator=gen, dtype=torch.int32)
    b[pos] = v.to(torch.int16)
    return b.view(torch.bfloat16).reshape(w.shape)


def same(a, b):
    diff = (ints(a) != ints(b)).nonzero()
    assert len(diff) == 0, f"{len(diff)} outputs differ, first at {diff[0].tolist()}"


# --- the code: encoders, decoders, argument checks --------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("n,tile", [(0, 64), (1, 8), (77, 16), (5000, 1024), (70001, 8192)])
def test_window_encoders_agree_and_round_trip(dtype, n, tile, gen):
    w = special(torch.randn(max(n, 1), generator=gen).to(dtype), gen, 0.01)[:n].contiguous()
    lay = spec.LAYOUTS[str(dtype).removeprefix("torch.")]
    bits = w.view(ints(w).dtype).numpy().view(lay.uint)
    ref = reference.encode(bits, lay, lay.man_bits, tile, widths=W4)
    got = cpu_backend.encode(bits, lay, lay.man_bits, tile, widths=W4)
    assert tuple(ref[0]) == tuple(got[0]) == ((4,) if n else ())
    assert ref[1] == got[1] and np.array_equal(ref[2], got[2])
    for name in ref[3]:
        assert np.array_equal(ref[3][name], got[3][name]), name
    ct = codec.compress(w, tile=tile, widths=W4)
    assert ct.header.widths == ((4,) if n else ())
    for backend in ("numba", "reference"):
        assert torch.equal(ints(codec.decompress(ct, backend=backend)), ints(w))


@pytest.mark.parametrize("widths", [(), (3,), (2, 2, 5)], ids=str)
def test_other_forced_codes_agree(widths, gen):
    """Any forced cascade (none: every exponent raw) is the reference's bytes and round-trips."""
    w = special(torch.randn(9000, generator=gen).bfloat16(), gen, 0.01)
    bits = w.view(torch.int16).numpy().view(np.uint16)
    lay = spec.LAYOUTS["bfloat16"]
    ref = reference.encode(bits, lay, 7, 2048, widths=widths)
    got = cpu_backend.encode(bits, lay, 7, 2048, widths=widths)
    assert tuple(ref[0]) == tuple(got[0]) == widths and ref[1] == got[1]
    for name in ref[3]:
        assert np.array_equal(ref[3][name], got[3][name]), name
    ct = codec.compress(w, tile=2048, widths=widths)
    assert ct.header.widths == widths
    assert torch.equal(ints(codec.decompress(ct)), ints(w))


def test_window_raw_level_only_when_needed(gen):
    few = (torch.randn(4096, generator=gen) * 0.02).bfloat16()
    few = torch.where(few.abs() < 2 ** -10, torch.zeros_like(few), few)  # under 15 exponents
    assert len(torch.unique((ints(few) >> 7) & 0xFF)) <= 15
    ct = codec.compress(few, widths=W4)
    assert ct.header.widths == (4,) and not ct.header.has_raw
    many = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    ct = codec.compress(many, widths=W4)
    assert ct.header.has_raw and len(ct.header.symbols) == 15
    assert torch.equal(ints(codec.decompress(ct)), ints(many))


def test_window_costs_about_twelve_bits(gen):
    w = (torch.randn(1 << 18, generator=gen) * 0.02).bfloat16()
    small, win = codec.compress(w), codec.compress(w, widths=W4)
    assert 10.4 < 8 * small.nbytes / w.numel() < 11.0
    assert 11.9 < 8 * win.nbytes / w.numel() < 12.2


@pytest.mark.parametrize("bad", [(0,), (6,), (1, 1, 1, 1, 1), (True,), ("4",), 4, (4.5,)])
def test_widths_checked(bad):
    with pytest.raises(ValueError, match="widths"):
        codec.compress(torch.zeros(8), widths=bad)


def test_fused_policy_widths():
    assert Fused().widths == "auto" and Fused(widths=None).widths is None and Fused(widths=[3, 2]).widths == (3, 2)
    for bad in ((), (0,), (9,), "4", (True,)):
        with pytest.raises(ValueError, match="Fused.widths"):
            Fused(widths=bad)


# --- the fast path against the reference -------------------------------------------------------

def test_eligibility(gen):
    w = weights(8, 128, torch.bfloat16, gen)
    on = fused_w4.HAS_AVX512BW
    assert fused_w4.eligible(codec.compress(w, widths=W4)) == on
    assert not fused_w4.eligible(codec.compress(w))  # the cascade: the general path
    assert not fused_w4.eligible(codec.compress(w, widths=W4, mantissa_bits=3))  # lossy
    assert not fused_w4.eligible(codec.compress(w.half(), widths=W4))
    assert not fused_w4.eligible(codec.compress(weights(8, 96, torch.bfloat16, gen), widths=W4))  # K % 64
    assert not fused_w4.eligible(codec.compress(w, widths=W4, tile=96))  # tile % 64


@pytest.mark.parametrize("N,K,tile", [(1, 64, 64), (3, 128, 64), (7, 576, 8192), (33, 640, 128),
                                      (129, 64, 8192), (5, 192, 320 * 64)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 16])
def test_window_matches_reference(N, K, tile, rows, gen):
    w = noisy(weights(N, K, torch.bfloat16, gen), gen)  # NaN payloads, inf, subnormals, ±0, escapes
    ct = codec.compress(w, tile=tile, widths=W4)
    general = cpu_fused.FusedWeight(codec.compress(w, tile=tile))
    x = torch.randn(rows, K, generator=gen).bfloat16()
    b = torch.randn(N, generator=gen).bfloat16()
    for xi, bi in ((x, None), (x, b), (x.float(), b), (special(x, gen, 0.05), b)):
        got = fast(ct, xi, bi)
        same(got, fused_reference.linear(ct, xi, bi))
        same(got, general.linear(xi, bi))


def test_every_bf16_pattern_as_a_weight(gen):
    """All 65,536 patterns: 256 exponents, 241 of them escapes, in every position of a group."""
    w = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    w = w[torch.randperm(w.numel(), generator=gen)].reshape(512, 128).contiguous()
    ct = codec.compress(w, tile=1024, widths=W4)
    assert ct.header.has_raw
    for rows in (1, 4, 5):
        x = torch.randn(rows, 128, generator=gen).bfloat16()
        same(fast(ct, x), fused_reference.linear(ct, x))
        same(fast(ct, x.float()), fused_reference.linear(ct, x.float()))


@pytest.mark.parametrize("N,K", [(2048, 1024), (1536, 576), (49152, 576)])
def test_window_real_sizes(N, K, gen):
    w = noisy(weights(N, K, torch.bfloat16, gen, scale=0.02), gen, 0.001)
    ct = codec.compress(w, widths=W4)
    for rows in (1, 16):
        x = torch.randn(rows, K, generator=gen).bfloat16()
        b = (torch.randn(N, generator=gen) * 0.1).bfloat16()
        same(fast(ct, x, b), fused_reference.linear(ct, x, b, decode=cpu_backend.decode_into))


def test_window_thread_count_independent(gen, monkeypatch):
    """Chunks that start inside a tile count the tile's escapes before them."""
    N, K, tile = 301, 256, 1024
    monkeypatch.setattr(cpu_fused, "PARALLEL_MIN_WEIGHTS", 1)
    bounds = cpu_fused.chunk_bounds(N, K, tile, 2)
    assert len(bounds) > 2 and any((int(r) * K) % tile for r in bounds[1:-1])
    w = noisy(weights(N, K, torch.bfloat16, gen), gen)
    ct = codec.compress(w, tile=tile, widths=W4)
    assert ct.header.has_raw
    for x in (torch.randn(3, K, generator=gen).bfloat16(), torch.randn(2, K, generator=gen)):
        before = numba.get_num_threads()
        try:
            numba.set_num_threads(1)
            one = fast(ct, x)
            numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
            two = fast(ct, x)
        finally:
            numba.set_num_threads(before)
        same(one, two)
        same(one, fused_reference.linear(ct, x))  # float32 x: float32 sums, no rounding to hide in


# --- corrupted streams: an error, never a crash (child processes) ----------------------------

CORRUPT = textwrap.dedent("""
    import sys, numpy as np, torch
    from nzrt import codec
    from nzrt.kernels import spec
    from nzrt.kernels.cpu import fused as cpu_fused, fused_w4
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(64, 256, generator=g) * 0.02).bfloat16()
    if sys.argv[1] == "no_raw":
        w = torch.where(w.abs() < 2 ** -10, torch.zeros_like(w), w)
    else:
        w.view(-1)[::97] = 1e30
    ct = codec.compress(w, tile=1024, widths=codec.WINDOW4)
    fw = cpu_fused.FusedWeight(ct)  # checked and prepared: the streams are now changed under it
    assert (fw._w4 is not None) == fused_w4.HAS_AVX512BW  # else the general path, the same checks
    assert ct.header.has_raw == (sys.argv[1] != "no_raw")
    L0 = ct.np_sections()["level0"]
    L0[:1024 // 2] = 0xFF  # tile 0: every code an escape (more than its raw entries)
    try:
        fw.linear(torch.ones(2, 256).bfloat16())
    except spec.FormatError as e:
        print("FormatError", e)
    else:
        print("no error")
""")


@pytest.mark.parametrize("case,msg", [("raw", "more escapes"), ("no_raw", "names no symbol")])
def test_corrupted_window_stream_is_an_error(case, msg):
    r = subprocess.run([sys.executable, "-c", CORRUPT, case], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "FormatError" in r.stdout and msg in r.stdout, r.stdout


# --- the runtime compresses with the policy's code --------------------------------------------

def test_managed_fused_compresses_with_the_window(gen):
    from torch import nn
    m = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 128)).bfloat16()
    fast_here = fused_w4.HAS_AVX512BW  # "auto": the window code where its fast path runs
    with nzrt.managed(m, policy="fused") as run:
        assert all((s.ct.header.widths == (4,)) == fast_here for s in run.tensors.values() if s.ct.numel() > 64)
    with nzrt.managed(m, policy=Fused(widths=(4,))) as run:
        assert all(s.ct.header.widths == (4,) for s in run.tensors.values() if s.ct.numel() > 1)
    with nzrt.managed(m, policy=Fused(widths=None)) as run:
        assert not any(s.ct.header.widths == (4,) for s in run.tensors.values() if s.ct.numel() > 64)
    with nzrt.managed(m, policy="auto") as run:  # other policies: the smallest code
        assert not any(s.ct.header.widths == (4,) for s in run.tensors.values() if s.ct.numel() > 64)


def test_general_path_reads_the_window_code(gen):
    """Where the CPU lacks AVX-512BW the general path multiplies window-coded weights: the same bits."""
    w = noisy(weights(40, 192, torch.bfloat16, gen), gen)
    ct = codec.compress(w, tile=512, widths=W4)
    fw = cpu_fused.FusedWeight(ct)
    fw._w4 = None  # as on such a CPU
    for x in (torch.randn(3, 192, generator=gen).bfloat16(), torch.randn(1, 192, generator=gen)):
        same(fw.linear(x), fused_reference.linear(ct, x))


PORTABLE = textwrap.dedent("""
    import torch
    from torch import nn
    import nzrt
    from nzrt import codec
    from nzrt.kernels import fused_reference
    from nzrt.kernels.cpu import fused as cpu_fused, fused_w4
    assert not fused_w4.HAS_AVX512BW
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(96, 256, generator=g) * 0.02).bfloat16()
    w.view(-1)[::37] = 3e20  # escapes
    ct = codec.compress(w, tile=1024, widths=codec.WINDOW4)
    fw = cpu_fused.FusedWeight(ct)
    assert fw._w4 is None and not fused_w4.eligible(ct)
    for x in (torch.randn(1, 256, generator=g).bfloat16(), torch.randn(5, 256, generator=g)):
        y, r = fw.linear(x), fused_reference.linear(ct, x)
        assert torch.equal(y.view(torch.int16) if y.dtype == torch.bfloat16 else y.view(torch.int32),
                           r.view(torch.int16) if r.dtype == torch.bfloat16 else r.view(torch.int32))
    m = nn.Sequential(nn.Linear(256, 128)).bfloat16()
    with nzrt.managed(m, policy="fused") as run:  # "auto": no window code without its fast path
        assert all(s.ct.header.widths != (4,) for s in run.tensors.values() if s.ct.numel() > 64)
    print("ok")
""")


def test_without_avx512_the_general_path_and_the_smallest_code(tmp_path):
    """A CPU without AVX-512 (as compiled with NZRT_NUMBA_NO_AVX512=1, in a fresh numba cache):
    the window code is read by the general path, bit for bit, and "auto" does not choose it."""
    env = dict(__import__("os").environ, NZRT_NUMBA_NO_AVX512="1", NUMBA_CACHE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", PORTABLE], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_rows_of_a_window_coded_weight(gen):
    """The embedding lookup (``FusedWeight.rows``) reads the window code too: the decoded rows."""
    w = noisy(weights(300, 128, torch.bfloat16, gen), gen)
    fw = cpu_fused.FusedWeight(codec.compress(w, tile=1024, widths=W4))
    ids = torch.randint(0, 300, (4, 3), generator=gen)
    ids[0, 0], ids[-1, -1] = 0, 299
    assert torch.equal(ints(fw.rows(ids)), ints(w[ids]))
