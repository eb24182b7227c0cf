"""Fuzzing .nzrt loading (tools/fuzz_checkpoint.py's engine, a fixed seed, 2,400 files): every
mutated file is a FormatError naming the file (and the tensor it hit) or loads to exactly the
saved bits; on every adversarial blob the numba and reference decoders agree."""
import collections
import importlib.util
import os

import pytest

pytest.importorskip("numba")

_SPEC = importlib.util.spec_from_file_location(
    "fuzz_checkpoint", os.path.join(os.path.dirname(__file__), "..", "tools", "fuzz_checkpoint.py"))
fuzz = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(fuzz)

COUNT = 2400


def test_fuzz_every_outcome_is_formaterror_or_exact(tmp_path):
    s = fuzz.Seed(tmp_path)
    seen = collections.Counter()
    for i in range(COUNT):
        kind, outcome = fuzz.run_one(s, tmp_path, 12345, i)  # raises on any violation
        seen[kind, outcome] += 1
    for kind in fuzz.KINDS:  # every mutation kind ran, and was refused at least once
        assert seen[kind, "rejected"] > 0, (kind, seen)
    assert sum(seen.values()) == COUNT


def test_the_checks_can_fail(tmp_path):
    """The oracle itself: an accepted file that decodes to other bits is a violation."""
    s = fuzz.Seed(tmp_path)
    other = fuzz.Seed(tmp_path)
    other.tensors = dict(s.tensors, d=s.tensors["d"] + 1)
    with pytest.raises(AssertionError, match="other bits"):
        fuzz.check_file(other, tmp_path / "x.nzrt", s.raw, None, verify=True)
