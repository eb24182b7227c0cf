"""Only `nzrt` is an import name; importing it is cheap; the public surface is pinned."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import nzrt

ROOT = Path(__file__).resolve().parents[1]


def test_public_api_is_pinned():
    assert sorted(nzrt.__all__) == sorted([
        "CompressedTensor", "FormatError", "compress", "decompress", "decode_into",
        "save", "load", "load_metadata", "managed", "OptimizerConfig", "from_pretrained", "report", "release",
    ])
    for name in nzrt.__all__:
        assert getattr(nzrt, name) is not None


def test_report_and_release_are_functions_after_every_submodule_is_imported():
    """``nzrt.report`` once was a submodule's name: importing it replaced the function."""
    code = ("import importlib, pkgutil, nzrt\n"
            "for m in pkgutil.iter_modules(nzrt.__path__):\n"
            "    importlib.import_module('nzrt.' + m.name)\n"
            "import nzrt.runtime.accounting\n"
            "assert callable(nzrt.report) and nzrt.report.__module__ == 'nzrt.pretrained', nzrt.report\n"
            "assert callable(nzrt.release) and callable(nzrt.from_pretrained)\n")
    r = _run(code, ROOT)
    assert r.returncode == 0, r.stderr


def test_wheel_has_only_nzrt_as_top_level(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True)
    (wheel,) = tmp_path.glob("nzrt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"nzrt"}
    for sub in ("scheduler", "kernels", "policies", "runtime", "loading", "cli"):
        assert f"nzrt/{sub}/__init__.py" in names
    assert "nzrt/cli/__main__.py" in names and "nzrt/data/eval.txt" in names
    assert "nzrt/kernels/reference.py" in names


def _run(code, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env,
                          capture_output=True, text=True)


def test_import_kernels_does_not_find_ours(tmp_path):
    r = _run("import importlib.util as u, sys; s = u.find_spec('kernels');"
             "print(s.origin if s else 'none')", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    origin = r.stdout.strip()
    assert origin == "none" or Path(origin).resolve() != ROOT / "kernels" / "__init__.py", origin
    r = _run("import nzrt.kernels.spec as s; print(s.__name__)", cwd=tmp_path)
    assert r.stdout.strip() == "nzrt.kernels.spec", r.stderr


def test_import_nzrt_is_cheap(tmp_path):
    r = _run("import sys, nzrt; heavy = [m for m in ('torch', 'numba', 'triton', 'pynvml', 'numpy')"
             " if m in sys.modules]; print(heavy)", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_compress_does_not_import_triton_or_init_cuda(tmp_path):
    # (torch itself imports pynvml; what matters is that nobody initialises CUDA)
    r = _run("import sys, torch, nzrt; nzrt.decompress(nzrt.compress(torch.ones(10)));"
             "print('triton' in sys.modules, torch.cuda.is_initialized())", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False False"
