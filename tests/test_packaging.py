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


def _package_folders() -> set:
    """Every folder with an ``__init__.py`` under the four roots, as its installed name."""
    out = set()
    for root, name in (("nzrt", "nzrt"), ("kernels", "nzrt.kernels"), ("scheduler", "nzrt.scheduler"),
                       ("policies", "nzrt.policies")):
        for init in (ROOT / root).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / root).parts
            if "__pycache__" not in rel:
                out.add(".".join((name,) + rel))
    return out


def test_every_package_folder_is_installed(tmp_path):
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = _package_folders()
    assert folders == listed, f"not in pyproject: {folders - listed}; no folder: {listed - folders}"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True)
    (wheel,) = tmp_path.glob("nzrt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg in folders:
        assert pkg.replace(".", "/") + "/__init__.py" in names, pkg


def _imports(path: Path) -> set:
    """Absolute names a module imports (module- and function-level), relative ones resolved."""
    import ast

    parts = path.relative_to(ROOT).with_suffix("").parts
    root = {"kernels": ("nzrt", "kernels"), "scheduler": ("nzrt", "scheduler"),
            "policies": ("nzrt", "policies")}.get(parts[0], ("nzrt",))
    mod = root + parts[1:]
    pkg = mod[:-1]  # a module's package; for an __init__, mod[-1] is "__init__"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(pkg[: len(pkg) - node.level + 1]) if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names)
    return out


def _library_files():
    for root in ("nzrt", "kernels", "scheduler", "policies"):
        for path in (ROOT / root).rglob("*.py"):
            if not path.relative_to(ROOT).parts[:2] == ("nzrt", "cli"):
                yield path


def test_the_library_never_imports_the_cli():
    bad = {str(p.relative_to(ROOT)): sorted(n for n in _imports(p) if n == "nzrt.cli" or n.startswith("nzrt.cli."))
           for p in _library_files()}
    assert not {k: v for k, v in bad.items() if v}


def test_the_mechanism_never_imports_the_face():
    """scheduler/, kernels/ and policies/ import nothing of nzrt outside those three."""
    inner = ("nzrt.scheduler", "nzrt.kernels", "nzrt.policies")
    bad = {}
    for root in ("kernels", "scheduler", "policies"):
        for p in (ROOT / root).rglob("*.py"):
            up = sorted(n for n in _imports(p) if (n == "nzrt" or n.startswith("nzrt."))
                        and not n.startswith(inner))
            if up:
                bad[str(p.relative_to(ROOT))] = up
    assert not bad


def test_nzrt_variables_are_read_in_one_place():
    """Only ``kernels/env.py`` reads an ``NZRT_*`` environment variable; it names every one used."""
    import re

    from nzrt.kernels import env

    used, readers = set(), []
    for p in _library_files():
        src = p.read_text()
        used.update(re.findall(r"\bNZRT_[A-Z0-9_]+\b", src))
        if re.search(r"(environ(\.get)?\s*[\[(]|getenv\()\s*[\"']NZRT_", src) and p.name != "env.py":
            readers.append(str(p.relative_to(ROOT)))
    assert not readers
    for p in (ROOT / "nzrt" / "cli").rglob("*.py"):
        used.update(re.findall(r"\bNZRT_[A-Z0-9_]+\b", p.read_text()))
    assert used - {"NZRT_MAGIC"} <= set(env.VARIABLES), used - set(env.VARIABLES)
