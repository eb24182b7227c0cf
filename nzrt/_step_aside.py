"""Keep the project root's folders from shadowing installed packages of the same name.

The repository root holds ``kernels/``, ``scheduler/`` and ``policies/``, installed as
``nzrt.kernels``, ``nzrt.scheduler`` and ``nzrt.policies``. PyPI has packages under the top-level
names ``kernels`` (Hugging Face's, imported by transformers >= 5.25 for every model) and
``scheduler``. When a user puts the root on ``sys.path`` (a script, REPL or notebook in the root,
``python -c``/``-m`` there, ``PYTHONPATH=<root>``), ``import kernels`` would find our folder. Each of
the three ``__init__`` files calls :func:`step_aside` when it is imported under its top-level name,
and the installed distribution takes its place in ``sys.modules``; without one, the import fails
as if the folder were not there, with a message naming ``nzrt.<name>``.

Standard library only, loaded by file path: it must not import ``nzrt`` (whose import may import
transformers, which imports ``kernels``: the module being imported right now).
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _real(path: str) -> str:
    return os.path.realpath(path or os.getcwd())  # '' on sys.path is the working directory


def step_aside(name: str, init_file: str):
    """Import the installed top-level package ``name`` from ``sys.path`` without the project root
    (the folder above ``init_file``'s package), register it as ``sys.modules[name]`` and return it.
    The import system returns ``sys.modules[name]`` after our ``__init__`` ends, so the caller's
    ``import name`` / ``from name import X`` gets the installed package."""
    root = _real(os.path.dirname(os.path.dirname(os.path.abspath(init_file))))
    search = [p for p in sys.path if isinstance(p, str) and _real(p) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, search)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(
            f"No module named {name!r} is installed; the folder {os.path.join(root, name)} is nzrt's "
            f"and is imported as 'nzrt.{name}' (the project root should not be on sys.path)", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
